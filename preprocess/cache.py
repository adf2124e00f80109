"""Content-addressed, crash-safe cache of stage outputs, kept next to the data under ``out_dir/work/``.

A stage's output lives in ``work/<stage>/<key>/``; the key hashes everything the output depends on (the
input file's content, the upstream keys, the stage's settings and version, the model reference). The
directory is built under a temporary name and renamed into place when complete, so a directory under its
final name is always whole: after a SIGKILL a re-run simply redoes what has no final directory. Changing a
threshold changes only the keys of the stages that read it, so only those re-run.

The cache lives in ``out_dir`` rather than in Prefect's result store on purpose: deleting the outputs must
invalidate the cache, and a Prefect result pointing at deleted files would not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def stable_hash(*parts: Any) -> str:
    """sha256 (first 20 hex digits) of the JSON form of ``parts``; dicts hash independent of key order."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        result_path = self.entry_dir(stage, key) / RESULT_FILE
        if not result_path.exists():
            return None
        return json.loads(result_path.read_text())

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Return ``(result, was_cached)``. ``compute(tmp_dir)`` writes its files into ``tmp_dir`` and returns
        a JSON-able dict (file references relative to the entry directory). Its wall time is stored as
        ``result["seconds"]``. If ``compute`` raises, nothing is stored and the exception propagates, so a
        transient failure is retried next run; expected rejections should be returned as values instead.
        """
        cached = self.load(stage, key)
        if cached is not None:
            return cached, True
        final = self.entry_dir(stage, key)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            result = compute(tmp)
            result = {**result, "seconds": round(time.perf_counter() - started, 4)}
            write_json_atomic(tmp / RESULT_FILE, result)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another worker finished the same key first; its output is equivalent.
                shutil.rmtree(tmp, ignore_errors=True)
                return self.load(stage, key) or result, True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return result, False

    def remove_leftovers(self) -> int:
        """Delete temporary directories left by killed runs; returns how many were removed."""
        removed = 0
        if self.root.exists():
            for leftover in self.root.glob("*/.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
                removed += 1
        return removed


def file_fingerprint(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime) so unchanged sources are not re-read."""
    path = Path(path)
    stat = path.stat()
    memo_key = stable_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    memo_path = memo_dir / f"{memo_key}.json"
    if memo_path.exists():
        return json.loads(memo_path.read_text())["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    write_json_atomic(memo_path, {"path": str(path), "sha256": sha})
    return sha
