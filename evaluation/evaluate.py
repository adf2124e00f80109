"""``synchrorama evaluate``: generated clips against ground-truth clips, per clip and aggregated, in the layout of
the paper's Table 1 (section 4): PSNR, SSIM, LPIPS, FID, FVD, E-FID, AU F1, Sync (LSE-C), CCC_V, CCC_A, plus
LSE-D and the sync offset.

Clips are matched by id (file name without extension) between the two folders. Each ground-truth clip is
decoded at its own size; its generated clip is decoded at that size too (scaled by ffmpeg when it differs,
noted) and both are cut to the shorter frame count (noted). Per clip, as ``evaluation.metrics`` defines them:

- PSNR, SSIM, LPIPS: frame against frame, mean over frames;
- FID, FVD, E-FID: also per clip (frames, 16-frame windows, frames as samples: small-sample and biased, only
  for finding outliers; FVD needs two windows, i.e. 32 frames); the aggregate pools every clip's features;
- AU F1: the preprocessing AU estimator (``preprocess.visual.action_units.au_backend``) on both clips' face meshes;
- Sync: ``model.syncnet.sync_offset`` (the project's one SyncNet) on the generated clip's frames, each cut as
  syncnet_python's ``crop_video`` cuts them (``model.syncnet.sync_crops``, from the face mesh's box; the whole
  frame where no face is found), and its own audio track;
- CCC_V / CCC_A: the preprocessing valence-arousal model, which is AUDIO-based (audEERING's wav2vec2 on 2 s
  windows, hop 1 s; ``preprocess.audio.valence_arousal``), run on each clip's own audio track (not Demucs-separated,
  unlike preprocessing). A generated clip carries its driving audio, so when that is the ground truth's audio
  these CCCs are ~1 and only say that the audio track survived; the paper's CCC is presumably face-based, which
  needs a face valence-arousal model this project does not have. Per clip over its windows; the aggregate is
  the CCC of all windows pooled.

Aggregates: PSNR, SSIM, LPIPS, AU F1, Sync, LSE-D: means over clips; |offset|: mean absolute offset.
Outputs in ``out``: ``clips.parquet`` (one row per clip), ``summary.parquet`` (one row), ``table.md`` (both
tables and what produced each number), ``evaluation.json`` (settings and models).

With a checkpoint and a shard set, ``evaluation.from_checkpoint`` generates the clips first and calls
``evaluate_folders`` with what generated them (``run``: checkpoint, step, weights sha256, generation settings),
which the outputs record next to the metric settings.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from evaluation import metrics, networks
from evaluation.expression import ExpressionExtractor, MeshExpression
from evaluation.settings import EvaluationSettings, build_tiny_networks

log = logging.getLogger("evaluation")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
SAMPLE_RATE = 16000
TINY_WARNING = ("TINY FEATURE NETWORKS (random weights): FID, FVD, LPIPS, Sync and the VA model's numbers MEAN "
                "NOTHING; this is a smoke test of the machinery, not a result")

# Table 1's columns (name in the table, column in the parquet, arrow) then this tool's additions
TABLE_COLUMNS = (
    ("PSNR", "psnr", "↑"), ("SSIM", "ssim", "↑"), ("LPIPS", "lpips", "↓"), ("FID", "fid", "↓"),
    ("FVD", "fvd", "↓"), ("E-FID", "efid", "↓"), ("F1", "au_f1", "↑"), ("Sync", "sync_conf", "↑"),
    ("CCC_V", "ccc_v", "↑"), ("CCC_A", "ccc_a", "↑"), ("LSE-D", "sync_dist", "↓"), ("offset", "sync_offset", "→0"),
)


class EvaluationError(RuntimeError):
    """An evaluation input that cannot work, with what to do about it."""


@dataclass(frozen=True)
class ClipPair:
    clip_id: str
    generated: Path
    truth: Path


def match_clips(generated_dir: Path, truth_dir: Path,
                clip_ids: list[str] | None = None) -> tuple[list[ClipPair], list[str], list[str]]:
    """Pairs by clip id (file stem), and the ids found on one side only (generated, truth); ``clip_ids``: only
    these ids are looked at (a checkpoint run's clips, not an earlier run's leftovers in the same folders)."""
    def videos(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise EvaluationError(f"{folder} is not a folder of clips")
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in VIDEO_SUFFIXES:
                if path.stem in found:
                    raise EvaluationError(f"two clips with id {path.stem!r} in {folder}: {found[path.stem].name}, {path.name}")
                found[path.stem] = path
        return found

    generated, truth = videos(Path(generated_dir)), videos(Path(truth_dir))
    if clip_ids is not None:
        generated = {k: v for k, v in generated.items() if k in set(clip_ids)}
        truth = {k: v for k, v in truth.items() if k in set(clip_ids)}
    pairs = [ClipPair(cid, generated[cid], truth[cid]) for cid in sorted(set(generated) & set(truth))]
    if not pairs:
        raise EvaluationError(f"no clip id is in both {generated_dir} ({len(generated)} clips) and {truth_dir} "
                              f"({len(truth)} clips): clips are matched by file name without extension "
                              f"({', '.join(VIDEO_SUFFIXES)})")
    return pairs, sorted(set(generated) - set(truth)), sorted(set(truth) - set(generated))


# -------------------------------------------------------------------------------------------------- decoding


def read_frames(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames as ``(T, H, W, 3)`` uint8 RGB, scaled to ``size = (width, height)`` when given."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24", **({"width": size[0], "height": size[1]} if size else {}))
                      for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as error:
        raise EvaluationError(f"cannot decode the video of {path}: {error}") from error
    if not frames:
        raise EvaluationError(f"{path} has no video frames")
    return np.stack(frames)


def read_audio(path: Path) -> np.ndarray | None:
    """The first audio track as float32 16 kHz mono, or None when the file has none."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError as error:
        raise EvaluationError(f"cannot decode the audio of {path}: {error}") from error
    return np.concatenate(chunks).astype(np.float32) if chunks else None


