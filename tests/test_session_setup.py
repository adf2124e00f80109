"""The test session's own set-up (``tests/conftest.py``) as CI meets it (issue 21, fault 9).

Each test runs a child pytest session in a copy of this checkout's sources, with the real conftest and
pyproject, on a small generated test file: CI's time limit killing the whole test run (SIGKILL to pytest's process
group) must take the session's Prefect server with it, and the one-off set-up (the tiny models, the server and its
health wait) must be done before the first test's own time limit starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or shutil.which("git") is None,
                                reason="reads processes from /proc (Linux) and lists the sources with git")


def _source_copy(root: Path, share_models: bool) -> Path:
    """The checkout's files as git sees them (tracked, and new files not ignored) under ``root``; with
    ``share_models``, ``.models`` is this checkout's own (built by this session's set-up), else there is none."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith(".models/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    if share_models:
        (root / ".models").symlink_to(REPO / ".models", target_is_directory=True)
    return root


def _child_session(source: Path, test_body: str, log: Path, *options: str) -> subprocess.Popen:
    """``pytest`` in ``source`` on one generated test file, in its own process group (as CI runs it), with none
    of this session's Prefect settings: it sets up its own, as a fresh CI run does."""
    (source / "tests" / "test_generated_session.py").write_text(test_body)
    env = {name: value for name, value in os.environ.items() if name not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PYTHONPATH"] = str(source)
    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
                                 "tests/test_generated_session.py"], cwd=source, env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of every live process; zombies are dead."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, parent, group = stat[stat.rindex(")") + 2:].split()[:3]
        if state not in ("Z", "X"):
            found[int(entry.name)] = (int(parent), int(group), command)
    return found


def _family(processes: dict[int, tuple[int, int, str]], root: int) -> set[int]:
    """``root`` and every descendant of it."""
    family, grown = {root}, True
    while grown:
        more = {pid for pid, (parent, _, _) in processes.items() if parent in family} - family
        family |= more
        grown = bool(more)
    return family


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_session(child: subprocess.Popen, known: set[int] = frozenset()) -> None:
    """SIGKILL the process groups of the child session, of its descendants and of the ``known`` pids still alive:
    whatever the outcome, a test leaves nothing of its own behind."""
    processes = _processes()
    ours = (_family(processes, child.pid) if child.poll() is None else set()) | (known & processes.keys())
    for group in {processes[pid][1] for pid in ours if pid in processes}:
        _kill_group(group)
    child.wait(timeout=30)


def _wait_for(path: Path, child: subprocess.Popen, log: Path, limit_s: float) -> str:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert child.poll() is None, f"the child session ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the child session's test did not start within {limit_s} s:\n" \
                                            f"{log.read_text()}"
        time.sleep(0.5)
    return path.read_text()


_HOLD_THE_SERVER = """
import os, time
from pathlib import Path

def test_holds_the_session_server():
    (Path(__file__).parent / "api-url").write_text(os.environ["PREFECT_API_URL"])
    time.sleep(600)
"""


@pytest.mark.timeout(600)
def test_a_test_run_killed_by_ci_leaves_no_prefect_server_behind(tmp_path):
    from synchrorama.prefect_server import is_healthy

    source = _source_copy(tmp_path / "checkout", share_models=True)
    log = tmp_path / "session.log"
    child = _child_session(source, _HOLD_THE_SERVER, log)
    server_group, server_side = None, set()
    try:
        api_url = _wait_for(source / "tests" / "api-url", child, log, 400)
        assert is_healthy(api_url)
        processes = _processes()
        servers = [pid for pid in _family(processes, child.pid) - {child.pid}
                   if "prefect server start" in processes[pid][2]]
        assert len(servers) == 1, {pid: processes[pid] for pid in _family(processes, child.pid)}
        server_group = processes[servers[0]][1]
        server_side = _family(processes, servers[0]) | {pid for pid, (_, group, _) in processes.items()
                                                          if group == server_group}

        _kill_group(child.pid)  # CI's `timeout --kill-after`: SIGKILL to pytest's process group, no clean-up runs
        child.wait(timeout=30)

        deadline = time.monotonic() + 30
        while True:
            processes = _processes()
            alive = {pid: processes[pid][2] for pid in processes
                     if pid in server_side or processes[pid][1] == server_group}
            if not alive:
                break
            assert time.monotonic() < deadline, \
                f"30 s after pytest was killed, its Prefect server's processes are still alive: {alive}"
            time.sleep(0.5)
        assert not is_healthy(api_url)
    finally:
        _kill_session(child, server_side)


_CHECK_THE_SET_UP = """
import os

import tiny_models
from preprocess.run.model_loading import TINY_DIR
from synchrorama.prefect_server import is_healthy


def test_the_first_test_finds_the_session_set_up():
    assert tiny_models.is_built(TINY_DIR), "the tiny models were not built before the first test started"
    assert is_healthy(os.environ["PREFECT_API_URL"])
"""


@pytest.mark.timeout(900)
def test_the_one_off_set_up_is_done_before_the_first_tests_time_limit_starts(tmp_path):
    """A fresh checkout (no tiny models yet): the first test finds the models built and the server answering,
    so neither counts against its own time limit (here 60 s). The tiny models' builders are the one part of the
    set-up replaced here (by copies of this checkout's build): the session's set-up is what is tested."""
    source = _source_copy(tmp_path / "checkout", share_models=False)
    built = REPO / ".models" / "tiny"  # by this session's set-up
    with open(source / "tiny_models" / "build.py", "a") as build:
        # the real builders train and save for minutes on a busy machine: each one copies this checkout's build
        build.write(f"\n\nBUILDERS = {{name: (lambda out, name=name: shutil.copytree(Path({str(built)!r}, name), out))"
                    "\n            for name in BUILDERS}\n")
    log = tmp_path / "session.log"
    child = _child_session(source, _CHECK_THE_SET_UP, log, "-o", "timeout=60")
    try:
        child.wait(timeout=600)
    finally:
        _kill_session(child)
    assert child.returncode == 0, log.read_text()
