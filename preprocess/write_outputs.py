"""Stage: write the kept clips into WebDataset shards and every clip into the parquet tables.

Runs once per flow run, after all clips are done. Clips are ordered by ``clip_id`` before being assigned to
shards, so the shards and tables depend only on the inputs and settings, not on which worker finished first;
this is what makes a killed-and-resumed run byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from preprocess.faces import LANDMARKS_FILE, POSE_FILE
from preprocess.pipeline import PieceOutcome
from preprocess.records import AnnotationIssue
from preprocess.settings import PreprocessSettings
from preprocess.standardise import AUDIO_FILE, VIDEO_FILE
from shards.schema import SCHEMA_VERSION
from shards.tables import (
    ANNOTATION_ISSUES_SCHEMA,
    ANNOTATION_ISSUES_TABLE,
    CLIPS_SCHEMA,
    CLIPS_TABLE,
    KEPT,
    REJECTED,
    STAGE_TIMINGS_SCHEMA,
    STAGE_TIMINGS_TABLE,
    TABLES_DIR,
    write_table_atomic,
)
from shards.writer import ShardSample, write_shards

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class RunSummary:
    out_dir: str
    shards_dir: str
    tables_dir: str
    n_clips: int
    n_kept: int
    n_rejected: int
    kept_seconds: float
    reasons: dict[str, int]
    n_shards: int
    n_annotation_issues: int

    def as_text(self) -> str:
        lines = [
            f"clips seen: {self.n_clips}  kept: {self.n_kept} ({self.kept_seconds:.1f} s of video)  "
            f"rejected: {self.n_rejected}",
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  rejected {reason}: {count}")
        lines += [
            f"annotation issues recorded: {self.n_annotation_issues}",
            f"shards ({self.n_shards}): {self.shards_dir}",
            f"tables: {self.tables_dir}",
        ]
        return "\n".join(lines)


def clip_metadata(outcome: PieceOutcome, settings: PreprocessSettings) -> dict:
    """The ``json`` member of a shard sample."""
    job, (start, end) = outcome.job, outcome.frames
    fps = job.standardised.fps
    return {
        "clip_id": outcome.clip_id,
        "candidate_id": job.candidate.candidate_id,
        "dataset": job.candidate.dataset,
        "source": job.candidate.source,
        "source_start_s": round(job.candidate.start_s + start / fps, 3),
        "source_end_s": round(job.candidate.start_s + end / fps, 3),
        "n_frames": end - start,
        "fps": fps,
        "duration_s": round((end - start) / fps, 3),
        "width": job.standardised.size,
        "height": job.standardised.size,
        "sample_rate": job.standardised.sample_rate,
        "crop_box": [job.crop_box.x, job.crop_box.y, job.crop_box.w, job.crop_box.h],
        "crop_method": job.crop_method,
        "loudness_target_lufs": settings.standardise.loudness_lufs,
        "gain_db": job.standardised.gain_db,
        "face_stats": outcome.stats.as_row(),
        "notes": list(job.notes),
        "models": {"face_mesh": settings.models.face_mesh, "face_detection": settings.models.face_detection},
        "settings_profile": settings.profile,
        "schema_version": SCHEMA_VERSION,
    }


def clip_row(outcome: PieceOutcome, settings: PreprocessSettings, shard_of: dict[str, str]) -> dict:
    job = outcome.job
    probe, stats = job.probe, outcome.stats
    fps = job.standardised.fps if job.standardised else None
    row = {
        "clip_id": outcome.clip_id,
        "candidate_id": job.candidate.candidate_id,
        "dataset": job.candidate.dataset,
        "source": job.candidate.source,
        "status": KEPT if outcome.kept else REJECTED,
        "reason": outcome.rejection.reason if outcome.rejection else None,
        "reject_stage": outcome.rejection.stage if outcome.rejection else None,
        "detail": outcome.rejection.detail if outcome.rejection else None,
        "notes": list(job.notes),
        "piece_index": outcome.piece_index,
        "n_pieces": outcome.n_pieces,
        "source_width": probe.width if probe else None,
        "source_height": probe.height if probe else None,
        "source_fps": probe.fps if probe else None,
        "source_rotation": probe.rotation if probe else None,
        "crop_method": job.crop_method,
        "shard": shard_of.get(outcome.clip_id),
        "face_model": settings.models.face_mesh if job.faces else None,
        "settings_profile": settings.profile,
    }
    if job.crop_box:
        row.update(crop_x=job.crop_box.x, crop_y=job.crop_box.y, crop_size=job.crop_box.w)
    if outcome.frames and fps:
        start, end = outcome.frames
        row.update(source_start_s=round(job.candidate.start_s + start / fps, 3),
                   source_end_s=round(job.candidate.start_s + end / fps, 3),
                   n_frames=end - start, duration_s=round((end - start) / fps, 3))
    elif job.duration_s is not None:
        row.update(source_start_s=job.candidate.start_s,
                   source_end_s=round(job.candidate.start_s + job.duration_s, 3), duration_s=job.duration_s)
    else:
        row.update(source_start_s=job.candidate.start_s, source_end_s=job.candidate.end_s)
    if stats:
        row.update({key: value for key, value in stats.as_row().items() if key != "duration_s"})
    if job.standardised:
        row.update(loudness_in_lufs=job.standardised.loudness_in_lufs, gain_db=job.standardised.gain_db)
    for timing in job.timings + outcome.timings:
        row[f"{timing.stage}_s"] = timing.seconds
    return row


def write_outputs(
    outcomes: list[PieceOutcome], issues: list[AnnotationIssue], settings: PreprocessSettings, out_dir: Path
) -> RunSummary:
    out_dir = Path(out_dir)
    outcomes = sorted(outcomes, key=lambda outcome: outcome.clip_id)
    kept = [outcome for outcome in outcomes if outcome.kept]
    samples = []
    for outcome in kept:
        files = Path(outcome.files_dir)
        metadata = clip_metadata(outcome, settings)
        samples.append(ShardSample(
            clip_id=outcome.clip_id,
            members={
                "mp4": files / VIDEO_FILE,
                "wav": files / AUDIO_FILE,
                "landmarks.npy": files / LANDMARKS_FILE,
                "pose.npy": files / POSE_FILE,
                "json": json.dumps(metadata, sort_keys=True).encode(),
            },
            content_key=f"{outcome.content_key}:{json.dumps(metadata, sort_keys=True)}",
        ))
    shards_dir = out_dir / SHARDS_DIR
    manifests = write_shards(samples, shards_dir, max_samples_per_shard=settings.shards.max_samples_per_shard,
                             max_bytes_per_shard=settings.shards.max_bytes_per_shard)
    shard_of = {clip_id: manifest.tar_name for manifest in manifests for clip_id in manifest.clip_ids}

    tables_dir = out_dir / TABLES_DIR
    write_table_atomic([clip_row(outcome, settings, shard_of) for outcome in outcomes], CLIPS_SCHEMA,
                       tables_dir / CLIPS_TABLE, ["clip_id"])
    timing_rows, seen_jobs = [], set()
    for outcome in outcomes:
        job_id = outcome.job.candidate.candidate_id
        timings = outcome.timings if job_id in seen_jobs else outcome.job.timings + outcome.timings
        seen_jobs.add(job_id)
        timing_rows += [{"candidate_id": outcome.clip_id if timing.stage == "cut" else job_id,
                         "stage": timing.stage, "seconds": timing.seconds, "cached": timing.cached}
                        for timing in timings]
    write_table_atomic(timing_rows, STAGE_TIMINGS_SCHEMA, tables_dir / STAGE_TIMINGS_TABLE,
                       ["candidate_id", "stage"])
    write_table_atomic([vars(issue) for issue in issues], ANNOTATION_ISSUES_SCHEMA,
                       tables_dir / ANNOTATION_ISSUES_TABLE, ["file", "line", "kind", "subject"])

    reasons = Counter(outcome.rejection.reason for outcome in outcomes if outcome.rejection)
    return RunSummary(
        out_dir=str(out_dir), shards_dir=str(shards_dir), tables_dir=str(tables_dir),
        n_clips=len(outcomes), n_kept=len(kept), n_rejected=len(outcomes) - len(kept),
        kept_seconds=round(sum(outcome.stats.duration_s for outcome in kept), 2),
        reasons=dict(reasons), n_shards=len(manifests), n_annotation_issues=len(issues),
    )