def face_landmarks(frames: np.ndarray) -> np.ndarray:
    """MediaPipe face mesh in video mode (478 points), NaN rows where no face is found: ``(T, 478, 3)``."""
    from preprocess.video.face_models import mesh_landmarks, new_face_mesh

    mesh = new_face_mesh(video_mode=True, refine_landmarks=True)
    try:
        rows = [mesh_landmarks(mesh, frame) for frame in frames]
    finally:
        mesh.close()
    return np.stack([r if r is not None else np.full((478, 3), np.nan, np.float32) for r in rows]).astype(np.float64)


# -------------------------------------------------------------------------------------------------- models


@dataclass
class Evaluators:
    """The loaded networks and estimators, and what each is (recorded with the numbers)."""

    settings: EvaluationSettings
    inception: object
    lpips: object
    i3d: object
    expression: ExpressionExtractor
    aus: object
    va: object | None
    syncnet: object | None
    models: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_evaluators(settings: EvaluationSettings, expression: ExpressionExtractor | None = None) -> Evaluators:
    from preprocess.pipeline import load_model
    from preprocess.run.settings import load_settings
    from preprocess.visual.action_units import au_backend

    if settings.is_tiny:
        build_tiny_networks(settings)
    pre = load_settings(settings.preprocess_profile)
    width = settings.network_width
    inception = networks.load_inception(settings.path(settings.inception), width, settings.inception_input_size)
    lpips = networks.load_lpips(settings.path(settings.lpips_alexnet),
                                settings.path(settings.lpips_heads) if settings.lpips_heads else None, width)
    i3d = networks.load_i3d(settings.path(settings.i3d))
    expression = expression or MeshExpression()
    aus = au_backend(pre)
    va = load_model("valence_arousal", pre.models.valence_arousal)
    notes = []
    syncnet = None
    sync_ref = "none"
    if settings.syncnet:
        from model.syncnet import SyncNetV2Size, load_syncnet

        size = SyncNetV2Size.tiny() if settings.syncnet_size == "tiny" else None
        syncnet = load_syncnet(settings.path(settings.syncnet), size=size)
        sync_ref = f"model.syncnet.SyncNetV2 ({settings.syncnet_size}) <- {settings.syncnet}"
    else:
        notes.append("no syncnet weights given (settings 'syncnet'): Sync, LSE-D and offset are empty")
    models = {
        "PSNR/SSIM": "torchmetrics.functional (per frame, mean over frames; SSIM Gaussian 11, sigma 1.5)",
        "LPIPS": f"LPIPS v0.1 AlexNet (evaluation.networks.AlexNetLPIPS) <- {settings.lpips_alexnet} + "
                 f"{settings.lpips_heads or 'torchmetrics bundled alex.pth heads'}",
        "FID": f"pytorch-fid Inception-v3 (evaluation.networks.InceptionV3FID, 2048-d pool) <- {settings.inception}; "
               f"every {settings.fid_frame_stride} frame(s)",
        "FVD": f"StyleGAN-V I3D TorchScript <- {settings.i3d}; 16-frame non-overlapping windows at 224x224, "
               "rescale=True resize=True return_features=True",
        "E-FID": expression.name,
        "AU F1": f"{aus.name}; active above " + (f"{settings.au_threshold} (absolute)" if settings.au_threshold
                                                 is not None else f"the ground-truth clip's {settings.au_quantile} "
                                                 "quantile per AU"),
        "Sync": sync_ref + f"; public SyncNet evaluation over +/-{settings.sync_max_shift} frames",
        "CCC_V/CCC_A": f"AUDIO-based VA model {va.reference} (preprocess.audio.valence_arousal, "
                       f"{settings.va_window_s or 'the preprocessing'} s windows, half-window hop) on each clip's "
                       "own audio track",
    }
    return Evaluators(settings, inception, lpips, i3d, expression, aus, va, syncnet, models, notes)


