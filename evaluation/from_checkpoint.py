"""``synchrorama evaluate --checkpoint CKPT --shards SHARDS``: generate every clip of a shard set from a training
checkpoint, as the paper's protocol says (SynchroRaMa, section 4: each test clip's FIRST frame is the reference
image and its audio the driving audio), then evaluate the generated folder against the ground-truth folder with
``evaluation.evaluate.evaluate_folders`` (the Table 1 metrics).

Per clip of the shards (read by ``shards.reader.clip_dataset``, manifests verified, members ``mp4`` and ``wav``;
``limit``: the first N clips in shard order):

- ground truth ``out/ground_truth/<clip id>.mp4``: the shard's own H.264 stream copied bit for bit (no
  re-encoding, so the ground-truth pixels are the shard's) with the shard's ``clip.wav`` muxed in as AAC;
- reference ``out/work/<clip id>/reference.png``: the clip's first frame (512x512 in the shards;
  ``model.generation.generate.reference_image`` scales it to the model's resolution);
- driving audio ``out/work/<clip id>/audio.wav``: the shard's ``clip.wav`` (16 kHz mono, ``T * 640`` samples for
  ``T`` frames), written back as 16-bit PCM (lossless: the shards store 16-bit PCM);
- generated ``out/generated/<clip id>.mp4`` (+ ``.json``) by ``model.generation.generate.generate_video``, the code behind
  ``synchrorama generate``: the driving audio goes through the preprocessing stages again (loudness, Demucs,
  emotion, wav2vec) exactly as for any user's audio, and the description is the captioner's for the reference.

Length: the generator makes ``ceil(samples / 640)`` frames from its driving audio and chains clip windows
through motion frames to any length, so a shard clip's ``T * 640`` samples give exactly its ``T`` frames: the
generated clip has the ground truth's frame count (checked and recorded per clip; the evaluation would cut both
to the shorter one with a note if they ever differed).

A generated clip whose ``.json`` records the same checkpoint (path, step, weights sha256) and the same generation
settings is reused, not regenerated (a long run resumes); ``.json`` is written after the mp4, so its presence
means the mp4 is complete.

Deviations: the whole clip is generated (the paper does not say which length it evaluates); the description is
the captioner's, not the shard's (the protocol names only image and audio; the shards' descriptions were made
from the clip's moving frames, which a generation from one image does not have). The generator is loaded once
for all clips (``model.generation.generate.load_generator`` keeps the last one), the preprocessing models once per process.

What is recorded next to the metric settings (``table.md``, ``evaluation.json``, both parquet files): the
checkpoint folder, its step, stage and model size, the sha256 of ``model.safetensors`` from the checkpoint's
``manifest.json`` (checked against the file), whether its A2M is still untrained, and the generation settings.
The table says loudly that the numbers mean nothing for a tiny checkpoint, an untrained A2M, a checkpoint before
stage 2, tiny preprocessing models or tiny feature networks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from evaluation.evaluate import EvaluationError, EvaluationResult, evaluate_folders
from evaluation.expression import ExpressionExtractor
from evaluation.settings import EvaluationSettings

log = logging.getLogger("evaluation")

GROUND_TRUTH_DIR, GENERATED_DIR, WORK_DIR = "ground_truth", "generated", "work"


@dataclass(frozen=True)
class GenerationSettings:
    """What ``model.generation.generate.generate_video`` is called with (see its docstring); recorded with the numbers."""

    steps: int | None = None  # DDIM steps; None: the recipe's (40 for the full model)
    seed: int = 0  # noise seed, the same for every clip
    profile: str | None = None  # preprocessing profile; None: tiny for a tiny model, else default
    config: tuple[str, ...] = ()  # key=value overrides of the checkpoint's training config
    weights: str = "ema"  # ema | model
    device: str = "auto"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "config": list(self.config)}


# ------------------------------------------------------------------------------------------------ checkpoint


def a2m_untrained(checkpoint: Path, weights: str) -> bool | None:
    """Whether the A2M's output layer is still all zeros in the weights generation uses (``model.a2m.is_untrained``
    on the file: only those two tensors are read); None when the files hold no A2M output layer."""
    from safetensors import safe_open

    keys = ("a2m.decoder_out.weight", "a2m.decoder_out.bias")
    found = {}
    # the EMA file, when used, overrides the raw weights it holds (as model.generation.generate.load_generator does)
    for name in ("model.safetensors", *(("ema.safetensors",) if weights == "ema" else ())):
        path = checkpoint / name
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in keys if key in handle.keys()})
    if len(found) < len(keys):
        return None
    return not any(bool(tensor.any()) for tensor in found.values())


def checkpoint_record(checkpoint: str | Path, generation: GenerationSettings) -> dict:
    """What the evaluated checkpoint is: folder, step, stage, size, weights sha256, A2M state, warnings."""
    from model.generation.generate import GenerateError, checkpoint_config, find_checkpoint
    from model.training.train import MANIFEST, CheckpointError, read_manifest
    from shards.schema import file_sha256

    try:
        found = find_checkpoint(checkpoint)
        cfg = checkpoint_config(found, list(generation.config))
    except GenerateError as error:
        raise EvaluationError(str(error)) from error
    state = json.loads((found / "state.json").read_text())
    sha = None
    manifest = found / MANIFEST
    if manifest.is_file():
        try:
            listed = read_manifest(found).get("model.safetensors")
        except CheckpointError as error:  # a manifest of the wrong shape: the weights cannot be checked
            raise EvaluationError(str(error)) from error
        if listed:
            sha = listed["sha256"]
            actual = file_sha256(found / "model.safetensors")
            if actual != sha:
                raise EvaluationError(f"{found / 'model.safetensors'} has sha256 {actual}, its {manifest} says {sha}: "
                                      "the weights changed after the checkpoint was saved; evaluate an intact "
                                      "checkpoint (or re-save this one if you trust it)")
    untrained = a2m_untrained(found, generation.weights)
    warnings = []
    if cfg.model_size == "tiny":
        warnings.append("TINY CHECKPOINT (tiny model config, random VAE and wav2vec stand-ins): the generated "
                        "clips MEAN NOTHING")
    if untrained:
        warnings.append("the checkpoint's A2M is UNTRAINED (its output layer is zero: every clip's first motion "
                        "frames are the reference): the generated clips MEAN NOTHING as a SynchroRaMa result")
    if cfg.stage != "stage2":
        warnings.append(f"a {cfg.stage} checkpoint: its audio and emotion layers were never trained (stage 2 "
                        "trains them): lip sync and emotion numbers MEAN NOTHING")
    return {"checkpoint": str(found.resolve()), "checkpoint_step": state.get("step"), "checkpoint_stage": cfg.stage,
            "checkpoint_model_size": cfg.model_size, "checkpoint_model_sha256": sha,
            "a2m_untrained": untrained, "warnings": warnings}


# -------------------------------------------------------------------------------------------- shard clips


def count_clips(shards: str | Path) -> int | None:
    """Clips listed by the shards' manifests (for the progress bar), None when some shard has none."""
    from shards.reader import shard_manifest, shard_urls

    urls = shard_urls(shards)
    total = 0
    for url in [urls] if isinstance(urls, str) else urls:
        try:
            manifest, _why = shard_manifest(url)
        except ValueError:
            return None
        if manifest is None:
            return None
        total += manifest.n_samples
    return total


