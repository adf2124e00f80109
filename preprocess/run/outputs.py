"""Stage: write the kept clips into WebDataset shards and every clip into the parquet tables.

Runs once per flow run, after all clips are done. Clips are ordered by ``clip_id`` before being assigned to
shards, so the shards and tables depend only on the inputs and settings, not on which worker finished first;
this is what makes a killed-and-resumed run byte-identical to an uninterrupted one.

Kept clips also carry the audio stages' outputs: ``vocals.wav``, ``wav2vec.npy`` and the emotion inputs
``emotion.npz`` (assembled here from the three emotion stages' arrays; a zip written with fixed time stamps,
so that it is byte-identical from run to run), and one row each in ``transcripts``, ``text_emotion`` and ``speech_emotion`` plus one row per window in
``va_windows``; and the visual stages' outputs: ``aus.npy`` (one row per frame in ``action_units``),
``clip_text.npy`` (the description's CLIP text embedding; the text in ``descriptions``) and, when enabled,
``latents.npy``. With tiny models the summary says loudly that those numbers mean nothing.

Publishing is one run-level commit (``publish_outputs``): ``publishing.json`` first, then the shards, then the
tables, then ``summary.json`` (what was committed), then the marker is removed. Every per-clip step that can fail
(assembling a sample, reading a stage's arrays, the shard schema's checks) runs before the first write, and a clip
that fails it is a rejection row (``duplicate_id``, ``invalid_sample``, ``error`` at stage ``write``), never a
crash of the run after all its work.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from preprocess.audio.text_emotion import TEXT_EMOTION_CLASSES
from preprocess.audio.valence_arousal import VA_FILE_COLUMNS
from preprocess.pipeline import AUDIO_STAGES, VISUAL_STAGES
from preprocess.run.cache import stable_hash
from preprocess.run.failures import RunFailed, is_environment_error
from preprocess.run.job import PieceOutcome
from preprocess.run.model_loading import is_tiny_reference
from preprocess.run.records import AnnotationIssue, Rejection
from preprocess.run.settings import PreprocessSettings
from preprocess.video.faces import LANDMARKS_FILE, POSE_FILE
from preprocess.video.standardise import AUDIO_FILE, VIDEO_FILE, upscale_factor
from preprocess.visual.action_units import GeometricAUs
from shards.schema import (
    AUS_MEMBER,
    DESCRIPTION_MEMBER,
    EMOTION_ARRAYS,
    EMOTION_MEMBER,
    EMOTION_VALID_ARRAYS,
    LATENTS_MEMBER,
    SCHEMA_VERSION,
    VOCALS_MEMBER,
    WAV2VEC_MEMBER,
    ShardManifest,
    encode_json,
    file_sha256,
)
from shards.tables import (
    ACTION_UNITS_TABLE,
    ANNOTATION_ISSUES_SCHEMA,
    ANNOTATION_ISSUES_TABLE,
    CLIPS_SCHEMA,
    CLIPS_TABLE,
    DESCRIPTIONS_SCHEMA,
    DESCRIPTIONS_TABLE,
    KEPT,
    PUBLISHING_MARKER,
    REJECTED,
    SHARDS_DIR,
    SPEECH_EMOTION_TABLE,
    STAGE_TIMINGS_SCHEMA,
    STAGE_TIMINGS_TABLE,
    SUMMARY_FILE,
    TABLES_DIR,
    TEXT_EMOTION_SCHEMA,
    TEXT_EMOTION_TABLE,
    TRANSCRIPTS_SCHEMA,
    TRANSCRIPTS_TABLE,
    VA_WINDOWS_SCHEMA,
    VA_WINDOWS_TABLE,
    action_units_schema,
    committed_state,
    merge_tables_atomic,
    remove_table_leftovers,
    speech_emotion_schema,
    write_arrow_table_atomic,
    write_table_atomic,
)
from shards.writer import (
    ShardSample,
    check_samples,
    fsync_path,
    publish_shards,
    write_atomically,
    write_shards,
)

log = logging.getLogger(__name__)
PIECE_STAGES = ("cut", *AUDIO_STAGES, *VISUAL_STAGES)  # stages timed per piece (clip id), not per candidate
TINY_MODELS_WARNING = ("TINY RANDOM MODELS: transcripts, emotions, valence/arousal, wav2vec features, descriptions, "
                       "their embeddings and latents in these outputs MEAN NOTHING (profile 'tiny' exercises the "
                       "pipeline only)")


def active_model_kinds(settings: PreprocessSettings) -> tuple[str, ...]:
    """The model stages this run uses (the optional visual ones only when enabled)."""
    kinds = ["separation", "transcription", "text_emotion", "speech_emotion", "valence_arousal", "wav2vec"]
    if settings.visual.description.enabled:
        kinds += ["captioning", "text_encoder"]
    if settings.visual.latents.enabled:
        kinds.append("vae")
    return tuple(kinds)


def tiny_model_stages(settings: PreprocessSettings) -> list[str]:
    """The model stages whose configured model is a tiny random one."""
    return [kind for kind in active_model_kinds(settings) if is_tiny_reference(getattr(settings.models, kind).model)]


def model_refs(settings: PreprocessSettings) -> dict[str, str]:
    """Which model each model stage of this run used (the AU estimator included)."""
    refs = {kind: getattr(settings.models, kind).model for kind in active_model_kinds(settings)}
    chosen = settings.visual.action_units
    refs["action_units"] = (GeometricAUs.name if chosen.backend == "geometric"
                            else f"torch.export:{Path(chosen.exported_model or '').name}")
    return refs


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
    models: dict[str, str]
    n_with_speech: int
    n_described: int
    warning: str | None  # set when tiny random models produced some of the features

    def as_text(self) -> str:
        lines = [f"WARNING: {self.warning}"] if self.warning else []
        lines += [
            f"clips seen: {self.n_clips}  kept: {self.n_kept} ({self.kept_seconds:.1f} s of video)  "
            f"rejected: {self.n_rejected}",
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  rejected {reason}: {count}")
        lines += [
            f"annotation issues recorded: {self.n_annotation_issues}",
            f"shards ({self.n_shards}): {self.shards_dir}",
            f"tables: {self.tables_dir}",
            f"kept clips with speech in the vocals: {self.n_with_speech} of {self.n_kept}",
            f"kept clips with a non-empty description: {self.n_described} of {self.n_kept}",
            "models: " + ", ".join(f"{kind}={ref}" for kind, ref in self.models.items()),
        ]
        if self.warning:
            lines.append(f"WARNING: {self.warning}")
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
        "models": {"face_mesh": settings.models.face_mesh, "face_detection": settings.models.face_detection,
                   **model_refs(settings)},
        "settings_profile": settings.profile,
        "schema_version": SCHEMA_VERSION,
        **audio_metadata(outcome, settings),
        **visual_metadata(outcome),
    }


def visual_metadata(outcome: PieceOutcome) -> dict:
    """The ``action_units``, ``description`` and ``latents`` entries of a kept clip's json."""
    features = outcome.features
    aus = features["action_units"]
    entries = {"action_units": {"member": AUS_MEMBER, "names": aus["au_names"], "model": aus["model"],
                                "dtype": "float32", "n_face_frames": aus["n_face_frames"]}}
    if "describe" in features:
        described = features["describe"]
        entries["description"] = {"text": described["text"], "status": described["status"],
                                  "prompt": described["prompt"], "model": described["model"]}
        if "text_embedding" in features:
            embedded = features["text_embedding"]
            entries["description"].update(member=DESCRIPTION_MEMBER, embedding_model=embedded["model"],
                                          embedding_shape=embedded["shape"], embedding_dtype="float16")
    if "latents" in features:
        latents = features["latents"]
        # every frame is encoded, so the reference frame a trainer picks is one of them
        entries["latents"] = {"member": LATENTS_MEMBER, "model": latents["model"], "shape": latents["shape"],
                              "dtype": "float16", "scaling_factor": latents["scaling_factor"],
                              "posterior": "mean"}
    return entries