# ------------------------------------------------------------------------------------------------ per clip


@dataclass
class ClipFeatures:
    """What the set-level metrics pool: per-clip features of the generated (g) and ground-truth (t) clip."""

    fid_g: np.ndarray
    fid_t: np.ndarray
    fvd_g: np.ndarray
    fvd_t: np.ndarray
    expr_g: np.ndarray
    expr_t: np.ndarray
    va_g: np.ndarray  # (windows, 2) valence, arousal
    va_t: np.ndarray


def _va_windows(ev: Evaluators, audio: np.ndarray | None, work: Path) -> np.ndarray:
    """(windows, 2) valence, arousal of the audio; (0, 2) when there is none."""
    from preprocess.audio.valence_arousal import valence_arousal_windows
    from preprocess.run.settings import load_settings

    if audio is None or not len(audio):
        return np.zeros((0, 2))
    work.mkdir(parents=True, exist_ok=True)
    wav = work / "audio.wav"
    soundfile.write(wav, audio, SAMPLE_RATE, subtype="PCM_16")
    pre = load_settings(ev.settings.preprocess_profile)
    window = pre.audio.valence_arousal
    if ev.settings.va_window_s is not None:
        window = window.model_copy(update={"window_s": ev.settings.va_window_s})
    track = valence_arousal_windows(wav, True, ev.va, window,
                                    pre.models.valence_arousal.batch_size, work)
    return np.array([[w.valence, w.arousal] for w in track.windows], np.float64)


def _per_clip_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a[~np.isnan(a).any(axis=1)] if a.size else a, b[~np.isnan(b).any(axis=1)] if b.size else b
    return metrics.frechet_distance(a, b) if min(len(a), len(b)) >= 2 else math.nan


