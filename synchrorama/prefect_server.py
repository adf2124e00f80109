"""Starting a local Prefect server (SQLite) as a child process and waiting until it answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:4200/api"


def is_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(log_path: Path, host: str = "127.0.0.1", port: int = 4200, timeout_s: float = 90) -> subprocess.Popen:
    """``prefect server start`` with its output in ``log_path``. Started as a plain background process:
    ``--background`` was seen to die offline once its output pipe had no reader."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(prefect), "server", "start", "--host", host, "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(api_url):
            return process
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}; see {log_path}")
        time.sleep(0.5)
    process.terminate()
    raise TimeoutError(f"prefect server did not answer at {api_url} within {timeout_s}s; see {log_path}")