def audio_metadata(outcome: PieceOutcome, settings: PreprocessSettings) -> dict:
    """The ``audio`` and ``emotion`` entries of a kept clip's json: speech check, transcript, and the layout of
    the emotion members, so that a trainer can split them without knowing the models."""
    audio = outcome.features
    separated, transcript = audio["separate"], audio["transcribe"]
    text, speech, va = audio["text_emotion"], audio["speech_emotion"], audio["valence_arousal"]
    wav2vec = audio["wav2vec"]
    return {
        "audio": {
            "has_speech": separated["has_speech"],
            "speech_fraction": separated["speech_fraction"],
            "separation_status": separated["status"],
            "transcript": transcript["text"],
            "language": transcript["language"],
            "transcript_status": transcript["status"],
            # layers: the hidden-state indices stored (axis 1 of the shape); the training loader checks them
            "wav2vec": {"shape": [wav2vec["n_frames"], wav2vec["n_layers"], wav2vec["hidden_size"]],
                        "layers": list(wav2vec["layers"]), "dtype": "float16",
                        "alignment": "linear interpolation of 50 Hz features at frame centres"},
        },
        "emotion": {
            "member": EMOTION_MEMBER,
            "text": {"valid": text["status"] == "ok", "status": text["status"],
                     "classes": list(TEXT_EMOTION_CLASSES), "embedding_dim": text["embedding_dim"]},
            "ser": {"valid": speech["status"] == "ok", "status": speech["status"],
                    "classes": list(speech["labels"]), "embedding_dim": speech["embedding_dim"]},
            "va": {"valid": va["status"] == "ok", "status": va["status"],
                   "columns": list(VA_FILE_COLUMNS), "embedding_dim": va["embedding_dim"],
                   "window_s": va["window_s"], "hop_s": va["hop_s"], "n_windows": len(va["windows"])},
        },
    }


