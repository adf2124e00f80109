"""``synchrorama report``: one self-contained HTML page with plots of a run's tables."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shards.tables import CLIPS_TABLE, STAGE_TIMINGS_TABLE, read_table  # noqa: E402
from synchrorama.inspect_tables import COLUMNS, inspect_run  # noqa: E402


def _figure_html(draw, title: str) -> str:
    figure, axis = plt.subplots(figsize=(6, 3.2))
    draw(axis)
    axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table_html(name: str, rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS[name])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(name.replace('_', ' '))}</h2><table><tr>{head}</tr>{body}</table>"


def write_report(out_dir: Path, path: Path | None = None) -> Path:
    out_dir = Path(out_dir)
    path = Path(path) if path else out_dir / "report.html"
    clips = read_table(out_dir, CLIPS_TABLE).to_pylist()
    timings = read_table(out_dir, STAGE_TIMINGS_TABLE).to_pylist()
    kept = [row for row in clips if row["status"] == "kept"]
    yaws = [row["yaw_mean"] for row in clips if row["yaw_mean"] is not None]
    reasons: dict[str, int] = {}
    for row in clips:
        if row["reason"]:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    stage_seconds: dict[str, float] = {}
    for row in timings:
        stage_seconds[row["stage"]] = stage_seconds.get(row["stage"], 0.0) + row["seconds"]

    figures = [
        _figure_html(lambda ax: (ax.hist(yaws, bins=30, color="tab:blue"), ax.set_xlabel("mean yaw per clip (deg)")),
                     "Head yaw (all clips with a face)"),
        _figure_html(lambda ax: (ax.hist([r["duration_s"] for r in kept], bins=20, color="tab:green"),
                                 ax.set_xlabel("seconds")), "Kept clip durations"),
        _figure_html(lambda ax: (ax.barh(list(reasons), list(reasons.values()), color="tab:red"),
                                 ax.set_xlabel("clips")), "Reject reasons"),
        _figure_html(lambda ax: (ax.barh(list(stage_seconds), list(stage_seconds.values()), color="tab:purple"),
                                 ax.set_xlabel("wall seconds (summed over clips)")), "Time per stage"),
    ]
    tables = "".join(_table_html(name, rows) for name, rows in inspect_run(out_dir).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>preprocess report: {html.escape(str(out_dir))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 8px}} img{{margin:4px}}</style></head><body>
<h1>Preprocessing report</h1><p>{html.escape(str(out_dir))}: {len(clips)} clips, {len(kept)} kept</p>
{''.join(figures)}{tables}</body></html>"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
