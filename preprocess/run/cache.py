"""Content-addressed, crash-safe cache of stage outputs, kept next to the data under ``out_dir/work/``.

A stage's output lives in ``work/<stage>/<key>/``; the key hashes everything the output depends on (the
input file's content, the upstream keys, the stage's settings and version, the model reference). The
directory is built under a temporary name and renamed into place when complete, so a directory under its
final name is always whole: after a SIGKILL a re-run simply redoes what has no final directory. Changing a
threshold changes only the keys of the stages that read it, so only those re-run.

The cache lives in ``out_dir`` rather than in Prefect's result store on purpose: deleting the outputs must
invalidate the cache, and a Prefect result pointing at deleted files would not.

Verified reads: ``result.json`` lists every file of its entry with its size in bytes (``_files``, written when
the entry is computed, hidden from callers). ``load`` checks that each exists with that size; an entry that
fails (a file deleted or truncated under ``work/``) is logged, naming the file and the entry, removed, and the
stage recomputes it. Sizes, not hashes: hashing every cached video on every read would cost as much as a
decode, and the failures seen (deleted files, cut-off copies) change sizes. An entry written before this check
existed has no ``_files`` and is treated the same way (recomputed once): it cannot be verified, and trusting it
is what made one deleted file fail every later run. Stage keys are unchanged, so the recomputed entry takes the
same place.

Temporary directories are named ``.tmp-<key>-<pid>@<host>-<random>``: ``remove_leftovers`` deletes only those
whose process is dead on this host, never a live run's (a second run on the same ``out_dir`` is refused by
``shards.output_lock`` anyway; this keeps clean-up safe without it). The flow, holding the out_dir's lock, removes
every temp at its start whatever host or pid it names (``shards.leftovers``). Rejections that a stage returns are cached
like any result, so stages return only verdicts about their input (``preprocess.run.media.check_tool_run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FILES_KEY = "_files"  # in result.json: {relative path: size in bytes} of every other file of the entry
_HOST = socket.gethostname()
# .tmp-<key>-<pid>@<host>-<8 hex>; a host name holds no "@" (and key, a stable_hash, no "-")
_TMP_NAME = re.compile(r"^\.tmp-(?P<key>.+)-(?P<pid>\d+)@(?P<host>[^@/]+)-[0-9a-f]{8}$")
_OLD_TMP_NAME = re.compile(r"^\.tmp-[^-]+-[0-9a-f]{8}$")  # before the owner was named: from an older version


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


def _temp_name(key: str) -> str:
    """A temporary directory name that says which process on which host is building it."""
    return f".tmp-{key}-{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _entry_files(directory: Path) -> dict[str, int]:
    """{path relative to ``directory``: size} of every file under it but result.json."""
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != RESULT_FILE}


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link (no byte stored twice: cache entries are never changed in
    place once renamed into place), or a copy where the file system refuses one."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._warned_stages: set[str] = set()

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stored result, or None when there is no entry or it fails verification (then it is removed)."""
        entry = self.entry_dir(stage, key)
        result_path = entry / RESULT_FILE
        if not result_path.exists():
            return None
        try:
            stored = json.loads(result_path.read_text())
        except (OSError, ValueError) as error:  # cut short or garbled: as unusable as a missing file
            return self._discard(entry, f"{RESULT_FILE} cannot be read ({error})")
        files = stored.pop(FILES_KEY, None) if isinstance(stored, dict) else None
        if not isinstance(files, dict):
            return self._discard(entry, f"{RESULT_FILE} lists no files (written before entries were verified)",
                                 quiet=True)
        for name, size in files.items():
            path = entry / name
            try:
                actual = path.stat().st_size
            except OSError:
                return self._discard(entry, f"{name} is missing")
            if actual != size:
                return self._discard(entry, f"{name} has {actual} bytes, {size} when it was written")
        return stored

    def _discard(self, entry: Path, why: str, quiet: bool = False) -> None:
        """Remove an entry that failed verification, so that the stage recomputes it under the same key.
        ``quiet``: one warning per stage (an old cache has thousands of such entries), the rest at INFO."""
        stage = entry.parent.name
        loud = not quiet or stage not in self._warned_stages
        if quiet:
            self._warned_stages.add(stage)
        log.log(logging.WARNING if loud else logging.INFO,
                "cache entry %s cannot be trusted: %s; removing it, the stage recomputes it%s", entry, why,
                " (so will every entry of this stage written by an older version)" if quiet and loud else "")
        # renamed first: the final name is free at once, and a half-removed tree is a temp dir, never an entry
        doomed = entry.parent / _temp_name(entry.name)
        try:
            os.rename(entry, doomed)
        except OSError:  # another worker removed (or replaced) it first
            return None
        shutil.rmtree(doomed, ignore_errors=True)
        return None

    def remove(self, stage: str, key: str) -> bool:
        """Delete an entry on purpose (its files now live elsewhere, e.g. in a shard); returns whether one was there.
        The stage recomputes it under the same key if a later run needs it."""
        entry = self.entry_dir(stage, key)
        doomed = entry.parent / _temp_name(entry.name)
        try:
            os.rename(entry, doomed)  # renamed first, as in _discard: a half-removed tree is never an entry
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

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
        tmp = final.parent / _temp_name(key)
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            result = compute(tmp)
            result = {**result, "seconds": round(time.perf_counter() - started, 4)}
            write_json_atomic(tmp / RESULT_FILE, {**result, FILES_KEY: _entry_files(tmp)})
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

    def run_many(self, stage: str, keys: list[str],
                 compute_many: Callable[[list[str], list[Path]], list[dict[str, Any]]],
                 ) -> list[tuple[dict[str, Any], bool]]:
        """``run`` for several keys whose outputs one call computes together (a batch across pieces).

        The keys without a usable entry are computed by one ``compute_many(missing_keys, tmp_dirs)`` (a
        temporary directory per missing key; it returns one result per key, in order); each entry is then stored exactly as
        ``run`` stores it (``_files`` listed, renamed into place whole), with the batch's wall time shared out
        evenly as its ``seconds``. A key listed twice is computed once. If ``compute_many`` raises, nothing of the
        batch is stored and the exception propagates (the caller may retry the keys one by one). Returns
        ``(result, was_cached)`` per key, in order."""
        found = {key: self.load(stage, key) for key in dict.fromkeys(keys)}
        missing = [key for key, stored in found.items() if stored is None]
        fresh: dict[str, dict[str, Any]] = {}
        if missing:
            tmps = []
            try:
                for key in missing:
                    tmp = self.entry_dir(stage, key).parent / _temp_name(key)
                    tmp.mkdir(parents=True)
                    tmps.append(tmp)
                started = time.perf_counter()
                results = compute_many(list(missing), list(tmps))
                if len(results) != len(missing):
                    raise RuntimeError(f"stage {stage}: {len(results)} results for {len(missing)} entries")
                seconds = round((time.perf_counter() - started) / len(missing), 4)
                for key, tmp, result in zip(missing, tmps, results, strict=True):
                    result = {**result, "seconds": seconds}
                    write_json_atomic(tmp / RESULT_FILE, {**result, FILES_KEY: _entry_files(tmp)})
                    try:
                        os.rename(tmp, self.entry_dir(stage, key))
                        fresh[key] = result
                    except OSError:  # another worker finished the same key first; its output is equivalent
                        shutil.rmtree(tmp, ignore_errors=True)
                        found[key] = self.load(stage, key) or result
            except BaseException:
                for tmp in tmps:
                    shutil.rmtree(tmp, ignore_errors=True)  # entries already renamed into place are whole: kept
                raise
        return [(fresh[key], False) if key in fresh else (found[key], True) for key in keys]

    def remove_leftovers(self) -> int:
        """Delete temporary directories left by dead runs; returns how many were removed.

        Removed: those whose process (``pid@host`` in the name) is not alive on this host, and those named the
        way older versions did (no owner; no run of this version writes them). Kept: a live process's, another
        host's (its liveness cannot be checked from here) and any name not made by this module."""
        removed = 0
        if not self.root.exists():
            return removed
        for leftover in self.root.glob("*/.tmp-*"):
            owner = _TMP_NAME.match(leftover.name)
            if owner:
                if owner["host"] != _HOST or _process_alive(int(owner["pid"])):
                    continue
            elif not _OLD_TMP_NAME.match(leftover.name):
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
        return removed


def file_fingerprint(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime) so unchanged sources are not re-read."""
    path = Path(path)
    memo_path = fingerprint_memo_path(path, memo_dir)
    if memo_path.exists():
        return json.loads(memo_path.read_text())["sha256"]
    sha = file_sha256_of(path)
    write_json_atomic(memo_path, {"path": str(path), "sha256": sha})
    return sha


def fingerprint_memo_path(path: Path, memo_dir: Path) -> Path:
    """Where ``file_fingerprint`` memoises ``path``'s hash for its current size and mtime."""
    stat = Path(path).stat()
    return Path(memo_dir) / f"{stable_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)}.json"


def file_sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