def emotion_arrays(outcome: PieceOutcome) -> dict[str, np.ndarray]:
    """The arrays of ``emotion.npz``: each stage's ``.npy`` split into probabilities/values and embedding."""
    audio = outcome.features
    text, speech, va = audio["text_emotion"], audio["speech_emotion"], audio["valence_arousal"]
    text_array = np.load(Path(text["dir"]) / text["file"])
    speech_array = np.load(Path(speech["dir"]) / speech["file"])
    va_array = np.load(Path(va["dir"]) / va["file"])
    n_text, n_speech, n_va = len(TEXT_EMOTION_CLASSES), len(speech["labels"]), len(VA_FILE_COLUMNS)
    parts = (text_array[:n_text], text_array[n_text:], speech_array[:n_speech], speech_array[n_speech:],
             va_array[:, :n_va], va_array[:, n_va:])
    valid = [np.uint8(result["status"] == "ok") for result in (text, speech, va)]
    return {**{name: part.astype(np.float32) for name, part in zip(EMOTION_ARRAYS, parts, strict=True)},
            **{name: np.asarray(flag) for name, flag in zip(EMOTION_VALID_ARRAYS, valid, strict=True)}}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed npz (what ``np.savez`` writes, readable by ``np.load``) with fixed zip time stamps:
    ``np.savez`` stamps the current time, which would change the shard's bytes on every run."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.save(data, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), data.getvalue())
    return buffer.getvalue()


def audio_members(outcome: PieceOutcome) -> dict[str, Path | bytes]:
    audio = outcome.features
    return {
        VOCALS_MEMBER: Path(audio["separate"]["dir"]) / audio["separate"]["vocals"],
        WAV2VEC_MEMBER: Path(audio["wav2vec"]["dir"]) / audio["wav2vec"]["file"],
        EMOTION_MEMBER: npz_bytes(emotion_arrays(outcome)),
    }


def visual_members(outcome: PieceOutcome) -> dict[str, Path]:
    members = {AUS_MEMBER: "action_units", DESCRIPTION_MEMBER: "text_embedding", LATENTS_MEMBER: "latents"}
    return {member: Path(outcome.features[stage]["dir"]) / outcome.features[stage]["file"]
            for member, stage in members.items() if stage in outcome.features}


