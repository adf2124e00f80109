"""The served deployments through a real Prefect server: `prefect deployment run preprocess/folder --watch`
completes with exit 0 and writes the outputs; a failing run exits 1 and shows its reason."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synchrorama.prefect_server import die_with_this_process, start_server, stop_process_group
from synchrorama.sample_data import make_talking_video

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    logs = tmp_path_factory.mktemp("logs")
    # both in process groups of their own that die with this process, even when it is SIGKILLed
    server = start_server(logs / "server.log", port=port, timeout_s=120, env=env, cwd=REPO)
    serving = None
    try:
        deadline = time.monotonic() + 120
        serving = subprocess.Popen([sys.executable, "-m", "flows.serve", "--profile", "tiny"], cwd=REPO, env=env,
                                   stdout=open(logs / "serve.log", "wb"), stderr=subprocess.STDOUT,
                                   process_group=0)
        die_with_this_process(serving)
        while subprocess.run([PREFECT, "deployment", "inspect", "preprocess/folder"], cwd=REPO, env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and serving.poll() is None, (logs / "serve.log").read_text()[-2000:]
            time.sleep(1)
        yield env
    finally:
        if serving is not None:
            stop_process_group(serving, grace_s=15)
        stop_process_group(server, grace_s=15)


def _run_deployment(env, name: str, **params) -> subprocess.CompletedProcess:
    args = [PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", "300"]
    for key, value in params.items():
        args += ["-p", f"{key}={value}"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_deployment_run_watch_completes_and_writes_outputs(served, tmp_path):
    raw = tmp_path / "raw"
    make_talking_video(raw / "host.mp4", layout="single", seconds=4.0)
    out = tmp_path / "out"
    finished = _run_deployment(served, "preprocess/folder", raw_dir=raw, out_dir=out, profile="tiny")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-2000:]
    assert "Completed" in finished.stdout
    rows = pq.read_table(out / "tables" / "clips.parquet").to_pylist()
    assert [(row["clip_id"], row["status"]) for row in rows] == [("host", "kept")]
    assert list((out / "shards").glob("shard-*.tar"))


def test_failed_deployment_run_exits_nonzero_and_shows_the_reason(served, tmp_path):
    finished = _run_deployment(served, "preprocess/hdtf", raw_dir=tmp_path / "missing", out_dir=tmp_path / "out")
    assert finished.returncode == 1
    assert "Failed" in finished.stdout
    assert "is not a directory" in " ".join(finished.stdout.split())  # rich wraps long lines


def test_deployment_run_with_its_models_missing_exits_nonzero_naming_them(served, tmp_path):
    """The default profile here, offline, has none of its real models: the run fails at its first task, before
    any clip, and `--watch` exits 1 with the models named (no clip is rejected as `error` for it)."""
    from preprocess.run.preflight import active_models
    from preprocess.run.settings import load_settings

    raw = tmp_path / "raw"
    make_talking_video(raw / "host.mp4", layout="single", seconds=4.0)
    out = tmp_path / "out"
    env = {**served, "COLUMNS": "1000", "HF_HUB_OFFLINE": "1"}
    finished = _run_deployment(env, "preprocess/folder", raw_dir=raw, out_dir=out, profile="default")
    assert finished.returncode == 1, finished.stdout[-3000:]
    shown = " ".join(finished.stdout.split())
    assert "ModelSetupError" in shown and "cannot be loaded" in shown, shown[-3000:]
    for choice in active_models(load_settings("default")).values():
        assert choice.model in shown, (choice.model, shown[-3000:])
    assert not (out / "tables").exists()
