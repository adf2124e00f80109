"""The parquet tables under ``out_dir/tables/``: their schemas (shared by writer and readers) and atomic writes.

- ``clips.parquet``: one row per clip ever seen, kept or rejected, with the reason, timings and face/pose
  statistics. A candidate that was split has one row per piece; one rejected before splitting has one row.
- ``stage_timings.parquet``: one row per (candidate, stage): wall seconds of the run that computed the
  output, and whether this run re-used it from the cache.
- ``annotation_issues.parquet``: every anomaly found in the dataset's annotation files.
- ``transcripts.parquet``: one row per kept clip: Whisper's text, language and segments, and the speech
  check on the Demucs vocals.
- ``text_emotion.parquet``: one row per kept clip: 7 class probabilities of the transcript (null when flagged).
- ``speech_emotion.parquet``: one row per kept clip: one probability column per class of the SER model.
- ``va_windows.parquet``: one row per (kept clip, 2 s window, hop 1 s): arousal, dominance, valence.
- ``action_units.parquet``: one row per (kept clip, frame): one intensity column per AU (``AU12``, ...).
- ``descriptions.parquet``: one row per kept clip: the captioning model's description, its prompt and model,
  and the CLIP text encoder that embedded it.

Every row of the audio tables names the model that produced it (``model``). See docs/tables.md.

Rows are sorted by key so that the same inputs give the same tables, whatever order work finished in.

This module also names the out_dir-level files of a run-level commit (see docs/pipeline.md, "Outputs"):
``publishing.json`` (a publish is under way: written before the first shard, removed after ``summary.json``) and
``summary.json`` (written last; its ``committed`` entry, :func:`committed_state`, records what the run published,
so that ``shards.validate.validate_output`` can tell a complete publish from an interrupted or stale one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shards.schema import INDEX_NAME

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
SUMMARY_FILE = "summary.json"
PUBLISHING_MARKER = "publishing.json"
# What write_table_atomic (and preprocess.run.cache.write_json_atomic) leave behind when killed mid-write.
TABLE_TEMP_PATTERN = re.compile(r"\..+\.tmp-[0-9a-f]+")

TABLES_DIR = "tables"
CLIPS_TABLE = "clips.parquet"
STAGE_TIMINGS_TABLE = "stage_timings.parquet"
ANNOTATION_ISSUES_TABLE = "annotation_issues.parquet"
TRANSCRIPTS_TABLE = "transcripts.parquet"
TEXT_EMOTION_TABLE = "text_emotion.parquet"
SPEECH_EMOTION_TABLE = "speech_emotion.parquet"
VA_WINDOWS_TABLE = "va_windows.parquet"
ACTION_UNITS_TABLE = "action_units.parquet"
DESCRIPTIONS_TABLE = "descriptions.parquet"

KEPT, REJECTED = "kept", "rejected"

CLIPS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("candidate_id", pa.string()),
    ("dataset", pa.string()),
    ("source", pa.string()),  # input video path
    ("status", pa.string()),  # "kept" / "rejected"
    ("reason", pa.string()),  # reject reason code, null when kept
    ("reject_stage", pa.string()),
    ("detail", pa.string()),
    ("notes", pa.list_(pa.string())),  # anomalies that did not stop the clip
    ("source_start_s", pa.float64()),  # piece start/end in the source video, seconds
    ("source_end_s", pa.float64()),
    ("piece_index", pa.int32()),
    ("n_pieces", pa.int32()),
    ("duration_s", pa.float64()),
    ("n_frames", pa.int32()),
    ("source_width", pa.int32()),
    ("source_height", pa.int32()),
    ("source_fps", pa.float64()),
    ("source_rotation", pa.int32()),
    ("crop_x", pa.float64()),
    ("crop_y", pa.float64()),
    ("crop_size", pa.float64()),
    ("upscale_factor", pa.float64()),  # standardise.size / the source crop's side (ffmpeg's whole pixels): > 1 upscaled
    ("crop_method", pa.string()),  # annotated / landmarks / detector (fixed box) / track (follows the face)
    ("crop_max_speed", pa.float64()),  # a track's fastest move, crop sides per second; null for a fixed box
    ("face_frames_fraction", pa.float64()),
    ("face_px_median", pa.float64()),
    ("max_faces", pa.int32()),
    ("multi_face_fraction", pa.float64()),
    ("yaw_mean", pa.float64()),
    ("yaw_abs_p95", pa.float64()),
    ("pitch_mean", pa.float64()),
    ("roll_mean", pa.float64()),
    ("side_profile_fraction", pa.float64()),
    ("speech_fraction", pa.float64()),  # 0-1 of the piece's frames in Silero VAD speech segments (filter no_speech)
    ("audio_padded_fraction", pa.float64()),  # 0-1 of its audio padded with silence: source audio ended early
    ("loudness_in_lufs", pa.float64()),
    ("gain_db", pa.float64()),
    ("shard", pa.string()),  # shard file holding the kept clip
    ("face_model", pa.string()),
    ("settings_profile", pa.string()),
    # wall seconds per stage, from the run that computed them
    ("probe_s", pa.float64()),
    ("locate_s", pa.float64()),
    ("standardise_s", pa.float64()),
    ("faces_s", pa.float64()),
    ("speech_activity_s", pa.float64()),  # Silero VAD over the whole standardised clip
    ("cut_s", pa.float64()),
    ("separate_s", pa.float64()),
    ("transcribe_s", pa.float64()),
    ("text_emotion_s", pa.float64()),
    ("speech_emotion_s", pa.float64()),
    ("valence_arousal_s", pa.float64()),
    ("wav2vec_s", pa.float64()),
    ("action_units_s", pa.float64()),
    ("describe_s", pa.float64()),
    ("text_embedding_s", pa.float64()),
    ("latents_s", pa.float64()),
    # dataset labels (MEAD; null for the other datasets): speaker folder, acted emotion, its intensity level 1-3
    ("subject", pa.string()),
    ("emotion", pa.string()),
    ("emotion_level", pa.int32()),
    ("audio_source", pa.string()),  # the separate audio file the clip's sound was taken from; null: the video's own
    # picture quality (preprocess.video.shots / frame_quality / identity); null when not measured
    ("sharpness", pa.float64()),  # median Laplacian variance of the 128 px grey face crop (filter blurry)
    ("identity_change", pa.float64()),  # spread of the face's identity signature in the piece (filter identity_change)
    ("n_shot_cuts", pa.int32()),  # shot cuts in the whole candidate; null: no shot detection for the dataset
    ("shot_index", pa.int32()),  # the shot the piece lies in (0-based)
    ("frame_quality_s", pa.float64()),  # the frame_quality stage's one decode (content scores, sharpness)
    # the sync expert (preprocess.audio.sync_check; null when the sync check did not run on the piece)
    ("av_offset_frames", pa.int32()),  # SyncNet AV offset, 25 fps frames, + = audio leads video (before any shift)
    ("av_confidence", pa.float64()),  # SyncNet confidence (LSE-C: median - min of mean distances); out_of_sync below
    ("av_min_distance", pa.float64()),  # SyncNet minimum mean distance (LSE-D)
    ("av_shift_applied_frames", pa.int32()),  # audio delayed by this many frames (advanced when < 0); 0: untouched
    ("sync_s", pa.float64()),
])
TIMING_COLUMNS = ("probe_s", "locate_s", "standardise_s", "faces_s", "speech_activity_s", "frame_quality_s", "cut_s", "sync_s", "separate_s",
                  "transcribe_s", "text_emotion_s", "speech_emotion_s", "valence_arousal_s", "wav2vec_s", "action_units_s",
                  "describe_s", "text_embedding_s", "latents_s")

STAGE_TIMINGS_SCHEMA = pa.schema([
    ("candidate_id", pa.string()),
    ("stage", pa.string()),
    ("seconds", pa.float64()),
    ("cached", pa.bool_()),
])

ANNOTATION_ISSUES_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("line", pa.int32()),
    ("kind", pa.string()),
    ("subject", pa.string()),
    ("detail", pa.string()),
])


TRANSCRIPT_SEGMENT = pa.struct([
    ("start_s", pa.float64()),  # seconds from the clip start
    ("end_s", pa.float64()),
    ("text", pa.string()),
    ("avg_logprob", pa.float64()),
    ("no_speech_prob", pa.float64()),
])

TRANSCRIPTS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("status", pa.string()),  # ok / empty / no_speech (not transcribed: no speech in the vocals)
    ("text", pa.string()),  # "" unless status is ok
    ("language", pa.string()),  # ISO 639-1 code from Whisper, null when not transcribed
    ("avg_logprob", pa.float64()),  # duration-weighted mean of the segments' average token log-prob
    ("no_speech_prob", pa.float64()),  # mean over segments
    ("n_segments", pa.int32()),
    ("segments", pa.list_(TRANSCRIPT_SEGMENT)),
    ("has_speech", pa.bool_()),  # the speech-activity check on the vocals
    ("speech_fraction", pa.float64()),  # 0-1 of 30 ms vocals frames above the activity threshold
    ("vocals_rms_dbfs", pa.float64()),  # level of the separated vocals, dBFS (null: digital silence)
    ("separation_status", pa.string()),  # separated / silent_input
    ("separation_model", pa.string()),
    ("model", pa.string()),  # Whisper model reference
])

TEXT_EMOTION_CLASS_COLUMNS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
TEXT_EMOTION_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("status", pa.string()),  # ok / no_speech / empty_transcript / non_english (flagged: probabilities null)
    ("language", pa.string()),
    *[(name, pa.float64()) for name in TEXT_EMOTION_CLASS_COLUMNS],  # probabilities, sum to 1
    ("top_class", pa.string()),
    ("embedding", pa.list_(pa.float32())),  # final <s> hidden state (768 for the default model); null if flagged
    ("model", pa.string()),
])


def speech_emotion_schema(labels: tuple[str, ...]) -> pa.Schema:
    """One probability column per class of the SER model, named by the model's label (default model: neu,
    hap, ang, sad)."""
    return pa.schema([
        ("clip_id", pa.string()),
        ("status", pa.string()),  # ok / no_speech (probabilities null)
        *[(label, pa.float64()) for label in labels],
        ("top_class", pa.string()),
        ("embedding", pa.list_(pa.float32())),  # the classification head's input (256 for the default model)
        ("model", pa.string()),
    ])


VA_WINDOWS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("window_index", pa.int32()),
    ("start_s", pa.float64()),  # seconds from the clip start; window k starts at k * hop_s
    ("end_s", pa.float64()),  # start_s + window_s, or the clip's end for the last window
    ("status", pa.string()),  # ok / no_speech (values null)
    ("arousal", pa.float64()),  # model outputs, roughly 0-1
    ("dominance", pa.float64()),
    ("valence", pa.float64()),
    ("embedding", pa.list_(pa.float32())),  # mean-pooled last hidden state (1024 for the default model)
    ("model", pa.string()),
])


def action_units_schema(au_names: tuple[str, ...]) -> pa.Schema:
    """One float column per AU of the estimator (default: the geometric face-mesh measures, unitless; NaN on
    frames without a face)."""
    return pa.schema([
        ("clip_id", pa.string()),
        ("frame", pa.int32()),  # 0-based frame index within the clip (25 fps)
        ("time_s", pa.float64()),  # frame / fps
        *[(name, pa.float32()) for name in au_names],
        ("model", pa.string()),  # the AU estimator (geometric-facemesh-v1 or the exported detector's file)
    ])


DESCRIPTIONS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("status", pa.string()),  # ok / empty (the model answered nothing; recorded, never invented)
    ("text", pa.string()),
    ("prompt", pa.string()),
    ("model", pa.string()),  # the captioning model reference
    ("n_frames", pa.int32()),  # frames sampled uniformly over the clip and shown to the model
    ("embedding_model", pa.string()),  # the CLIP text encoder of clip_text.npy (null when not embedded)
    ("embedding_shape", pa.list_(pa.int32())),  # [77, 768] for SD 1.5
])


def write_table_atomic(rows: list[dict], schema: pa.Schema, path: Path, sort_by: list[str]) -> None:
    """Write rows (dicts keyed by column name) as parquet, sorted, via a temp file and a rename."""
    write_arrow_table_atomic(pa.Table.from_pylist(rows, schema=schema), path, sort_by)


def write_arrow_table_atomic(table: pa.Table, path: Path, sort_by: list[str]) -> None:
    """Write a table as parquet, sorted, via a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(table):
        table = table.sort_by([(column, "ascending") for column in sort_by])
    _write_through_temp(path, lambda tmp: pq.write_table(table, tmp))