def first_frame(mp4: bytes) -> np.ndarray:
    """The first video frame of mp4 bytes as ``(H, W, 3)`` uint8 RGB."""
    with av.open(io.BytesIO(mp4)) as container:
        for frame in container.decode(container.streams.video[0]):
            return frame.to_ndarray(format="rgb24")
    raise EvaluationError("the shard's mp4 has no video frames")


def write_ground_truth(mp4: bytes, wav: Path, path: Path) -> None:
    """The shard's video stream copied as is, with its audio as AAC (an mp4 carries no PCM well)."""
    from preprocess.run.media import run_ffmpeg

    video = wav.with_name("video.mp4")
    video.write_bytes(mp4)
    temp = path.with_name(f".{path.name}.tmp.mp4")
    run_ffmpeg(["-i", str(video), "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                str(temp)], purpose=f"writing the ground truth {path}", outputs=[temp])
    temp.replace(path)  # renamed into place: an existing ground-truth file is always complete
    video.unlink()


def _reusable(report: Path, record: dict, generation: GenerationSettings) -> bool:
    """Whether an earlier run's generated clip came from this checkpoint and these generation settings."""
    if not report.is_file():
        return False
    try:
        info = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (info.get("evaluate_generation") == generation.as_dict()
            and info.get("evaluate_checkpoint") == {k: record[k] for k in ("checkpoint", "checkpoint_step",
                                                                           "checkpoint_model_sha256")})


# ---------------------------------------------------------------------------------------------- the command


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path, out: str | Path, settings: EvaluationSettings,
                        generation: GenerationSettings = GenerationSettings(), limit: int | None = None,
                        method: str | None = None, progress: bool = True,
                        expression: ExpressionExtractor | None = None) -> EvaluationResult:
    """Generate each shard clip (see the module docstring) into ``out/generated``, write its ground truth into
    ``out/ground_truth``, then evaluate the two folders into ``out``."""
    from model.generation.generate import GenerateError, generate_video
    from shards.reader import clip_dataset

    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit {limit}: give at least 1 clip (or no --limit for all)")
    started = time.perf_counter()
    record = checkpoint_record(checkpoint, generation)
    out = Path(out)
    truth_dir, generated_dir, work_root = out / GROUND_TRUTH_DIR, out / GENERATED_DIR, out / WORK_DIR
    for folder in (truth_dir, generated_dir, work_root):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        dataset = clip_dataset(shards, members=("mp4", "wav"), decode_video=False)
        total = count_clips(shards)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationError(f"cannot read the shard set {shards}: {error}") from error
    total = min(total, limit) if total is not None and limit is not None else (total or limit)

    clips = iter(dataset)
    if progress:
        from rich.progress import track

        clips = track(clips, total=total, description=f"generating from step {record['checkpoint_step']}")
    generated_info: dict[str, dict] = {}
    tiny_generation: set[str] = set()
    for clip in clips:
        clip_id = clip["clip_id"]
        work = work_root / clip_id
        work.mkdir(parents=True, exist_ok=True)
        n_truth = int(clip["meta"]["n_frames"])
        wav = work / "audio.wav"
        soundfile.write(wav, clip["audio"].numpy(), 16000, subtype="PCM_16")
        truth = truth_dir / f"{clip_id}.mp4"
        if not truth.is_file():
            write_ground_truth(clip["video"], wav, truth)
        target = generated_dir / f"{clip_id}.mp4"
        report = target.with_name(target.name + ".json")
        clip_started = time.perf_counter()
        if _reusable(report, record, generation):
            info, reused = json.loads(report.read_text()), True
        else:
            report.unlink(missing_ok=True)  # stale: the json goes in last, after the new mp4
            reference = work / "reference.png"
            Image.fromarray(first_frame(clip["video"])).save(reference)
            try:
                result = generate_video(record["checkpoint"], reference, wav, target, steps=generation.steps,
                                        seed=generation.seed, profile=generation.profile,
                                        config=list(generation.config), weights=generation.weights,
                                        device=generation.device)
            except GenerateError as error:
                raise EvaluationError(f"generating clip {clip_id}: {error}") from error
            info, reused = result.info, False
            info["evaluate_generation"] = generation.as_dict()
            info["evaluate_checkpoint"] = {k: record[k] for k in ("checkpoint", "checkpoint_step",
                                                                   "checkpoint_model_sha256")}
            report.write_text(json.dumps(info, indent=1))
        # the model itself is the checkpoint's warning; these are the preprocessing models that conditioned it
        tiny_generation.update(m for m in info.get("tiny_models") or [] if not m.startswith("the SynchroRaMa model"))
        generated_info[clip_id] = {
            "truth_frames": n_truth, "generated_frames": int(info["n_frames"]),
            "generation_seconds": 0.0 if reused else round(time.perf_counter() - clip_started, 2),
            "generation_reused": reused, "description": info.get("description", ""),
        }
        if info["n_frames"] != n_truth:  # the module docstring says this cannot happen: say so loudly if it does
            log.warning("clip %s: generated %d frames for a %d-frame ground truth", clip_id, info["n_frames"], n_truth)
        if limit is not None and len(generated_info) >= limit:
            break
    if not generated_info:
        raise EvaluationError(f"no clip could be read from {shards} ({dataset.skipped.count} skipped; see the log): "
                              "give a shard folder written by `synchrorama run` (shard-NNNNNN.tar with manifests)")
    if dataset.skipped.count:
        log.warning("%d clip(s) of %s could not be read and were not evaluated", dataset.skipped.count, shards)

    warnings = list(record["warnings"])
    if tiny_generation:
        warnings.append("TINY PREPROCESSING MODELS conditioned the generation (" + ", ".join(sorted(tiny_generation))
                        + "): the generated clips MEAN NOTHING")
    run = {
        **{k: v for k, v in record.items() if k != "warnings"},
        "shards": str(shards), "limit": limit, "skipped_clips": dataset.skipped.count,
        "generation": generation.as_dict(), "generation_seconds": round(time.perf_counter() - started, 2),
        "length": "the ground truth's: the whole clip's audio drives the generation (T * 640 samples -> T frames)",
        "reference": "each clip's first frame", "driving_audio": "each clip's clip.wav from the shard",
        "description": "the preprocessing captioner's, of the reference image",
    }
    return evaluate_folders(generated_dir, truth_dir, out, settings,
                            method=method or f"{Path(record['checkpoint']).name} (step {record['checkpoint_step']})",
                            progress=progress, expression=expression, run=run, run_warnings=warnings,
                            clip_extras=generated_info, clip_ids=sorted(generated_info))


__all__ = ["GenerationSettings", "a2m_untrained", "checkpoint_record", "evaluate_checkpoint"]
