"""One run per output folder: an exclusive lock on ``<out_dir>/.lock`` held for the whole run.

Two preprocessing runs (``serve(limit=2)`` makes a double trigger easy) or two training runs writing one
folder corrupt each other: each deletes the other's temp files, and they publish over each other. The lock
is a ``flock`` on the file, so the kernel releases it when its holder dies, however it dies: a lock left by
a killed process is simply free again (the file still names the dead holder, which is logged as recovered).
A second holder, in another process or in the same one, is refused at once with a message that names the
holder; nothing waits.

The file holds the holder's pid, host, start time and purpose, for that message only; the ``flock``, not the
content, is the lock. ``flock`` works on local file systems and on NFSv4 (Linux emulates it with POSIX
locks there); on a file system without locking, the open fails loudly rather than running unlocked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class OutputLocked(RuntimeError):
    """Another run holds the output folder."""


def _holder_text(raw: str) -> str:
    try:
        holder = json.loads(raw)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, {holder['purpose']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "a holder that left no description"


@contextmanager
def hold_output_lock(out_dir: Path, purpose: str) -> Iterator[Path]:
    """Hold the lock of ``out_dir`` (created if needed) for the ``with`` block; yields the lock file's path.

    Raises :class:`OutputLocked` when another run holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
            raise OutputLocked(
                f"{out_dir} is in use by another run ({holder}); one run per output folder: wait for it to "
                f"finish or stop it, or use another output folder") from None
        previous = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        if previous:
            log.info("%s: recovered the lock left by %s, which is no longer running", out_dir, _holder_text(previous))
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                         "purpose": purpose})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder to report
    finally:
        os.close(fd)  # releases the flock


def live_holder(out_dir: Path) -> str | None:
    """A description of the live run holding ``out_dir``'s lock, or None when no live process holds it.

    Read-only: the lock file is opened for reading and probed with a shared, non-blocking ``flock`` that is
    dropped at once (a run starting in that instant is refused as if a second run held the folder; retrying works).
    Lets ``synchrorama validate`` tell a publish that is running from one that was interrupted."""
    path = Path(out_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