def visual_rows(outcome: PieceOutcome, fps: int) -> tuple[pa.Table, dict | None]:
    """(action_units table, one row per frame, built from the array without a Python object per frame;
    descriptions row or None) of a kept clip."""
    features, clip_id = outcome.features, outcome.clip_id
    aus = features["action_units"]
    values = np.load(Path(aus["dir"]) / aus["file"]).astype(np.float32)
    au_names = tuple(aus["au_names"])
    frames = np.arange(len(values), dtype=np.int32)
    columns = {"clip_id": pa.array([clip_id] * len(values), pa.string()), "frame": pa.array(frames),
               "time_s": pa.array(np.round(frames / fps, 4)),
               **{name: pa.array(values[:, column], mask=np.isnan(values[:, column]), type=pa.float32())
                  for column, name in enumerate(au_names)},
               "model": pa.array([aus["model"]] * len(values), pa.string())}
    au_table = pa.Table.from_pydict(columns, schema=action_units_schema(au_names))
    description = None
    if "describe" in features:
        described, embedded = features["describe"], features.get("text_embedding")
        description = {"clip_id": clip_id, "status": described["status"], "text": described["text"],
                       "prompt": described["prompt"], "model": described["model"], "n_frames": described["n_frames"],
                       "embedding_model": embedded["model"] if embedded else None,
                       "embedding_shape": embedded["shape"] if embedded else None}
    return au_table, description


def _embedding(result: dict, offset: int, row: int | None = None) -> list[float] | None:
    """The embedding part of a stage's .npy (after ``offset`` leading values), or None for a flagged row."""
    if result["status"] != "ok":
        return None
    array = np.load(Path(result["dir"]) / result["file"])
    values = array[offset:] if row is None else array[row, offset:]
    return values.astype(np.float32).tolist()


def audio_rows(outcome: PieceOutcome) -> tuple[dict, dict, dict, list[dict]]:
    """(transcripts row, text_emotion row, speech_emotion row, va_windows rows) of a kept clip."""
    audio, clip_id = outcome.features, outcome.clip_id
    separated, transcript = audio["separate"], audio["transcribe"]
    transcript_row = {
        "clip_id": clip_id, "status": transcript["status"], "text": transcript["text"],
        "language": transcript["language"], "avg_logprob": transcript["avg_logprob"],
        "no_speech_prob": transcript["no_speech_prob"], "n_segments": len(transcript["segments"]),
        "segments": [{key: segment[key] for key in ("start_s", "end_s", "text", "avg_logprob", "no_speech_prob")}
                     for segment in transcript["segments"]],
        "has_speech": separated["has_speech"], "speech_fraction": separated["speech_fraction"],
        "vocals_rms_dbfs": separated["vocals_rms_dbfs"], "separation_status": separated["status"],
        "separation_model": separated["model"], "model": transcript["model"],
    }
    text = audio["text_emotion"]
    text_row = {"clip_id": clip_id, "status": text["status"], "language": transcript["language"],
                **(text["probabilities"] or {}), "top_class": text["top_class"],
                "embedding": _embedding(text, len(TEXT_EMOTION_CLASSES)), "model": text["model"]}
    speech = audio["speech_emotion"]
    speech_probabilities = (dict(zip(speech["labels"], speech["probabilities"], strict=True))
                            if speech["probabilities"] else {})
    speech_row = {"clip_id": clip_id, "status": speech["status"], **speech_probabilities,
                  "top_class": speech["top_class"],
                  "embedding": _embedding(speech, len(speech["labels"])), "model": speech["model"]}
    va = audio["valence_arousal"]
    va_rows = [{"clip_id": clip_id, "window_index": index, **window, "status": va["status"],
                "embedding": _embedding(va, len(VA_FILE_COLUMNS), index), "model": va["model"]}
               for index, window in enumerate(va["windows"])]
    return transcript_row, text_row, speech_row, va_rows


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
        "crop_max_speed": job.crop_max_speed,
        "shard": shard_of.get(outcome.clip_id),
        "face_model": settings.models.face_mesh if job.faces else None,
        "settings_profile": settings.profile,
        "subject": job.candidate.subject,
        "emotion": job.candidate.emotion,
        "emotion_level": job.candidate.emotion_level,
        "audio_source": job.candidate.audio_source,
    }
    if job.crop_box:
        row.update(crop_x=job.crop_box.x, crop_y=job.crop_box.y, crop_size=job.crop_box.w,
                   upscale_factor=upscale_factor(job.crop_box.w, settings.standardise.size))
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
    if sync := outcome.features.get("sync"):  # also on a piece the sync check rejected: its figures say why
        row.update(av_offset_frames=sync["offset_frames"], av_confidence=sync["confidence"],
                   av_min_distance=sync["min_distance"], av_shift_applied_frames=sync["shift_applied_frames"])
    for timing in job.timings + outcome.timings:
        row[f"{timing.stage}_s"] = timing.seconds
    return row


