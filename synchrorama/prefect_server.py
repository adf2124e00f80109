"""Starting a local Prefect server (SQLite) as a child process, waiting until it answers, and stopping it.

The server runs in a process group of its own (a Ctrl-C or a ``timeout`` aimed at the caller's group does not reach
it half-way), together with a small watchdog (``die_with_this_process``) that ends that group when the process that
started the server dies, however it dies: a SIGKILL (CI's time limit, the OOM killer) runs none of the caller's
clean-up, and a test session's server was found alive an hour after its pytest had been killed. The watchdog polls
its parent rather than using Linux's parent-death signal (``PR_SET_PDEATHSIG``), which fires when the *thread* that
forked exits, not the process, and which uvicorn's worker processes would not inherit. Other long-lived processes
(a deployment's runner and its flow-run processes) are tied to their caller the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:4200/api"

# argv: the pid of the process that started the group's leader (the server), the group. It is a member of that
# group: stopping the group (SIGTERM) stops it too. Once its parent is gone (it is then re-parented), it
# asks the group to stop, gives it GRACE_S, then kills the group, itself last.
_WATCHDOG = """
import os, signal, sys, time
parent, group, grace_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    time.sleep(0.5)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        os.kill(group, 0)  # the server (the group's leader) has not been reaped yet
        time.sleep(0.2)
except ProcessLookupError:
    pass
os.killpg(group, signal.SIGKILL)
"""
GRACE_S = 10.0
_watchdogs: dict[int, subprocess.Popen] = {}  # by the pid of the group leader they watch for, to reap them


def is_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(log_path: Path, host: str = "127.0.0.1", port: int = 4200, timeout_s: float = 90,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """``prefect server start`` with its output in ``log_path``, ``env`` and ``cwd`` (default: this process's; a
    ``prefect.toml`` there is read), in a process group of its own that dies with the calling process (module
    docstring); stop it with ``stop_process_group``. Started as a plain background process: ``--background`` was
    seen to die offline once its output pipe had no reader."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    env = {**(os.environ if env is None else env), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(prefect), "server", "start", "--host", host, "--port", str(port)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=cwd, process_group=0)
    die_with_this_process(process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(api_url):
            return process
        if process.poll() is not None:
            stop_process_group(process)  # its watchdog
            raise RuntimeError(f"prefect server exited with {process.returncode}; see {log_path}")
        time.sleep(0.5)
    stop_process_group(process)
    raise TimeoutError(f"prefect server did not answer at {api_url} within {timeout_s}s; see {log_path}")


def die_with_this_process(process: subprocess.Popen) -> None:
    """Start a watchdog in the process group that ``process`` leads (start it with ``process_group=0``): when this
    process dies, however it dies, the watchdog ends that group (module docstring)."""
    try:
        _watchdogs[process.pid] = subprocess.Popen(
            [sys.executable, "-I", "-c", _WATCHDOG, str(os.getpid()), str(process.pid), str(GRACE_S)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, process_group=process.pid)
    except BaseException:
        stop_process_group(process)
        raise


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process group that ``process`` leads, SIGKILL to what is left of it (uvicorn's workers, a
    runner's flow-run processes, the watchdog) once ``process`` has exited or after ``grace_s``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in (process, _watchdogs.pop(process.pid, None)):
        if child is not None:
            child.wait(timeout=10)