def _write_through_temp(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` a file next to ``path``, fsync it, rename it over ``path`` and fsync the directory (the rename
    lives there: without it a power cut can bring back the old table); returns what ``write`` returned."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        written = write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return written


def remove_table_leftovers(tables_dir: Path) -> list[Path]:
    """Remove the temp files that killed table writes left in ``tables_dir``; returns what was removed.

    Only call this while holding the out_dir's lock (``shards.output_lock``): a live writer's temp file looks
    the same."""
    tables_dir = Path(tables_dir)
    if not tables_dir.is_dir():
        return []
    removed = sorted(path for path in tables_dir.iterdir() if TABLE_TEMP_PATTERN.fullmatch(path.name))
    for path in removed:
        log.warning("removing leftover temp file %s of an interrupted table write", path)
        path.unlink(missing_ok=True)
    return removed


def table_row_counts(tables_dir: Path) -> dict[str, int]:
    """Rows of every table in ``tables_dir`` (from the parquet footers, without reading the data)."""
    tables_dir = Path(tables_dir)
    if not tables_dir.is_dir():
        return {}
    return {path.name: pq.read_metadata(path).num_rows for path in sorted(tables_dir.glob("*.parquet"))
            if not path.name.startswith(".")}


def committed_state(out_dir: Path) -> dict[str, Any]:
    """What a run has published in ``out_dir``, as recorded in ``summary.json``'s ``committed`` entry.

    ``index_sha256``: sha256 of ``shards/index.json`` (None when it is missing); ``shards``: the index's shard
    list (tar name, sample count, sha256), as the index says it, not read from the tars; ``tables``: rows per
    table. Nothing here opens a file that an index entry names."""
    index_path = Path(out_dir) / SHARDS_DIR / INDEX_NAME
    index_sha256, shards = None, []
    if index_path.is_file():
        data = index_path.read_bytes()
        index_sha256 = hashlib.sha256(data).hexdigest()
        try:
            entries = json.loads(data).get("shards", [])
            shards = [{"tar": entry.get("tar"), "n_samples": entry.get("n_samples"), "sha256": entry.get("sha256")}
                      for entry in entries]
        except (ValueError, AttributeError, TypeError):
            shards = []
    return {"index_sha256": index_sha256, "shards": shards,
            "tables": table_row_counts(Path(out_dir) / TABLES_DIR)}


def read_table(out_dir: Path, name: str = CLIPS_TABLE) -> pa.Table:
    return pq.read_table(Path(out_dir) / TABLES_DIR / name)


def merge_tables_atomic(parts: list[Path], path: Path,
                        transform: Callable[[int, pa.Table], pa.Table] | None = None) -> int:
    """Concatenate parquet files (one per partition, in order) into ``path`` via a temp file and a rename, one
    part in memory at a time (a row group each), so memory does not grow with the dataset. Empty parts are
    skipped; the schema is the first non-empty part's (a part without rows may lack model-dependent columns), or
    the first part's when all are empty. ``transform(part_number, table)`` may rewrite a part's table before it is
    written (e.g. a column naming a per-partition file). Returns the rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schemas = [pq.read_schema(part) for part in parts]
    counts = [pq.read_metadata(part).num_rows for part in parts]
    schema = next((schema for schema, count in zip(schemas, counts, strict=True) if count), schemas[0])

    def concatenate(tmp: Path) -> int:
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for number, (part, count) in enumerate(zip(parts, counts, strict=True)):
                if not count:
                    continue
                table = pq.read_table(part)
                if transform is not None:
                    table = transform(number, table)
                writer.write_table(table.cast(schema))
                rows += len(table)
        return rows

    return _write_through_temp(path, concatenate)
