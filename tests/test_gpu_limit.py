"""The GPU slot (``flows/gpu_limit.py``) as an operator meets it (issue 21, fault 6): a run SIGKILLed while its GPU
stage group holds the slot of the global concurrency limit must not keep every other run's GPU stages waiting for
Prefect's default five-minute lease; and a run that waits says what it waits for.

Both runs are child processes that go through the real ``audio_task`` of ``flows/preprocess.py`` (with the stage
group itself replaced by a sleep or a no-op), against the test session's Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The child's audio stage group: the holder sleeps in it (and says so), the waiter returns at once.
_CHILD = """
import logging, sys, time
from pathlib import Path
from types import SimpleNamespace

import flows.preprocess as preprocess_flow
from flows.gpu_limit import ensure_gpu_limit

name, role, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
handler = logging.StreamHandler(sys.stderr)
for logger_name in ("flows", "prefect.concurrency"):
    logging.getLogger(logger_name).setLevel(logging.INFO)
    logging.getLogger(logger_name).addHandler(handler)
ensure_gpu_limit(name, 1)

def group(kind, pieces, settings, workspace):
    (out / f"{role}-holds").write_text(str(time.time()))
    if role == "holder":
        time.sleep(3600)
    return []

preprocess_flow.run_model_group = group
preprocess_flow.audio_task.fn([], SimpleNamespace(partitions=SimpleNamespace(gpu_limit_name=name)), str(out))
print("released", flush=True)
"""

# lease (60 s, the server's shortest) + the server's expired-lease sweep (every 15 s) + the waiter's poll, with a
# margin for a busy machine; Prefect's default lease alone is 300 s.
RECOVERY_BOUND_S = 150


def _start(role: str, name: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", _CHILD, name, role, str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.mark.timeout(RECOVERY_BOUND_S + 240)
def test_a_sigkilled_holder_frees_the_gpu_slot_within_its_short_lease_and_the_waiter_says_why_it_waits(tmp_path):
    name = f"test-gpu-{uuid.uuid4().hex[:8]}"
    holder = _start("holder", name, tmp_path)
    waiter = None
    try:
        deadline = time.monotonic() + 180  # the child imports the flows (torch included) on a busy machine
        while not (tmp_path / "holder-holds").exists():
            assert holder.poll() is None, f"the holder exited before taking the slot:\n{holder.stdout.read()}"
            assert time.monotonic() < deadline, "the holder did not take the slot within 180 s"
            time.sleep(0.2)
        holder.send_signal(signal.SIGKILL)  # mid-stage, no finally runs: only the lease can free the slot
        holder.wait(timeout=30)
        killed = time.monotonic()

        waiter = _start("waiter", name, tmp_path)
        try:
            output, _ = waiter.communicate(timeout=RECOVERY_BOUND_S)
        except subprocess.TimeoutExpired:
            _kill(waiter)
            output, _ = waiter.communicate()
            pytest.fail(f"a fresh run did not get the GPU slot within {RECOVERY_BOUND_S} s of its holder's "
                        f"SIGKILL; its output:\n{output}")
        waited = time.monotonic() - killed
        assert waiter.returncode == 0 and "released" in output, output
        assert (tmp_path / "waiter-holds").exists()
        # it said what it waited for, and why, while it waited
        assert f"waiting for a slot of the global concurrency limit '{name}'" in output, output
        assert "lease" in output, output
        print(f"the slot came back {waited:.0f} s after its holder's SIGKILL")
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                _kill(process)
