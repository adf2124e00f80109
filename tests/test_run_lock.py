"""One run per output folder (``shards.output_lock``): a live holder, in another process or in this one, refuses
a second run at once, naming itself; a holder that died (SIGKILL, no clean-up) leaves a lock that is simply free."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.output_lock import LOCK_FILE, OutputLocked, hold_output_lock, live_holder

HOLDER = """
import sys, time
from pathlib import Path
from shards.output_lock import hold_output_lock
with hold_output_lock(Path(sys.argv[1]), "a child run"):
    print("held", flush=True)
    time.sleep(600)
"""


def _child_holding(out: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"  # blocks until the child holds the lock
    return child


def test_a_second_holder_in_this_process_is_refused_and_the_lock_is_free_after(tmp_path):
    with hold_output_lock(tmp_path, "run one"):
        with pytest.raises(OutputLocked, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} .*run one"):
            with hold_output_lock(tmp_path, "run two"):
                pass
    with hold_output_lock(tmp_path, "run three"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["purpose"] == "run three"


def test_a_live_holder_in_another_process_refuses_and_a_killed_one_is_recovered(tmp_path, caplog):
    child = _child_holding(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(OutputLocked, match=rf"pid {child.pid} .*a child run"):
            with hold_output_lock(tmp_path, "second run"):
                pass
        assert time.monotonic() - started < 5  # refused at once, never waits
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the dead holder's description is still in the file, but the kernel dropped its lock
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == child.pid
    with caplog.at_level(logging.INFO, logger="shards.output_lock"):
        with hold_output_lock(tmp_path, "after the kill"):
            pass
    assert any(f"pid {child.pid}" in r.message and "no longer running" in r.message for r in caplog.records)


def test_live_holder_tells_a_running_holder_from_a_dead_one_without_taking_the_lock(tmp_path):
    assert live_holder(tmp_path) is None  # no lock file at all
    child = _child_holding(tmp_path)
    try:
        assert f"pid {child.pid}" in live_holder(tmp_path)
        assert f"pid {child.pid}" in live_holder(tmp_path)  # the probe took nothing away from the holder
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert live_holder(tmp_path) is None  # the file still names the dead holder, but nobody holds the lock


def test_validate_tells_a_publish_in_progress_from_an_interrupted_one(tmp_path):
    from shards.validate import validate_output

    (tmp_path / "publishing.json").write_text(json.dumps({"run_id": "r1", "pid": 1, "host": "h"}))
    child = _child_holding(tmp_path)
    try:
        live = validate_output(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert any("a run is publishing now" in problem and f"pid {child.pid}" in problem for problem in live)
    assert any("a publish was interrupted" in problem for problem in validate_output(tmp_path))