def evaluate_clip(ev: Evaluators, pair: ClipPair, work: Path) -> tuple[dict, ClipFeatures]:
    s = ev.settings
    truth = read_frames(pair.truth)
    height, width = truth.shape[1:3]
    notes = []
    with av.open(str(pair.generated)) as container:
        stream = container.streams.video[0]
        generated_size = (stream.codec_context.width, stream.codec_context.height)
    if generated_size != (width, height):
        notes.append(f"generated {generated_size[0]}x{generated_size[1]} scaled to {width}x{height}")
    generated = read_frames(pair.generated, (width, height) if generated_size != (width, height) else None)
    n = min(len(truth), len(generated))
    if len(truth) != len(generated):
        notes.append(f"frames: generated {len(generated)}, ground truth {len(truth)}; first {n} compared")
    generated, truth = generated[:n], truth[:n]
    audio_g, audio_t = read_audio(pair.generated), read_audio(pair.truth)

    lm_g, lm_t = face_landmarks(generated), face_landmarks(truth)
    face_fraction = float(np.mean(~np.isnan(lm_g).any(axis=(1, 2))))
    if face_fraction == 0:
        notes.append("no face found in the generated clip: E-FID and AU F1 are empty")
    aus_g = ev.aus.estimate(lm_g, generated if ev.aus.needs_frames else None)
    aus_t = ev.aus.estimate(lm_t, truth if ev.aus.needs_frames else None)
    features = ClipFeatures(
        fid_g=metrics.inception_features(ev.inception, generated, s.fid_frame_stride),
        fid_t=metrics.inception_features(ev.inception, truth, s.fid_frame_stride),
        fvd_g=metrics.video_features(ev.i3d, generated), fvd_t=metrics.video_features(ev.i3d, truth),
        expr_g=ev.expression.coefficients(lm_g, generated if ev.expression.needs_frames else None),
        expr_t=ev.expression.coefficients(lm_t, truth if ev.expression.needs_frames else None),
        va_g=_va_windows(ev, audio_g, work / "va_generated"), va_t=_va_windows(ev, audio_t, work / "va_truth"),
    )
    k = min(len(features.va_g), len(features.va_t))
    sync = {"sync_conf": math.nan, "sync_dist": math.nan, "sync_offset": math.nan}
    if ev.syncnet is not None and audio_g is not None:
        from model.syncnet import sync_crops, sync_offset

        try:  # syncnet_python's crop of each frame, from the face mesh's box (as the sync filter feeds it)
            measure = sync_offset(ev.syncnet, sync_crops(generated, lm_g, ev.syncnet.image_size), audio_g,
                                  max_shift=s.sync_max_shift)
            sync = {"sync_conf": measure.confidence, "sync_dist": measure.min_distance,
                    "sync_offset": float(measure.offset_frames)}
        except ValueError as error:  # too short for a SyncNet window: a value of this clip, not a crash
            notes.append(f"sync: {error}")
    elif audio_g is None:
        notes.append("the generated clip has no audio: no Sync, CCC")
    row = {
        "clip_id": pair.clip_id, "generated": str(pair.generated), "ground_truth": str(pair.truth),
        "n_frames": n, "face_fraction": face_fraction,
        "psnr": metrics.psnr(generated, truth), "ssim": metrics.ssim(generated, truth),
        "lpips": metrics.lpips(ev.lpips, generated, truth),
        "fid": _per_clip_distance(features.fid_g, features.fid_t),
        "fvd": _per_clip_distance(features.fvd_g, features.fvd_t),
        "efid": _per_clip_distance(features.expr_g, features.expr_t),
        "au_f1": metrics.au_f1(aus_g, aus_t, s.au_quantile, s.au_threshold),
        **sync,
        "ccc_v": metrics.ccc(features.va_g[:k, 0], features.va_t[:k, 0]) if k else math.nan,
        "ccc_a": metrics.ccc(features.va_g[:k, 1], features.va_t[:k, 1]) if k else math.nan,
        "va_windows": k, "notes": "; ".join(notes),
    }
    return row, features


def aggregate(rows: list[dict], features: list[ClipFeatures]) -> dict:
    """The set-level row (see the module docstring)."""
    def mean(key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(values)) if values else math.nan

    va_g = np.concatenate([f.va_g[:min(len(f.va_g), len(f.va_t))] for f in features])
    va_t = np.concatenate([f.va_t[:min(len(f.va_g), len(f.va_t))] for f in features])
    offsets = [abs(r["sync_offset"]) for r in rows if not math.isnan(r["sync_offset"])]
    return {
        "clips": len(rows), "frames": int(sum(r["n_frames"] for r in rows)),
        "psnr": mean("psnr"), "ssim": mean("ssim"), "lpips": mean("lpips"),
        "fid": metrics.set_distance([f.fid_g for f in features], [f.fid_t for f in features]),
        "fvd": metrics.set_distance([f.fvd_g for f in features], [f.fvd_t for f in features]),
        "efid": metrics.set_distance([f.expr_g for f in features], [f.expr_t for f in features]),
        "au_f1": mean("au_f1"), "sync_conf": mean("sync_conf"), "sync_dist": mean("sync_dist"),
        "sync_offset": float(np.mean(offsets)) if offsets else math.nan,
        "ccc_v": metrics.ccc(va_g[:, 0], va_t[:, 0]) if len(va_g) else math.nan,
        "ccc_a": metrics.ccc(va_g[:, 1], va_t[:, 1]) if len(va_g) else math.nan,
    }


# ----------------------------------------------------------------------------------------------- the table


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value)


