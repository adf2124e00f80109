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


@pytest.fixture(scope="session")
def frontal_video(tmp_path_factory):
    """A 5 s 640x360 30 fps video of one frontal face with espeak-ng speech."""
    return make_talking_video(tmp_path_factory.mktemp("media") / "frontal.mp4", layout="single", seconds=5.0)


@pytest.fixture(scope="session")
def pair_video(tmp_path_factory):
    """Two faces side by side (multi-speaker)."""
    return make_talking_video(tmp_path_factory.mktemp("media") / "pair.mp4", layout="pair", seconds=4.0)