def _outcome_order(outcome: PieceOutcome) -> tuple:
    """Clip id first (shards and tables are sorted by it); source, start and piece break ties between duplicate
    ids, so that which duplicate counts as "the later one" does not depend on which worker finished first."""
    candidate = outcome.job.candidate
    return outcome.clip_id, candidate.source, candidate.start_s, outcome.piece_index


@dataclass
class _KeptClip:
    """Everything a kept clip contributes to the shards and tables, assembled before anything is written."""

    sample: ShardSample
    audio: tuple[dict, dict, dict, list[dict]]
    visual: tuple[pa.Table, dict | None]


def _assemble(outcome: PieceOutcome, settings: PreprocessSettings) -> _KeptClip:
    files = Path(outcome.files_dir)
    metadata = clip_metadata(outcome, settings)
    feature_keys = ":".join(outcome.features[stage]["key"] for stage in (*AUDIO_STAGES, *VISUAL_STAGES)
                            if stage in outcome.features)
    sample = ShardSample(
        clip_id=outcome.clip_id,
        members={
            "mp4": files / VIDEO_FILE,
            "wav": files / AUDIO_FILE,
            "landmarks.npy": files / LANDMARKS_FILE,
            "pose.npy": files / POSE_FILE,
            "json": json.dumps(metadata, sort_keys=True).encode(),
            **audio_members(outcome),
            **visual_members(outcome),
        },
        content_key=f"{outcome.content_key}:{feature_keys}:{json.dumps(metadata, sort_keys=True)}",
    )
    check_samples([sample])
    for value in sample.members.values():
        if isinstance(value, Path) and not value.is_file():  # a cached output gone since its stage ran
            raise FileNotFoundError(f"{value} (member of {outcome.clip_id}) is missing")
    return _KeptClip(sample, audio_rows(outcome), visual_rows(outcome, settings.standardise.fps))


def _assemble_kept(outcomes: list[PieceOutcome], settings: PreprocessSettings
                   ) -> tuple[list[PieceOutcome], dict[str, _KeptClip]]:
    """Assemble every kept clip's sample and rows; a clip that cannot be is rejected here, never the run.

    By the time this runs, all the stage work is done: one clip with a repeated id (discovery de-duplicates, this
    is the safety net), a sample the shard schema refuses (``shards.writer.check_samples``) or a stage output that
    cannot be read must not throw that work away. The first outcome of an id wins; a later kept one is rejected
    ``duplicate_id``; a refused sample ``invalid_sample``; an unreadable output ``error`` (not cached: the next run
    retries it). Environment failures (a full disk, ...) still stop the run."""
    seen: set[str] = set()
    screened, kept = [], {}
    for outcome in outcomes:
        if outcome.kept and outcome.clip_id in seen:
            outcome = replace(outcome, rejection=Rejection(
                "write", "duplicate_id", f"clip id {outcome.clip_id!r} already taken by an earlier clip; this one "
                f"comes from {outcome.job.candidate.source} at {outcome.job.candidate.start_s} s"))
        elif outcome.kept:
            try:
                kept[outcome.clip_id] = _assemble(outcome, settings)
            except ValueError as error:
                outcome = replace(outcome, rejection=Rejection("write", "invalid_sample", str(error)[:500]))
            except Exception as error:
                if is_environment_error(error):
                    raise
                outcome = replace(outcome, rejection=Rejection(
                    "write", "error", f"{type(error).__name__}: {error}"[:500]))
            if outcome.rejection is not None:
                log.warning("%s: not published: %s: %s", outcome.clip_id, outcome.rejection.reason,
                            outcome.rejection.detail)
        seen.add(outcome.clip_id)
        screened.append(outcome)
    return screened, kept


PARTITION_MARKER = "partition.json"  # in a partition's directory, written last: the partition is done
# The tables each partition writes for its own clips; publishing concatenates them (annotation issues are the
# dataset's, written once at publish).
PARTITION_TABLES = (CLIPS_TABLE, STAGE_TIMINGS_TABLE, TRANSCRIPTS_TABLE, TEXT_EMOTION_TABLE, SPEECH_EMOTION_TABLE,
                    VA_WINDOWS_TABLE, ACTION_UNITS_TABLE, DESCRIPTIONS_TABLE)


