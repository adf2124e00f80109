"""Compare two preprocess out_dirs: every shard file byte for byte, every table by content (wall times aside).

For a refactor that must not change behaviour (issue 20): run the same dataset with the same settings before and
after, then

    .venv/bin/python scripts/compare_outputs.py OUT_BEFORE OUT_AFTER

It prints one line per shard set and table and ends with IDENTICAL (exit 0) or DIFFERENT (exit 1). Not compared:
the wall-time columns (``stage_timings.seconds`` and each stage's ``<stage>_s`` in ``clips``) and index.json's
run id and creation time. Both runs must use the same model files: tiny models built by different builder
versions differ.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

RUN_FIELDS = ("run_id", "created", "written_at")  # index.json fields that name the run, not the data


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_shards(before: Path, after: Path) -> bool:
    names = sorted(p.relative_to(before) for p in (before / "shards").rglob("*") if p.is_file())
    if names != sorted(p.relative_to(after) for p in (after / "shards").rglob("*") if p.is_file()):
        print("the shard folders hold different files")
        return False
    same = True
    for name in names:
        if name.name == "index.json":
            first, second = (json.loads((root / name).read_text()) for root in (before, after))
            for index in (first, second):
                for field in RUN_FIELDS:
                    index.pop(field, None)
            same &= first == second
        elif _sha256(before / name) != _sha256(after / name):
            print(f"shard file {name} differs")
            same = False
    print(f"{len(names)} shard files: {'byte-identical' if same else 'DIFFERENT'}")
    return same


def _wall_time_columns(out_dir: Path, table: str) -> set[str]:
    if table == "stage_timings.parquet":
        return {"seconds"}
    if table == "clips.parquet":
        stages = pq.read_table(out_dir / "tables" / "stage_timings.parquet").column("stage").to_pylist()
        return {f"{stage}_s" for stage in stages}
    return set()


def compare_tables(before: Path, after: Path) -> bool:
    same = True
    for path in sorted((before / "tables").glob("*.parquet")):
        other = after / "tables" / path.name
        if not other.exists():
            print(f"table {path.name} is missing after")
            same = False
            continue
        first, second = pq.read_table(path), pq.read_table(other)
        if first.column_names != second.column_names:
            print(f"table {path.name}: columns differ: {set(first.column_names) ^ set(second.column_names)}")
            same = False
            continue
        columns = [c for c in first.column_names if c not in _wall_time_columns(before, path.name)]
        rows, other_rows = first.select(columns).to_pylist(), second.select(columns).to_pylist()
        if rows == other_rows:
            print(f"table {path.name}: {len(rows)} rows equal ({len(columns)} of {first.num_columns} columns)")
            continue
        same = False
        differing = sorted({c for x, y in zip(rows, other_rows, strict=False) for c in columns if x[c] != y[c]})
        print(f"table {path.name} differs: {len(rows)} vs {len(other_rows)} rows; columns {differing[:10]}")
    return same


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    before, after = (Path(arg) for arg in argv)
    same = compare_shards(before, after) & compare_tables(before, after)
    print("IDENTICAL" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