def markdown_table(method: str, summary: dict, rows: list[dict], ev: Evaluators, unmatched: dict,
                   run: dict | None = None, run_warnings: list[str] = ()) -> str:
    header = "| Method | " + " | ".join(f"{name} {arrow}" for name, _, arrow in TABLE_COLUMNS) + " |"
    rule = "|---" * (len(TABLE_COLUMNS) + 1) + "|"
    lines = [f"> **{warning}**\n" for warning in run_warnings]
    if ev.settings.is_tiny:
        lines += [f"> **{TINY_WARNING}**", ""]
    lines += [f"## Aggregate ({summary['clips']} clips, {summary['frames']} frames)", "", header, rule,
              f"| {method} | " + " | ".join(_fmt(summary[key]) for _, key, _ in TABLE_COLUMNS) + " |", "",
              "## Per clip", "", header.replace("| Method |", "| Clip |"), rule]
    lines += [f"| {r['clip_id']} | " + " | ".join(_fmt(r[key]) for _, key, _ in TABLE_COLUMNS) + " |" for r in rows]
    if run:
        lines += ["", "## What generated the clips", ""]
        lines += [f"- **{key}**: {json.dumps(value) if isinstance(value, (dict, list)) else value}"
                  for key, value in run.items()]
    lines += ["", "## What produced each number", ""]
    lines += [f"- **{name}**: {what}" for name, what in ev.models.items()]
    lines += [f"- note: {note}" for note in ev.notes]
    for side, ids in unmatched.items():
        if ids:
            lines.append(f"- {len(ids)} {side} clip(s) without a match, not evaluated: {', '.join(ids[:10])}")
    lines += [f"- clip {r['clip_id']}: {r['notes']}" for r in rows if r["notes"]]
    lines += ["", "FID/FVD/E-FID per clip use that clip's frames (windows) as samples: small-sample and biased, for "
              "spotting outliers only. E-FID is comparable within this tool, not with the paper's 3DMM E-FID. "
              "See docs/evaluation.md."]
    return "\n".join(lines) + "\n"


@dataclass
class EvaluationResult:
    rows: list[dict]
    summary: dict
    markdown: str
    out: Path


RUN_COLUMNS = ("checkpoint", "checkpoint_step", "checkpoint_model_sha256")  # copied into every row and the summary


def evaluate_folders(generated_dir: str | Path, truth_dir: str | Path, out: str | Path, settings: EvaluationSettings,
                     method: str | None = None, progress: bool = True,
                     expression: ExpressionExtractor | None = None, run: dict | None = None,
                     run_warnings: list[str] = (), clip_extras: dict[str, dict] | None = None,
                     clip_ids: list[str] | None = None) -> EvaluationResult:
    """Evaluate every clip id found in both folders; write the outputs of the module docstring into ``out``.

    For clips generated by this tool (``evaluation.from_checkpoint``): ``run`` (what generated them: checkpoint,
    generation settings; its ``RUN_COLUMNS`` also become columns, ``generation`` a JSON column of the summary),
    ``run_warnings`` (why the numbers mean nothing, shown first), ``clip_extras`` (clip id -> extra columns),
    ``clip_ids`` (evaluate only these)."""
    started = time.perf_counter()
    pairs, only_generated, only_truth = match_clips(Path(generated_dir), Path(truth_dir), clip_ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = load_evaluators(settings, expression)
    rows, features = [], []
    if progress:
        from rich.progress import track

        iterator = track(pairs, description=f"evaluating {len(pairs)} clips")
    else:
        iterator = pairs
    with tempfile.TemporaryDirectory(prefix="synchrorama-evaluate-") as tmp:
        for index, pair in enumerate(iterator):
            row, feats = evaluate_clip(ev, pair, Path(tmp) / str(index))
            if run:
                row.update({key: run.get(key) for key in RUN_COLUMNS})
            row.update((clip_extras or {}).get(pair.clip_id, {}))
            rows.append(row)
            features.append(feats)
    summary = {"method": method or Path(generated_dir).name, **aggregate(rows, features)}
    warnings = [*run_warnings, *([TINY_WARNING] if settings.is_tiny else [])]
    if run:
        summary.update({key: run.get(key) for key in RUN_COLUMNS})
        summary["generation"] = json.dumps(run.get("generation"))
        summary["warnings"] = "; ".join(warnings)
    unmatched = {"generated": only_generated, "ground-truth": only_truth}
    markdown = markdown_table(summary["method"], summary, rows, ev, unmatched, run, list(run_warnings))
    provenance = {"settings": settings.model_dump(), "models": ev.models, "notes": ev.notes,
                  "tiny_warning": TINY_WARNING if settings.is_tiny else None, "run": run, "warnings": warnings,
                  "unmatched": unmatched,
                  "generated_dir": str(generated_dir), "ground_truth_dir": str(truth_dir),
                  "seconds": round(time.perf_counter() - started, 2)}
    meta = {b"synchrorama_evaluation": json.dumps(provenance).encode()}
    clips = pa.Table.from_pylist(rows)
    pq.write_table(clips.replace_schema_metadata(meta), out / "clips.parquet")
    pq.write_table(pa.Table.from_pylist([summary]).replace_schema_metadata(meta), out / "summary.parquet")
    (out / "table.md").write_text(markdown)
    (out / "evaluation.json").write_text(json.dumps({**provenance, "summary": summary}, indent=1, default=str))
    for warning in warnings:
        log.warning(warning)
    return EvaluationResult(rows, summary, markdown, out)