def write_partition(outcomes: list[PieceOutcome], settings: PreprocessSettings, part_dir: Path,
                    record: dict[str, Any]) -> dict[str, Any]:
    """Write one partition's shards (``part_dir/shards``) and tables (``part_dir/tables``), then its marker
    ``partition.json`` (``record`` plus what was written: counts, shard manifests), and return the marker's content.

    Every per-clip step that can fail runs before the first write (``_assemble_kept``), so a bad clip becomes a
    rejection row instead of a half-written output. The marker is removed first: while the files change, the
    partition is not done. Memory holds one partition's clips, never the dataset's."""
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / PARTITION_MARKER).unlink(missing_ok=True)
    outcomes, assembled = _assemble_kept(sorted(outcomes, key=_outcome_order), settings)
    kept = [outcome for outcome in outcomes if outcome.kept and outcome.clip_id in assembled]
    samples = [assembled[outcome.clip_id].sample for outcome in kept]
    manifests = write_shards(samples, part_dir / SHARDS_DIR, max_samples_per_shard=settings.shards.max_samples_per_shard,
                             max_bytes_per_shard=settings.shards.max_bytes_per_shard)
    shard_of = {clip_id: manifest.tar_name for manifest in manifests for clip_id in manifest.clip_ids}
    write_tables(outcomes, kept, assembled, None, settings, part_dir, shard_of)
    visual = [assembled[outcome.clip_id].visual for outcome in kept]
    reasons = Counter(outcome.rejection.reason for outcome in outcomes if outcome.rejection)
    done = {**record, "n_clips": len(outcomes), "n_kept": len(kept), "n_rejected": len(outcomes) - len(kept),
            "kept_seconds": sum(outcome.stats.duration_s for outcome in kept), "reasons": dict(sorted(reasons.items())),
            "n_with_speech": sum(1 for outcome in kept if outcome.features["separate"]["has_speech"]),
            "n_described": sum(1 for _, row in visual if row and row["status"] == "ok"),
            "shards": [manifest.to_json() for manifest in manifests]}
    write_atomically(part_dir / PARTITION_MARKER, encode_json(done))
    return done


def partition_file_problem(part_dir: Path, record: dict[str, Any]) -> str | None:
    """Why a written partition's files cannot be published as they are (None when they can): each shard its
    marker lists must exist with its recorded size and sha256 (what the publish copies), each table must exist.
    Hashing costs one read of the partition's shards per run; it is what keeps a corrupted or deleted cache file
    from being trusted (``work/`` is a cache that may be deleted in part)."""
    try:
        manifests = [ShardManifest.from_json(entry) for entry in record["shards"]]
    except (KeyError, TypeError, ValueError) as error:
        return f"its marker's shard list cannot be read ({type(error).__name__}: {error})"
    for manifest in manifests:
        tar = part_dir / SHARDS_DIR / manifest.tar_name
        if not tar.is_file():
            return f"{tar} is missing"
        if tar.stat().st_size != manifest.n_bytes:
            return f"{tar} has {tar.stat().st_size} bytes, its manifest says {manifest.n_bytes}"
        if file_sha256(tar) != manifest.sha256:
            return f"{tar} does not have its recorded sha256"
    missing = [name for name in PARTITION_TABLES if not (part_dir / TABLES_DIR / name).is_file()]
    return f"its tables {', '.join(missing)} are missing" if missing else None



