"""Reading the parquet tables of a run for people: counts, reject reasons, durations (duckdb SQL), and where the
run's disk space goes (``disk_use``)."""

from __future__ import annotations

import os
import tarfile
from collections import defaultdict
from pathlib import Path

import duckdb

from shards.tables import ANNOTATION_ISSUES_TABLE, CLIPS_TABLE, STAGE_TIMINGS_TABLE, TABLES_DIR


def _table(out_dir: Path, name: str) -> str:
    path = Path(out_dir) / TABLES_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: has `preprocess` run with out_dir={out_dir}?")
    return f"read_parquet('{path.as_posix()}')"


def inspect_run(out_dir: Path) -> dict[str, list[tuple]]:
    """Named result sets (lists of row tuples), each from one SQL query over the tables."""
    clips = _table(out_dir, CLIPS_TABLE)
    timings = _table(out_dir, STAGE_TIMINGS_TABLE)
    issues = _table(out_dir, ANNOTATION_ISSUES_TABLE)
    con = duckdb.connect()
    queries = {
        "status": f"SELECT status, count(*) AS clips, round(sum(duration_s), 1) AS seconds "
                  f"FROM {clips} GROUP BY status ORDER BY status",
        "reasons": f"SELECT reason, reject_stage, count(*) AS clips FROM {clips} WHERE status = 'rejected' "
                   f"GROUP BY reason, reject_stage ORDER BY clips DESC, reason",
        "durations": f"SELECT count(*) AS kept, round(min(duration_s), 2) AS min_s, "
                     f"round(median(duration_s), 2) AS median_s, round(max(duration_s), 2) AS max_s, "
                     f"round(sum(duration_s) / 3600, 4) AS hours FROM {clips} WHERE status = 'kept'",
        "stage_seconds": f"SELECT stage, count(*) AS runs, round(sum(seconds), 2) AS seconds, "
                         f"sum(CASE WHEN cached THEN 1 ELSE 0 END) AS cached FROM {timings} "
                         f"GROUP BY stage ORDER BY seconds DESC",
        "annotation_issues": f"SELECT kind, count(*) AS n FROM {issues} GROUP BY kind ORDER BY n DESC, kind",
    }
    results = {name: con.execute(sql).fetchall() for name, sql in queries.items()}
    kept_seconds = next((row[2] for row in results["status"] if row[0] == "kept"), None) or 0.0
    results["disk_use"] = disk_use(out_dir, kept_seconds)
    return results


def _tree_bytes(root: Path, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """(files, bytes) under ``root``, counting a file hard-linked more than once (``seen``: inodes) only once."""
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            files, size = files + 1, size + stat.st_size
    return files, size


def disk_use(out_dir: Path, kept_seconds: float) -> list[tuple]:
    """Rows (what, files, MB, bytes per kept second of video): each shard member kind (from the tars' headers:
    ``mp4``, ``wav``, ``wav2vec.npy`` ...), the shards and tables folders, each stage's cache folder under ``work/``,
    and the total. A hard-linked file counts once, where it is first seen (shards first)."""
    out_dir = Path(out_dir)
    per_second = (lambda size: round(size / kept_seconds)) if kept_seconds else (lambda size: None)
    rows: list[tuple] = []
    members: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for tar_path in sorted((out_dir / "shards").glob("shard-*.tar")):
        try:
            with tarfile.open(tar_path) as tar:  # headers only: the data is skipped, not read
                for info in tar:
                    kind = info.name.partition(".")[2] or info.name
                    members[kind][0] += 1
                    members[kind][1] += info.size
        except (OSError, tarfile.TarError):
            continue  # a damaged shard: `synchrorama validate` names it; its folder size still counts below
    for kind, (count, size) in sorted(members.items(), key=lambda item: -item[1][1]):
        rows.append((f"shards: .{kind}", count, round(size / 1e6, 2), per_second(size)))
    seen: set[tuple[int, int]] = set()
    total = 0
    places = [out_dir / "shards", out_dir / "tables"]
    places += sorted(p for p in (out_dir / "work").iterdir() if p.is_dir()) if (out_dir / "work").is_dir() else []
    for place in places:
        files, size = _tree_bytes(place, seen)
        total += size
        rows.append((f"{place.relative_to(out_dir)}/", files, round(size / 1e6, 2), per_second(size)))
    rows.append(("total", None, round(total / 1e6, 2), per_second(total)))
    return rows


COLUMNS = {
    "status": ("status", "clips", "seconds"),
    "reasons": ("reason", "stage", "clips"),
    "durations": ("kept", "min_s", "median_s", "max_s", "hours"),
    "stage_seconds": ("stage", "runs", "seconds", "cached"),
    "annotation_issues": ("kind", "n"),
    "disk_use": ("where", "files", "MB", "bytes_per_kept_s"),
}
