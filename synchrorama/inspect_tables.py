"""Reading the parquet tables of a run for people: counts, reject reasons, durations (duckdb SQL)."""

from __future__ import annotations

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
    return {name: con.execute(sql).fetchall() for name, sql in queries.items()}


COLUMNS = {
    "status": ("status", "clips", "seconds"),
    "reasons": ("reason", "stage", "clips"),
    "durations": ("kept", "min_s", "median_s", "max_s", "hours"),
    "stage_seconds": ("stage", "runs", "seconds", "cached"),
    "annotation_issues": ("kind", "n"),
}
