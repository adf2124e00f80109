"""``synchrorama report``: one self-contained HTML page with plots of a run's tables, an AU summary and a
sample of the clip descriptions (and the tiny-model warning when the run used tiny models, and a warning when the
out_dir holds no complete publish)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shards.tables import (  # noqa: E402
    ACTION_UNITS_TABLE,
    CLIPS_TABLE,
    DESCRIPTIONS_TABLE,
    PUBLISHING_MARKER,
    STAGE_TIMINGS_TABLE,
    TABLES_DIR,
    read_table,
)
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


DESCRIPTION_SAMPLE = 12  # descriptions shown on the page


def _action_units_html(out_dir: Path) -> str:
    """Mean and spread of every AU over all frames of the kept clips, and the clips with the most of each."""
    if not (out_dir / TABLES_DIR / ACTION_UNITS_TABLE).exists():
        return ""
    table = read_table(out_dir, ACTION_UNITS_TABLE)
    names = [name for name in table.column_names if name.startswith("AU")]
    if not len(table) or not names:
        return "<h2>action units</h2><p>no kept clips</p>"
    # nulls (frames without a face) become NaN and are left out of the statistics
    values = {name: table.column(name).to_numpy(zero_copy_only=False).astype(float) for name in names}
    models = sorted(set(table.column("model").to_pylist()))

    def draw(ax):
        ax.bar(names, [np.nanmean(v) for v in values.values()], yerr=[np.nanstd(v) for v in values.values()],
               color="tab:orange", capsize=3)
        ax.set_ylabel("mean over frames (+- std)")

    per_clip: dict[str, dict[str, list[float]]] = {}
    for row in table.to_pylist():
        clip = per_clip.setdefault(row["clip_id"], {name: [] for name in names})
        for name in names:
            if row[name] is not None:
                clip[name].append(row[name])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["clip_id", "frames", *names])
    body = "".join(
        "<tr>" + f"<td>{html.escape(clip_id)}</td><td>{len(next(iter(aus.values())))}</td>"
        + "".join(f"<td>{sum(v) / len(v):.3f}</td>" if v else "<td></td>" for v in aus.values()) + "</tr>"
        for clip_id, aus in sorted(per_clip.items())[:DESCRIPTION_SAMPLE])
    return (f"<h2>action units</h2><p>{len(table)} frames of {len(per_clip)} clips; estimator: "
            f"{html.escape(', '.join(models))}</p>{_figure_html(draw, 'Action units over all kept frames')}"
            f"<p>per-clip means (first {DESCRIPTION_SAMPLE} clips)</p><table><tr>{head}</tr>{body}</table>")


def _descriptions_html(out_dir: Path) -> str:
    if not (out_dir / TABLES_DIR / DESCRIPTIONS_TABLE).exists():
        return ""
    rows = read_table(out_dir, DESCRIPTIONS_TABLE).to_pylist()
    if not rows:
        return "<h2>descriptions</h2><p>none</p>"
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    prompts = sorted({row["prompt"] for row in rows})
    body = "".join(f"<tr><td>{html.escape(row['clip_id'])}</td><td>{html.escape(row['status'])}</td>"
                   f"<td>{html.escape(row['text'])}</td><td>{html.escape(row['model'])}</td></tr>"
                   for row in rows[:DESCRIPTION_SAMPLE])
    return (f"<h2>descriptions</h2><p>{len(rows)} clips described ("
            f"{html.escape(', '.join(f'{k}: {v}' for k, v in sorted(statuses.items())))}); prompt: "
            f"<i>{html.escape(' | '.join(prompts))}</i></p><p>sample of {min(len(rows), DESCRIPTION_SAMPLE)}</p>"
            f"<table><tr><th>clip_id</th><th>status</th><th>text</th><th>model</th></tr>{body}</table>")


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
    synced = [row for row in clips if row.get("av_confidence") is not None]  # pieces the sync check ran on
    if synced:
        figures.append(_figure_html(lambda ax: (
            ax.hist([[r["av_confidence"] for r in synced if r["status"] == status] for status in ("kept", "rejected")],
                    bins=30, stacked=True, color=["tab:green", "tab:red"], label=["kept", "rejected"]),
            ax.legend(), ax.set_xlabel("SyncNet confidence (LSE-C); out_of_sync below sync.min_confidence")),
            "AV sync confidence"))
        figures.append(_figure_html(lambda ax: (
            ax.hist([r["av_offset_frames"] for r in synced], bins=np.arange(-15.5, 16.5), color="tab:cyan"),
            ax.set_xlabel("SyncNet AV offset (frames, + = audio leads)")), "AV offset before correction"))
    # picture quality (preprocess.video.frame_quality / identity): kept and rejected stacked, to set the thresholds from
    for column, label in (("sharpness", "face-crop Laplacian variance (blurry below filters.min_sharpness)"),
                          ("identity_change", "identity change score (recorded; rejects above "
                                              "filters.max_identity_change with reject_identity_change)"),
                          ("upscale_factor", "upscale of the source crop to 512 (low_resolution above "
                                             "1 / filters.min_source_crop_fraction)")):
        measured = [row for row in clips if row.get(column) is not None]
        if measured:
            figures.append(_figure_html(lambda ax, measured=measured, column=column, label=label: (
                ax.hist([[r[column] for r in measured if r["status"] == status] for status in ("kept", "rejected")],
                        bins=30, stacked=True, color=["tab:green", "tab:red"], label=["kept", "rejected"]),
                ax.legend(), ax.set_xlabel(label)), column.replace("_", " ").capitalize()))
    tables = "".join(_table_html(name, rows) for name, rows in inspect_run(out_dir).items())
    summary_file = out_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    warning = (f'<p style="color:#b00;font-weight:bold">WARNING: {html.escape(summary["warning"])}</p>'
               if summary.get("warning") else "")
    if (out_dir / PUBLISHING_MARKER).exists() or summary.get("status") != "complete":
        # the tables plotted here may not be the ones the shards hold: say so rather than look authoritative
        warning += ('<p style="color:#b00;font-weight:bold">WARNING: this out_dir holds no complete publish '
                    f'({PUBLISHING_MARKER} present or summary.json not committed): shards and tables may disagree; '
                    'run synchrorama validate</p>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>preprocess report: {html.escape(str(out_dir))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 8px}} img{{margin:4px}}</style></head><body>
<h1>Preprocessing report</h1><p>{html.escape(str(out_dir))}: {len(clips)} clips, {len(kept)} kept</p>
{warning}{''.join(figures)}{tables}{_action_units_html(out_dir)}{_descriptions_html(out_dir)}</body></html>"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
