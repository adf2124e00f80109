"""Shared fixtures. Every test session gets its own PREFECT_HOME (Prefect keeps its database and results
there), runs offline, and talks to ONE Prefect server started for the whole session (``pytest_configure``).

Without it, every flow called as a plain function starts Prefect's ephemeral server, whose 20 s start-up limit a
busy 2-core machine exceeds (7 tests errored that way), and which can outlive pytest when pytest is killed. The
session's server gets a generous start-up wait, runs in its own process group, and that group is killed when
the session ends (also on Ctrl-C and on an exception), and by the server's watchdog when pytest is killed
outright (``synchrorama.prefect_server``), so no process of the suite is left behind.

The session's one-off set-up, the tiny models and the server, is done in ``pytest_configure``, before any test:
pytest-timeout's per-test limit counts a test's fixtures and its body, so a first use inside the first test spent
that test's 900 s on it, and on a 6x oversubscribed machine the first flow tests errored.
"""

from __future__ import annotations

import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="synchrorama-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Belt and braces: if anything still starts an ephemeral server, give it time on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

import atexit  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import tiny_models  # noqa: E402
from preprocess.run.model_loading import TINY_DIR, register_tiny_builder  # noqa: E402
from synchrorama.prefect_server import start_server, stop_process_group  # noqa: E402
from synchrorama.sample_data import make_talking_video  # noqa: E402

# The tests run the tiny profile's stages directly: a user's run builds the tiny models on first use (as the CLI
# and the flows arrange it); the test session builds them in pytest_configure.
register_tiny_builder(tiny_models.BUILDER)

_session_server: subprocess.Popen | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_session_server() -> None:
    global _session_server
    server, _session_server = _session_server, None
    if server is not None:
        stop_process_group(server)  # the whole group: uvicorn and its workers, and the watchdog


def _stop_server_then_terminate(signum, frame) -> None:
    _stop_session_server()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def pytest_configure(config):
    """The session's one-off set-up, before any test's time limit starts: the Prefect server (before any test
    module imports Prefect), then the tiny models (built once per checkout and builder version)."""
    _start_session_server()
    tiny_models.BUILDER.build(TINY_DIR)


def _start_session_server() -> None:
    global _session_server
    if os.environ.get("PREFECT_API_URL") or _session_server is not None:
        return  # the caller provides a server
    port = _free_port()
    _session_server = start_server(Path(_prefect_home) / "server.log", port=port, timeout_s=600)
    # At exit rather than in pytest_unconfigure: registered before Prefect is imported, it runs after Prefect's
    # own exit hooks, which still send their last logs to the server.
    atexit.register(_stop_session_server)
    signal.signal(signal.SIGTERM, _stop_server_then_terminate)  # CI's outer `timeout` sends SIGTERM
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"


def _torch_threads(count: int):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_torch_threads():
    """Training tests run on both cores (the tiny UNet is big enough to gain); restored afterwards."""
    yield from _torch_threads(2)


@pytest.fixture
def one_torch_thread():
    """Small models run fastest, and timings stay steady, on one intra-op thread; restored afterwards."""
    yield from _torch_threads(1)


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
    the audio and the visual feature tests: (raw_dir, out_dir, summary, overrides).

    ``filters.min_speech_fraction`` is 0 here, so that the silent clip (Silero VAD: no speech) is kept and the audio
    stages' handling of a clip without speech (flagged rows, no invented numbers) runs inside the flow; the
    ``no_speech`` rejection itself is tested in test_speech_activity.py."""
    from flows.preprocess import preprocess

    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "talk.mp4", seconds=4.0)
    make_talking_video(raw / "quiet.mp4", seconds=4.0, audio="silence")
    out = tmp_path_factory.mktemp("out")
    overrides = {"visual": {"latents": {"enabled": True}}, "filters": {"min_speech_fraction": 0.0}}
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=overrides)
    return raw, out, summary, overrides
