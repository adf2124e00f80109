"""Shared fixtures. Every test session gets its own PREFECT_HOME (Prefect keeps its database and results
there) and runs offline."""

from __future__ import annotations

import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="synchrorama-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from synchrorama.sample_data import make_talking_video  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Small models run fastest, and timings stay steady, on one intra-op thread; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def frontal_video(tmp_path_factory):
    """A 5 s 640x360 30 fps video of one frontal face with espeak-ng speech."""
    return make_talking_video(tmp_path_factory.mktemp("media") / "frontal.mp4", layout="single", seconds=5.0)


@pytest.fixture(scope="session")
def pair_video(tmp_path_factory):
    """Two faces side by side (multi-speaker)."""
    return make_talking_video(tmp_path_factory.mktemp("media") / "pair.mp4", layout="pair", seconds=4.0)


@pytest.fixture(scope="session")
def tiny_feature_run(tmp_path_factory):
    """One preprocess run (tiny profile, optional VAE latents on) over a speaking and a silent clip, shared by
    the audio and the visual feature tests: (raw_dir, out_dir, summary, overrides)."""
    from flows.preprocess import preprocess

    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "talk.mp4", seconds=4.0)
    make_talking_video(raw / "quiet.mp4", seconds=4.0, audio="silence")
    out = tmp_path_factory.mktemp("out")
    overrides = {"visual": {"latents": {"enabled": True}}}
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=overrides)
    return raw, out, summary, overrides