def _publish_parts(parts: list[tuple[Path, dict[str, Any]]], issues: list[AnnotationIssue],
                   settings: PreprocessSettings, out_dir: Path) -> RunSummary:
    """Publish written partitions (in order) as the out_dir's shards and tables; returns the run's summary.
    Shards are copied (hard-linked with ``shards.publish_hard_links``; ``shards.writer.publish_shards``) and renumbered; each table is the partitions' tables
    concatenated one partition at a time (``shards.tables.merge_tables_atomic``), the clips table's ``shard``
    column renamed to the published names. Call it under the out_dir's lock (it removes temp files)."""
    out_dir = Path(out_dir)
    shards_dir, tables_dir = out_dir / SHARDS_DIR, out_dir / TABLES_DIR
    part_manifests = [[ShardManifest.from_json(entry) for entry in record["shards"]] for _, record in parts]
    manifests = publish_shards([(part_dir / SHARDS_DIR, local) for (part_dir, _), local
                                in zip(parts, part_manifests, strict=True)], shards_dir,
                               hard_links=settings.shards.publish_hard_links)
    published_names, offset = [], 0
    for local in part_manifests:
        published_names.append({manifest.tar_name: manifests[offset + number].tar_name
                                for number, manifest in enumerate(local)})
        offset += len(local)

    def published_shard_names(number: int, table: pa.Table) -> pa.Table:
        renamed = [published_names[number].get(name) if name else None
                   for name in table.column("shard").to_pylist()]
        return table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(renamed, pa.string()))

    remove_table_leftovers(tables_dir)
    for name in PARTITION_TABLES:
        merge_tables_atomic([part_dir / TABLES_DIR / name for part_dir, _ in parts], tables_dir / name,
                            published_shard_names if name == CLIPS_TABLE else None)
    write_table_atomic([vars(issue) for issue in issues], ANNOTATION_ISSUES_SCHEMA,
                       tables_dir / ANNOTATION_ISSUES_TABLE, ["file", "line", "kind", "subject"])
    records = [record for _, record in parts]
    reasons: Counter = Counter()
    for record in records:
        reasons.update(record["reasons"])
    tiny = tiny_model_stages(settings)
    n_clips, n_kept = sum(record["n_clips"] for record in records), sum(record["n_kept"] for record in records)
    return RunSummary(
        out_dir=str(out_dir), shards_dir=str(shards_dir), tables_dir=str(tables_dir),
        n_clips=n_clips, n_kept=n_kept, n_rejected=n_clips - n_kept,
        kept_seconds=round(sum(record["kept_seconds"] for record in records), 2),
        reasons=dict(reasons), n_shards=len(manifests), n_annotation_issues=len(issues),
        models=model_refs(settings),
        n_with_speech=sum(record["n_with_speech"] for record in records),
        n_described=sum(record["n_described"] for record in records),
        warning=f"{TINY_MODELS_WARNING} (stages: {', '.join(tiny)})" if tiny else None,
    )


