"""``synchrorama validate --deep``: re-hash a run's input files and report the ones whose content changed.

A run knows an input by its content hash, memoised by path, size and modification time (``work/fingerprints``,
``preprocess.run.cache.file_fingerprint``), and a partition is redone when an input's size or mtime changes. An
input rewritten with the same size and mtime (a restore that keeps times, a tool that resets them) would go
unnoticed: this check reads every input again and compares it with the hash recorded when it was processed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from preprocess.run.cache import file_sha256_of, fingerprint_memo_path
from shards.tables import CLIPS_TABLE, TABLES_DIR

FINGERPRINTS_DIR = Path("work") / "fingerprints"


def input_files(out_dir: Path) -> list[Path]:
    """Every source and separate audio file the clips table names, once each, sorted."""
    table = pq.read_table(Path(out_dir) / TABLES_DIR / CLIPS_TABLE, columns=["source", "audio_source"])
    names = {name for column in ("source", "audio_source") for name in table.column(column).to_pylist() if name}
    return sorted(Path(name) for name in names)


def changed_inputs(out_dir: Path) -> tuple[list[str], int]:
    """(problems, inputs checked): inputs whose content differs from what was processed, or that cannot be
    checked (missing, or no hash recorded for their current size and mtime)."""
    problems, checked = [], 0
    for path in input_files(out_dir):
        if not path.is_file():
            problems.append(f"input {path}: missing (its clips cannot be redone)")
            continue
        memo = fingerprint_memo_path(path, Path(out_dir) / FINGERPRINTS_DIR)
        if not memo.exists():
            problems.append(f"input {path}: no hash recorded for its current size and modification time: it changed "
                            f"since it was processed (the next run redoes its clips), or work/ was cleared")
            continue
        checked += 1
        if json.loads(memo.read_text())["sha256"] != file_sha256_of(path):
            problems.append(f"input {path}: its content changed since it was processed, with the same size and "
                            f"modification time, so a run would not notice: `touch` it and rerun to redo its clips")
    return problems, checked