def _single_partition(outcomes: list[PieceOutcome], settings: PreprocessSettings,
                      out_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Finished outcomes written as one partition (callers that hold every outcome at once: tests, tools)."""
    key = stable_hash("outcomes", sorted(outcome.clip_id for outcome in outcomes))
    part_dir = Path(out_dir) / "work" / "partitions" / f"all-{key[:16]}"
    return [(part_dir, write_partition(outcomes, settings, part_dir, {"key": key, "name": "all", "retry": True}))]


def write_outputs(
    outcomes: list[PieceOutcome], issues: list[AnnotationIssue], settings: PreprocessSettings, out_dir: Path
) -> RunSummary:
    """Write the shards, then the tables, from finished outcomes held in memory; returns the run's summary.
    (The flow writes partition by partition instead: ``write_partition``, then ``publish_partitions``.)"""
    return _publish_parts(_single_partition(outcomes, settings, out_dir), issues, settings, out_dir)


def write_tables(outcomes: list[PieceOutcome], kept: list[PieceOutcome], assembled: dict[str, _KeptClip],
                 issues: list[AnnotationIssue] | None, settings: PreprocessSettings, out_dir: Path,
                 shard_of: dict[str, str]) -> None:
    """Every table (the annotation issues only when given), each written atomically; temp files of an interrupted
    earlier write are removed first."""
    tables_dir = out_dir / TABLES_DIR
    remove_table_leftovers(tables_dir)
    write_table_atomic([clip_row(outcome, settings, shard_of) for outcome in outcomes], CLIPS_SCHEMA,
                       tables_dir / CLIPS_TABLE, ["clip_id"])
    timing_rows, seen_jobs = [], set()
    for outcome in outcomes:
        job_id = outcome.job.candidate.candidate_id
        timings = outcome.timings if job_id in seen_jobs else outcome.job.timings + outcome.timings
        seen_jobs.add(job_id)
        timing_rows += [{"candidate_id": outcome.clip_id if timing.stage in PIECE_STAGES else job_id,
                         "stage": timing.stage, "seconds": timing.seconds, "cached": timing.cached}
                        for timing in timings]
    write_table_atomic(timing_rows, STAGE_TIMINGS_SCHEMA, tables_dir / STAGE_TIMINGS_TABLE,
                       ["candidate_id", "stage"])
    if issues is not None:
        write_table_atomic([vars(issue) for issue in issues], ANNOTATION_ISSUES_SCHEMA,
                           tables_dir / ANNOTATION_ISSUES_TABLE, ["file", "line", "kind", "subject"])
    rows = [assembled[outcome.clip_id].audio for outcome in kept]
    write_table_atomic([row[0] for row in rows], TRANSCRIPTS_SCHEMA, tables_dir / TRANSCRIPTS_TABLE, ["clip_id"])
    write_table_atomic([row[1] for row in rows], TEXT_EMOTION_SCHEMA, tables_dir / TEXT_EMOTION_TABLE, ["clip_id"])
    labels = tuple(kept[0].features["speech_emotion"]["labels"]) if kept else ()
    write_table_atomic([row[2] for row in rows], speech_emotion_schema(labels), tables_dir / SPEECH_EMOTION_TABLE,
                       ["clip_id"])
    write_table_atomic([window for row in rows for window in row[3]], VA_WINDOWS_SCHEMA,
                       tables_dir / VA_WINDOWS_TABLE, ["clip_id", "window_index"])
    visual = [assembled[outcome.clip_id].visual for outcome in kept]
    au_names = tuple(kept[0].features["action_units"]["au_names"]) if kept else ()
    au_tables = [au_table for au_table, _ in visual]
    write_arrow_table_atomic(pa.concat_tables(au_tables) if au_tables else action_units_schema(au_names).empty_table(),
                             tables_dir / ACTION_UNITS_TABLE, ["clip_id", "frame"])
    write_table_atomic([row for _, row in visual if row], DESCRIPTIONS_SCHEMA, tables_dir / DESCRIPTIONS_TABLE,
                       ["clip_id"])


def publish_partitions(parts: list[tuple[Path, dict[str, Any]]], issues: list[AnnotationIssue],
                       settings: PreprocessSettings, out_dir: Path, *, run_id: str,
                       extra: dict[str, Any]) -> tuple[RunSummary, dict[str, Any]]:
    """The run-level commit of written partitions ``(partition dir, its marker's content)``, in order: marker,
    shards, tables, ``summary.json`` last, marker removed.

    Returns the run's summary and what ``summary.json`` now holds (the summary plus ``extra``, run id, status and
    the committed state).

    ``publishing.json`` (run id, pid, host, start time) exists exactly while shards, tables and summary may
    disagree; ``summary.json`` is replaced atomically, last, and records what was committed
    (``shards.tables.committed_state``: index.json's sha256 and shard list, rows per table) with status
    ``complete``. A kill anywhere in between leaves the marker and a summary that no longer matches, which
    ``shards.validate.validate_output`` reports; the next run redoes the publish. Call under the out_dir's lock."""
    out_dir = Path(out_dir)
    # every source is checked before anything published changes: a partition file deleted or damaged since its
    # partition was verified fails the run here, and the published dataset stays as it was
    for part_dir, part_record in parts:
        problem = partition_file_problem(part_dir, part_record)
        if problem is not None:
            raise RunFailed(f"cannot publish partition {part_record.get('name')} ({part_dir}): {problem}. Nothing "
                            f"in {out_dir} was changed; rerun to redo that partition")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / PUBLISHING_MARKER
    started = time.time()
    write_atomically(marker, encode_json({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                          "started": started, "started_at": _iso(started)}))
    summary = _publish_parts(parts, issues, settings, out_dir)
    record = {**json.loads(json.dumps(vars(summary))), **extra, "run_id": run_id, "status": "complete",
              "finished_at": _iso(time.time()), "n_partitions": len(parts), "committed": committed_state(out_dir)}
    write_atomically(out_dir / SUMMARY_FILE, encode_json(record))
    marker.unlink()
    fsync_path(out_dir)
    return summary, record


def publish_outputs(outcomes: list[PieceOutcome], issues: list[AnnotationIssue], settings: PreprocessSettings,
                    out_dir: Path, *, run_id: str, extra: dict[str, Any]) -> tuple[RunSummary, dict[str, Any]]:
    """``publish_partitions`` for finished outcomes held in memory, written as one partition first."""
    return publish_partitions(_single_partition(outcomes, settings, out_dir), issues, settings, out_dir,
                              run_id=run_id, extra=extra)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
