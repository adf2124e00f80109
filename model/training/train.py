"""The SynchroRaMa training loop: one stage (``a2m``, ``stage1`` or ``stage2``) per run, in one file.

    python -m model.training.train --config configs/train_tiny.toml --shards out/demo/shards --out out/train [key=value ...]
    torchrun --nproc_per_node=8 -m model.training.train --config configs/train_stage2.toml --shards ... --out ...

Settings are ``model/training/train_config.py``; data is ``shards/training_loader.py``; losses are
``model/training/training_step.py``. Per optimizer step: ``grad_accum`` micro-batches (the DDP all-reduce runs only
on the last one), bf16 autocast over fp32 master weights, gradient clipping, AdamW (fused on CUDA), warmup +
cosine learning rate, EMA of the trained weights. Checkpoints (``out/checkpoints/step-NNNNNNN/``) hold the
weights and the EMA as safetensors plus optimizer, scheduler, step, RNG states and each rank's data position,
and are renamed into place only when complete, with a sha256 manifest of their files written last (checked on
resume, falling back to the newest older checkpoint that verifies; ``training_state.pt`` loads with
``weights_only=True``); a non-finite loss or gradient norm stops the run before the update. Rank 0 holds the output
folder's lock (one run per folder). A restarted run continues from ``checkpoints/latest`` and
produces exactly the losses it would have produced without the stop (on CPU; cuDNN/cuBLAS kernels may
differ in the last bits on GPU). Validation videos from fixed inputs, made with the EMA weights, are saved
inside each checkpoint. Logs: ``log.jsonl`` and TensorBoard under ``out/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from model.audio_projection import resample_to_frames
from model.config import ModelConfig, config_for
from model.denoising_unet import is_new_layer
from model.devices import device_generator
from model.emotion_embedding import EmotionFeatures
from model.experts import load_loss_experts
from model.schedule import train_scheduler
from model.synchrorama import SynchroRamaModel
from model.training.batch import TrainingBatch
from model.training.train_config import TrainConfig, parse_config
from model.training.training_step import STEP_STATISTICS, StepOptions, training_losses
from shards.output_lock import OutputLocked, hold_output_lock
from shards.schema import file_sha256
from shards.training_loader import EMOTION_ARRAYS, TrainingWindows, WindowSpec, data_loader
from shards.writer import fsync_path

log = logging.getLogger("model.training.train")

# Dense bf16 peak per GPU (no sparsity), for MFU. Unknown GPUs: set gpu_peak_tflops.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                        "RTX 4090": 165.0, "A6000": 155.0}


# ---------------------------------------------------------------------------------------------- setup


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The model's config with this run's window lengths, batch, lr and pixel-loss weights."""
    model_cfg = config_for(cfg.model_size)
    recipe = model_cfg.recipe
    overrides = {name: value for name, value in (("sync", cfg.loss_sync), ("emo", cfg.loss_emo), ("au", cfg.loss_au),
                                                 ("attr_action", cfg.loss_attr_action)) if value is not None}
    recipe = dataclasses.replace(recipe, batch_size=cfg.batch_size, learning_rate=cfg.lr,
                                 stage2_losses=dataclasses.replace(recipe.stage2_losses, **overrides))
    if cfg.pixel_loss_max_timestep is not None:
        recipe = dataclasses.replace(recipe, pixel_loss_max_timestep=cfg.pixel_loss_max_timestep)
    if cfg.sync_expert and cfg.stage == "stage2" and recipe.stage2_losses.sync:
        recipe = syncnet_pixel_frames(recipe, cfg.clip_frames or model_cfg.clip_frames)
    return dataclasses.replace(
        model_cfg, recipe=recipe,
        clip_frames=model_cfg.clip_frames if cfg.clip_frames is None else cfg.clip_frames,
        motion_frames=model_cfg.motion_frames if cfg.motion_frames is None else cfg.motion_frames)


def syncnet_pixel_frames(recipe, clip_frames: int):
    """``recipe`` with at least one syncnet_v2 window (5 frames) of decoded frames: the tiny recipe decodes 4.
    Raises ``ValueError`` when the clip itself is shorter than a window."""
    from model.syncnet import WINDOW_FRAMES

    if clip_frames < WINDOW_FRAMES:
        raise ValueError(f"sync_expert (syncnet_v2) scores {WINDOW_FRAMES}-frame windows and the clip has "
                         f"{clip_frames} frames: set clip_frames={WINDOW_FRAMES} or more (the tiny model's default is "
                         f"4), or leave sync_expert empty for the train-experts sync expert")
    if recipe.pixel_frames < WINDOW_FRAMES:
        log.info(f"sync_expert: decoding {WINDOW_FRAMES} frames per sample for the pixel losses (the recipe's "
                 f"pixel_frames is {recipe.pixel_frames}, less than one syncnet_v2 window)")
        recipe = dataclasses.replace(recipe, pixel_frames=WINDOW_FRAMES)
    return recipe


def frozen_encoders(cfg: TrainConfig, model_cfg: ModelConfig):
    """The SD VAE and wav2vec2 of ``cfg`` (on the CPU). The tiny model's random stand-ins are drawn from the seed
    alone, not from what the model's initialisation drew before, so ``synchrorama generate`` (model/generation/generate.py)
    rebuilds the very ones a run trained with from its checkpoint's config."""
    if cfg.model_size == "tiny":
        from model.training.tiny_components import tiny_audio_encoder, tiny_vae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return tiny_vae(model_cfg), tiny_audio_encoder(model_cfg)
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2Model
    if not cfg.vae or not cfg.wav2vec:
        raise ValueError("the full model needs vae= and wav2vec= (local folders)")
    return (AutoencoderKL.from_pretrained(cfg.vae).requires_grad_(False),
            Wav2Vec2Model.from_pretrained(cfg.wav2vec).requires_grad_(False))


def frozen_parts(cfg: TrainConfig, model_cfg: ModelConfig, device):
    """The pretrained, never-trained parts: SD VAE (pixels -> latents), wav2vec2 (audio -> features), experts.

    The tiny model uses random stand-ins (``model/training/tiny_components.py``), built from the run's seed so that every
    rank and every resumed run has the same ones."""
    vae, audio_encoder = frozen_encoders(cfg, model_cfg)
    # stage 2 refuses weighted pixel losses whose expert was never trained (model/experts.py, train-experts)
    weights = model_cfg.recipe.stage2_losses if cfg.stage == "stage2" else model_cfg.recipe.stage1_losses
    experts = load_loss_experts(model_cfg, weights, cfg.experts, allow_untrained=cfg.untrained_experts,
                                sync_expert=cfg.sync_expert)
    if cfg.untrained_experts and cfg.stage == "stage2" and pixel_losses_on(model_cfg):
        log.warning("untrained_experts=true: stage 2's pixel losses score frames with random experts")
    return vae.eval().to(device), audio_encoder.eval().to(device), experts.eval().to(device)


def pixel_losses_on(model_cfg: ModelConfig) -> bool:
    w = model_cfg.recipe.stage2_losses
    return bool(w.sync or w.emo or w.au or w.attr_action)


def trainable_summary(model: SynchroRamaModel, stage: str) -> str:
    """Per component: parameters trained and frozen in this stage."""
    rows = {}
    for name, p in model.named_parameters():
        component = name.split(".")[0]
        if component == "denoiser":
            component += " (new layers)" if is_new_layer(name) else " (image layers)"
        trained, frozen = rows.get(component, (0, 0))
        rows[component] = (trained + p.numel(), frozen) if p.requires_grad else (trained, frozen + p.numel())
    lines = [f"stage {stage}: trainable / frozen parameters"]
    lines += [f"  {c:<42} {t:>13,} trained {f:>13,} frozen" for c, (t, f) in sorted(rows.items())]
    return "\n".join(lines)


class Objective(nn.Module):
    """The model plus its frozen helpers, so that DDP sees the whole loss computation as one forward."""

    def __init__(self, model, vae, experts, scheduler, stage, options: StepOptions | None = None):
        super().__init__()
        self.model, self.vae, self.experts = model, vae, experts
        self.scheduler, self.stage, self.options = scheduler, stage, options

    def forward(self, batch: TrainingBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return training_losses(self.model, batch, self.scheduler, self.stage, self.vae, self.experts, generator,
                               self.options)


def initial_weights(model: SynchroRamaModel, cfg: TrainConfig, master: bool) -> None:
    """The recipe's starting weights, in order: ``init_from`` (the previous stage's whole model), then
    ``motion_adapter`` (AnimateDiff temporal layers), then ``init_a2m_from`` (the a2m run's A2M, copied exactly;
    it stays frozen in stages 1 and 2, so every later checkpoint carries it bit for bit)."""
    from model.a2m import is_untrained, load_trained_a2m

    if cfg.init_from:
        model.load_state_dict(load_file(str(Path(cfg.init_from) / "model.safetensors")))
    if cfg.motion_adapter:
        model.denoiser.load_motion_adapter(cfg.motion_adapter)
        if master:
            log.info(f"temporal layers initialised from the motion adapter {cfg.motion_adapter}")
    if cfg.init_a2m_from:
        load_trained_a2m(model.a2m, cfg.init_a2m_from, cfg.init_a2m_weights)
        if master:
            log.info(f"A2M: {cfg.init_a2m_weights} weights of {cfg.init_a2m_from}")
    if cfg.stage != "a2m" and master and is_untrained(model.a2m):
        log.warning("the A2M module is untrained (its output layer is still zero: it returns the reference as the "
                    "first clip's motion frames); pass init_a2m_from=<the a2m run's checkpoint folder> so that this "
                    "run's checkpoints hold the trained A2M")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Factor on ``cfg.lr``: linear warmup, then cosine down to ``min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------- batches on the device

_warned: set[str] = set()


def warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning(what)


@torch.no_grad()
def to_latents(vae, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 ``(..., 3, S, S)`` -> scaled latents ``(..., 4, h, w)`` (posterior mean: no sampling noise)."""
    flat = pixels.flatten(0, -4).float() / 127.5 - 1
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in flat.split(16)]) * scale
    return latents.float().unflatten(0, pixels.shape[:-3])  # fp32 targets even when encoded under bf16 autocast


@torch.no_grad()
def audio_features(audio_encoder, audio: torch.Tensor, frames: int) -> torch.Tensor:
    """16 kHz waveforms ``(B, S)`` -> wav2vec2 states of all layers per video frame ``(B, frames, L, D)``."""
    x = (audio - audio.mean(1, keepdim=True)) / (audio.std(1, keepdim=True) + 1e-7)  # the feature extractor's
    states = torch.stack(audio_encoder(x, output_hidden_states=True).hidden_states, 1)  # (B, L, S', D)
    return torch.stack([resample_to_frames(s.float(), frames) for s in states])


def training_batch(raw: dict, cfg: TrainConfig, model_cfg: ModelConfig, vae, audio_encoder, device) -> TrainingBatch:
    """Loader batch -> ``TrainingBatch`` on ``device``: VAE-encodes pixels and runs wav2vec2 when the shards had
    no cached latents/features; missing emotion, AUs and description become zeros (logged once)."""
    d, m, t = model_cfg.data, model_cfg.motion_frames, model_cfg.clip_frames
    raw = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    b = raw["first_frame"].shape[0]
    if "latents" in raw:
        frames, reference = raw["latents"], raw["reference_latents"]
    else:
        frames, reference = to_latents(vae, raw["frames"], d.vae_scale), to_latents(vae, raw["reference"], d.vae_scale)
    window = frames.shape[1]
    zeros = lambda *shape: torch.zeros(b, *shape, device=device)  # noqa: E731
    if "wav2vec" in raw and raw["wav2vec"].shape[-2:] != (d.wav2vec_layers, d.wav2vec_dim):
        warn_once(f"cached wav2vec features are {tuple(raw['wav2vec'].shape[-2:])}, the model reads "
                  f"{(d.wav2vec_layers, d.wav2vec_dim)}: computing them from the audio instead")
        del raw["wav2vec"]
    if "wav2vec" in raw:
        features = raw["wav2vec"]
    elif "audio" in raw:
        features = audio_features(audio_encoder, raw["audio"], window)
    else:  # stage 1 reads no audio
        features = zeros(window, d.wav2vec_layers, d.wav2vec_dim)
    if cfg.stage == "stage2":
        for name, present in (("emotion inputs", "emotion.va_values" in raw), ("AUs", "aus" in raw),
                              ("description embeddings", "description" in raw)):
            if not present:
                warn_once(f"shards have no {name}: training with zeros in their place")
    emotion = stored_emotion(raw, model_cfg) if "emotion.va_values" in raw else None
    if emotion is None:
        emotion = EmotionFeatures(zeros(d.text_emotion_classes), zeros(d.text_emotion_dim),
                                  zeros(d.speech_emotion_classes), zeros(d.speech_emotion_dim),
                                  zeros(1, d.va_values), zeros(1, d.va_dim))
    clip = frames[:, m:m + t]
    return TrainingBatch(
        latents=clip if clip.shape[1] else frames[:, :0],
        motion_latents=frames[:, :m],
        reference_latents=reference,
        audio_features=features,
        description=raw.get("description", zeros(d.text_tokens, d.text_dim)),
        emotion=emotion,
        aus=raw.get("aus", zeros(t, d.au_count)),
        first_frame=raw["first_frame"],
        waveform=raw.get("audio"),  # for a sync expert that reads audio (sync_expert=, model/syncnet.py)
    )


def stored_emotion(raw: dict, model_cfg: ModelConfig) -> EmotionFeatures | None:
    """The ``emotion.npz`` arrays as ``EmotionFeatures``; None (with a warning) if their sizes are not the
    model's, e.g. shards made with the tiny profile read by the full model."""
    d = model_cfg.data
    emotion = EmotionFeatures(*(raw[f"emotion.{name}"] for name in EMOTION_ARRAYS))
    sizes = tuple(t.shape[-1] for t in vars(emotion).values())
    expected = (d.text_emotion_classes, d.text_emotion_dim, d.speech_emotion_classes, d.speech_emotion_dim,
                d.va_values, d.va_dim)
    if sizes != expected:
        warn_once(f"emotion inputs have sizes {sizes}, the model reads {expected}: training with zeros instead")
        return None
    return emotion


# ------------------------------------------------------------------------------ checkpoints and EMA


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: unsafe to unpickle, incomplete, or with bytes that changed."""


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite: training stops before the update and before saving."""


MANIFEST = "manifest.json"  # sha256 of every other file of a checkpoint, written last
MANIFEST_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def rng_states() -> dict:
    """Every RNG state as tensors and plain types, so ``training_state.pt`` loads with ``weights_only=True``
    (numpy's own state is a tuple holding an ndarray, which the safe unpickler refuses)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gauss)],
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the sha256 and size of every file of ``folder`` in ``manifest.json``, fsyncing each file first;
    the manifest itself goes in by an atomic rename, so its presence means the checkpoint is complete."""
    files = {}
    for path in _checkpoint_files(folder):
        fsync_path(path)
        files[path.relative_to(folder).as_posix()] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    temp = folder / f".{MANIFEST}.tmp"
    temp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    fsync_path(temp)
    os.replace(temp, folder / MANIFEST)
    for sub in {folder, *(p.parent for p in _checkpoint_files(folder))}:
        fsync_path(sub)


def read_manifest(folder: Path) -> dict[str, dict]:
    """``folder``'s manifest as ``{relative posix path: {"sha256": 64 hex digits, "bytes": size}}``, checked for
    shape: any manifest that is not that (not JSON, a list, no ``files``, an entry that is not a dict of exactly those
    two keys and types, a name that is absolute or has an empty, ``.`` or ``..`` part or a backslash) is a
    :class:`CheckpointError`, so a damaged one is skipped like any other damaged checkpoint instead of crashing the
    resume. Names may hold ``/``: the validation videos are saved in ``samples/``."""
    manifest = folder / MANIFEST
    try:
        loaded = json.loads(manifest.read_text())
    except (ValueError, OSError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{manifest} is not a checkpoint manifest (not readable JSON: {error}); delete "
                              f"{folder} to resume from an older checkpoint") from error

    def wrong(what: str) -> CheckpointError:
        return CheckpointError(f"{manifest} is not a checkpoint manifest ({what}); delete {folder} to resume from an "
                               "older checkpoint")

    if not isinstance(loaded, dict):
        raise wrong(f"a JSON {type(loaded).__name__}, not an object")
    if loaded.get("format") != MANIFEST_FORMAT:
        raise wrong(f"format {loaded.get('format')!r}, this version reads format {MANIFEST_FORMAT}")
    files = loaded.get("files")
    if not isinstance(files, dict):
        raise wrong(f"'files' is {type(files).__name__}, not an object of file name -> sha256 and bytes")
    for name, entry in files.items():
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
            raise wrong(f"the name {name!r:.120} is not a relative path inside the checkpoint")
        if not (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"}
                and isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])
                and type(entry["bytes"]) is int and entry["bytes"] >= 0):
            raise wrong(f"the entry of {name!r:.120} is {entry!r:.120}, not {{'sha256': 64 hex digits, 'bytes': a size}}")
    return files


def verify_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint without a manifest, with a manifest of the wrong shape, or whose files are missing,
    unlisted, resized or changed."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: its save was interrupted, or an older model/training/train.py wrote it. If you "
            f"trust its files, re-save it with `python -c \"from model.training.train import reseal_checkpoint; "
            f"reseal_checkpoint('{folder}')\"`, or delete it to resume from an older checkpoint")
    files = read_manifest(folder)
    for name, entry in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            raise CheckpointError(f"{path}: listed in {manifest} but missing (or outside the checkpoint); "
                                  f"delete {folder} to resume from an older checkpoint")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 in {manifest}: the file changed after it "
                                  f"was saved (disk or copy corruption, or an edit); delete {folder} to resume "
                                  "from an older checkpoint")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in _checkpoint_files(folder)
                      if p.relative_to(folder).as_posix() not in files)
    if unlisted:
        raise CheckpointError(f"{folder} holds files its {MANIFEST} does not list: {unlisted}")


def load_training_state(folder: Path) -> dict:
    """``training_state.pt`` through the safe unpickler: tensors, containers and plain types only, so a doctored
    file that names e.g. ``os.system`` is refused without running anything."""
    path = folder / "training_state.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} holds objects other than tensors and plain types, which are not loaded "
                              f"(they could run code): {str(error).splitlines()[0]}") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); delete {folder} to resume from an older "
                              "checkpoint") from error


def reseal_checkpoint(folder: str | Path) -> None:
    """Re-save a TRUSTED checkpoint written before manifests: its RNG states in the safe format, then a manifest.
    This unpickles the old ``training_state.pt`` fully (it may run code): only for files you wrote yourself."""
    folder = Path(folder)
    state = torch.load(folder / "training_state.pt", weights_only=False)
    rng = state.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):
        kind, keys, position, has_gauss, cached_gauss = rng["numpy"]
        rng["numpy"] = [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gauss)]
    temp = folder / ".training_state.pt.tmp"
    torch.save(state, temp)
    os.replace(temp, folder / "training_state.pt")
    write_manifest(folder)


def save_checkpoint(directory: Path, step: int, model, ema: dict, optimizer, scheduler, positions: list,
                    cfg: TrainConfig, write_samples) -> Path:
    """Write ``directory/step-NNNNNNN`` under a temp name with ``manifest.json`` last (every file fsynced and
    hashed), then rename it and point ``latest`` at it."""
    final = directory / f"step-{step:07d}"
    temp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, temp / "model.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in ema.items()}, temp / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": rng_states(), "data_positions": positions, "world_size": len(positions),
                "num_workers": cfg.num_workers}, temp / "training_state.pt")
    (temp / "state.json").write_text(json.dumps({"step": step, "data_positions": positions,
                                                 "config": dataclasses.asdict(cfg)}, indent=1))
    write_samples(temp / "samples")
    write_manifest(temp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    fsync_path(directory)
    latest = directory / ".latest.tmp"
    latest.write_text(final.name)
    fsync_path(latest)
    os.replace(latest, directory / "latest")
    fsync_path(directory)
    kept = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in kept[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies: the one ``latest`` names (only a ``step-NNNNNNN`` folder inside
    ``directory``), else the newest older one. Each is checked against its manifest (every file's sha256) and its
    ``training_state.pt`` must load with the safe unpickler; one that fails (an interrupted save without a manifest,
    a truncated or changed file) is skipped with a warning naming the file and the reason, for the next older one.
    ``None`` when there are no checkpoints; raises :class:`CheckpointError` when there are some but none verifies,
    rather than restarting at step 0."""
    pointer = directory / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    folders = sorted((p for p in directory.glob("step-*") if p.is_dir()), reverse=True)
    if named is not None and named not in {p.name for p in folders}:
        log.warning("%s names %r, which is not a checkpoint folder in %s: using the newest complete one",
                    pointer, named, directory)
    else:
        folders.sort(key=lambda p: p.name != named)  # the named one first, then newest to oldest
    refused: list[tuple[Path, CheckpointError]] = []
    for folder in folders:
        try:
            verify_checkpoint(folder)
            load_training_state(folder)
        except CheckpointError as error:
            refused.append((folder, error))
            older = "falling back to the next older checkpoint" if folder != folders[-1] else "no older one is left"
            log.warning("skipping %s: %s; %s", folder, error, older)
            continue
        if refused:
            log.warning("resuming from %s, not from the newer %s (see the warnings above)", folder,
                        ", ".join(skipped.name for skipped, _ in refused))
        return folder
    if refused:
        raise CheckpointError(f"none of the {len(folders)} checkpoints in {directory} verifies; the newest says: "
                              f"{refused[0][1]}")
    return None


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: dict):
    """Swap the EMA into the trained parameters for validation, then put the trained values back."""
    parameters = dict(model.named_parameters())
    backup = {name: parameters[name].detach().clone() for name in ema}
    with torch.no_grad():
        for name, value in ema.items():
            parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                parameters[name].copy_(value)


# ------------------------------------------------------------------------------------- validation


def video_config(cfg: TrainConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The config that validation videos are made with: stage 1 trains on image pairs (no motion frames), but
    its videos, like the model's, are clips after motion frames, so it takes the model size's defaults."""
    if model_cfg.motion_frames > 0:
        return model_cfg
    base = config_for(cfg.model_size)
    return dataclasses.replace(model_cfg, clip_frames=base.clip_frames, motion_frames=base.motion_frames)


def validation_inputs(cfg: TrainConfig, model_cfg: ModelConfig) -> list[dict]:
    """Fixed inputs: the first clips of the shards, unshuffled, same every time: reference image, audio and the
    clip's stored emotion features and description embedding (None when the shard has none, or at other sizes).
    The emotion's VA windows are placed as if the window started its clip (the sampler counts frames from the
    audio's start), so they are off by the window's start in the clip."""
    if cfg.val_samples <= 0:
        return []
    frames = cfg.val_frames or 2 * video_config(cfg, model_cfg).clip_frames
    spec = WindowSpec("stage2", clip_frames=frames, motion_frames=0, image_size=model_cfg.data.image_size,
                      prefer_cached=False)
    windows = TrainingWindows(cfg.shard_urls(), spec, batch_size=1, seed=cfg.seed, shuffle_buffer=0,
                              verify=cfg.verify_shards, max_skip_fraction=cfg.max_skip_fraction)
    inputs = []
    for batch in windows:
        description = batch.get("description")
        if description is not None and description.shape[-2:] != (model_cfg.data.text_tokens, model_cfg.data.text_dim):
            description = None
        inputs.append({"image": batch["reference"][0].permute(1, 2, 0).numpy(), "audio": batch["audio"][0].numpy(),
                       "emotion": stored_emotion(batch, model_cfg) if "emotion.va_values" in batch else None,
                       "description": description})
        if len(inputs) == cfg.val_samples:
            break
    return inputs


def validation_videos(model, vae, audio_encoder, inputs, steps: int, out: Path, video_cfg: ModelConfig) -> None:
    from model.pipeline import TalkingFacePipeline

    if not inputs:
        return
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    pipeline = TalkingFacePipeline(model, vae, audio_encoder)
    pipeline.cfg = video_cfg  # clip and motion frames of the videos (the networks do not depend on them)
    for i, sample in enumerate(inputs):
        pipeline(sample["image"], sample["audio"], description_embedding=sample["description"],
                 emotion=sample["emotion"], num_inference_steps=steps or None, seed=i).save(out / f"sample-{i}.mp4")
    model.train(was_training)


# ------------------------------------------------------------------------------ collectives and FLOPs


def collective(name: str, tensor: torch.Tensor, device: torch.device, **kwargs) -> torch.Tensor:
    """``torch.distributed.<name>(tensor, **kwargs)``; every tensor collective of this file goes through here.

    NCCL takes only tensors on this rank's GPU (a CPU tensor raises there, while gloo accepts anything), so the
    tensor must be on the training ``device``: checked on every backend, so CPU runs catch what NCCL would."""
    if tensor.device != device:
        raise RuntimeError(f"torch.distributed.{name} was given a tensor on {tensor.device} but this rank trains "
                           f"on {device}; NCCL accepts only tensors on the rank's GPU: create it with "
                           f"device={str(device)!r}")
    getattr(dist, name)(tensor, **kwargs)
    return tensor


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (for the log; the gradients already were), in one all-reduce."""
    names = sorted(values)
    stacked = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    collective("all_reduce", stacked, device)
    return {n: float(v) / dist.get_world_size() for n, v in zip(names, stacked.tolist(), strict=True)}


def agree_on_step(step: int, device: torch.device) -> None:
    """Raise unless every rank is at ``step``: a node that cannot see the checkpoint folder would otherwise
    silently restart at step 0 (and on other data) while the others resume."""
    bounds = collective("all_reduce", torch.tensor([step, -step], dtype=torch.int64, device=device), device,
                        op=dist.ReduceOp.MAX).tolist()
    if bounds[0] != -bounds[1]:
        raise RuntimeError(f"ranks resume at different steps (from {-bounds[1]} to {bounds[0]}; this rank: {step}): "
                           f"out/checkpoints must be one folder that every node sees (a shared filesystem), "
                           f"or copy the same checkpoint to each node before restarting")


def any_rank(flag: bool, device: torch.device, distributed: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. one rank got SIGTERM)."""
    if not distributed:
        return flag
    return bool(collective("all_reduce", torch.tensor([int(flag)], device=device), device,
                           op=dist.ReduceOp.MAX).item())


def check_resume_layout(state: dict, saved_config: dict, world: int, num_workers: int, where: Path) -> None:
    """The data positions of a checkpoint are per rank and per loader worker: resuming with another world size
    or worker count would re-read or skip data, so both must match."""
    saved_world = state.get("world_size", len(state["data_positions"]))
    saved_workers = state.get("num_workers", saved_config.get("num_workers"))
    if saved_world != world:
        raise ValueError(f"{where} was written by {saved_world} rank(s), this run has {world}: resume with "
                         f"--nproc_per_node/--nnodes giving {saved_world} ranks, or start a new out= folder")
    if saved_workers is not None and saved_workers != num_workers:
        raise ValueError(f"{where} was written with num_workers={saved_workers}, this run has {num_workers}: "
                         f"set num_workers={saved_workers} to resume (data positions are per loader worker)")


@contextlib.contextmanager
def no_recomputation():
    """While counting model FLOPs on a meta copy: each checkpointed region runs once, without saving for a
    recomputation, so the count is the model's arithmetic, not this memory-saving implementation's."""
    import torch.utils.checkpoint as checkpointing

    original = checkpointing.checkpoint
    checkpointing.checkpoint = lambda function, *args, use_reentrant=None, **kwargs: function(*args, **kwargs)
    try:
        yield
    finally:
        checkpointing.checkpoint = original


def model_flops(model_cfg: ModelConfig, stage: str, batch: TrainingBatch, vae, experts,
                options: StepOptions) -> float:
    """FLOPs of one micro-step's forward + backward as the model needs them (MFU's numerator): counted on a
    copy on the ``meta`` device (shapes only: no memory, no GPU time), without gradient checkpointing and its
    recomputation, frozen parts included only where the step runs them (forward, and backward where a
    gradient must pass through them)."""
    meta = torch.device("meta")
    with meta:
        replica = SynchroRamaModel(model_cfg)
        vae_copy = type(vae).from_config(vae.config).requires_grad_(False).eval()
        experts_copy = type(experts)(model_cfg).requires_grad_(False).eval()
    replica.set_stage(stage)
    moved = {k: v.to(meta) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    batch = TrainingBatch(**moved, emotion=EmotionFeatures(*(v.to(meta) for v in vars(batch.emotion).values())))
    counter = FlopCounterMode(display=False)
    with no_recomputation(), counter:
        losses = training_losses(replica, batch, train_scheduler(model_cfg.recipe), stage, vae_copy, experts_copy,
                                 None, options)
        losses["total"].backward()
    return float(counter.get_total_flops())


class StopSignal:
    """SIGTERM (a scheduler's preemption or time limit) asks the loop to save a checkpoint at the next step
    boundary and return; the previous handler is restored by ``close``. Only the main thread can install it."""

    def __init__(self):
        self.received, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ------------------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
    records: list[dict]  # what this process logged (rank 0 also wrote them to out/log.jsonl)
    model: SynchroRamaModel
    ema: dict[str, torch.Tensor]


def train(cfg: TrainConfig) -> TrainResult:
    """Run one stage from ``cfg`` (resuming from ``out/checkpoints/latest`` when there is one). Rank 0 holds the
    lock of ``out`` for the run (``shards.output_lock``): a second run on the same folder is refused."""
    with contextlib.ExitStack() as held:
        return _train(cfg, held)


def claim_output(out: Path, stage: str, held: contextlib.ExitStack, master: bool, device: torch.device,
                 distributed: bool) -> None:
    """Rank 0 takes the output folder's lock (held until ``held`` closes) and, holding it, removes what killed
    saves left (temp checkpoint folders and pointer files: no live writer can own them now). Every rank raises
    when rank 0 was refused, so the others do not wait for it in a collective."""
    refused = None
    if master:
        try:
            held.enter_context(hold_output_lock(out, f"training stage {stage}"))
        except OutputLocked as error:
            refused = error
        else:
            checkpoints = out / "checkpoints"
            for leftover in sorted(checkpoints.glob(".*.tmp*")) if checkpoints.is_dir() else []:
                log.warning("removing %s, left by an interrupted checkpoint save", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
    if any_rank(refused is not None, device, distributed):
        raise refused or OutputLocked(f"{out} is in use by another run (rank 0 was refused its lock; see its log)")


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    distributed = "RANK" in os.environ
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if distributed:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        # validation videos and saving on rank 0 keep the other ranks waiting in a collective: the timeout
        # (NCCL's default is 10 minutes) must outlast them
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.dist_timeout_minutes))
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    autocast = cfg.autocast if cfg.autocast != "auto" else ("bf16" if cuda else "fp32")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16" else contextlib.nullcontext()
    master = rank == 0
    out = Path(cfg.out)
    checkpoints = out / "checkpoints"
    claim_output(out, cfg.stage, held, master, device, distributed)

    # Model, frozen parts and the stage's trainable set; the same seed on every rank gives the same weights.
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg)
    model = SynchroRamaModel.from_image_unet(model_cfg, cfg.image_unet) if cfg.image_unet else SynchroRamaModel(model_cfg)
    initial_weights(model, cfg, master)
    vae, audio_encoder, experts = frozen_parts(cfg, model_cfg, device)
    trainable = model.set_stage(cfg.stage)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if master:
        log.info(trainable_summary(model, cfg.stage))
    if cfg.gradient_checkpointing:
        model.denoiser.unet.enable_gradient_checkpointing()
        model.reference_net.unet.enable_gradient_checkpointing()
    model.to(device).train()
    if cfg.compile:
        model.denoiser.compile()
    options = StepOptions(cfg.motion_from_a2m, cfg.motion_from_reference, cfg.unconditional_dropout)
    objective = Objective(model, vae, experts, train_scheduler(model_cfg.recipe), cfg.stage, options)
    if distributed:
        objective = DistributedDataParallel(objective, device_ids=[local_rank] if cuda else None,
                                            broadcast_buffers=False)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, cfg))
    parameters = dict(model.named_parameters())
    ema = {name: parameters[name].detach().clone().float() for name in trainable_names}

    # Resume: weights, EMA, optimizer, schedule, RNG and this rank's data position.
    step, positions = 0, {}
    resume_from = latest_checkpoint(checkpoints) if cfg.resume else None
    if resume_from is not None:
        state = load_training_state(resume_from)  # verified by latest_checkpoint, every file against its sha256
        model.load_state_dict(load_file(str(resume_from / "model.safetensors")))
        ema = {k: v.to(device) for k, v in load_file(str(resume_from / "ema.safetensors")).items()}
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        set_rng_states(state["rng"])
        saved_config = json.loads((resume_from / "state.json").read_text()).get("config", {})
        check_resume_layout(state, saved_config, world, cfg.num_workers, resume_from)
        positions = state["data_positions"][rank]
        if master:
            log.info(f"resumed from {resume_from} at step {step}")

    if distributed:
        agree_on_step(step, device)

    # Data: this rank's share of the shards; a resumed worker skips what it had consumed.
    spec = WindowSpec(cfg.stage, model_cfg.clip_frames, model_cfg.motion_frames, model_cfg.data.image_size,
                      cfg.prefer_cached, model_cfg.data.latent_size, cfg.min_reference_distance,
                      wav2vec_layers=model_cfg.data.wav2vec_hidden_states)
    workers = max(1, cfg.num_workers)
    consumed = {int(w): p for w, p in positions.get("workers", {}).items()}
    batches_seen = positions.get("batches", 0)
    dataset = TrainingWindows(cfg.shard_urls(), spec, cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              rank=rank, world_size=world, start_positions=consumed, worker_offset=batches_seen % workers,
                              verify=cfg.verify_shards, max_skip_fraction=cfg.max_skip_fraction)
    batches = iter(data_loader(dataset, cfg.num_workers))
    if cfg.overfit_batches:  # a loop that cannot overfit a few fixed batches has a bug
        batches = itertools.cycle(list(itertools.islice(batches, cfg.overfit_batches)))
    val_inputs = validation_inputs(cfg, model_cfg) if master else []

    def data_positions() -> list:
        mine = {"batches": batches_seen, "workers": {str(w): p for w, p in consumed.items()}}
        if not distributed:
            return [mine]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        return gathered

    def checkpoint() -> None:
        every_position = data_positions()  # a collective: every rank takes part
        if master:
            def samples(folder):
                with ema_weights(model, ema):
                    validation_videos(model, vae, audio_encoder, val_inputs, cfg.val_steps, folder,
                                      video_config(cfg, model_cfg))
            path = save_checkpoint(checkpoints, step, model, ema, optimizer, scheduler, every_position, cfg, samples)
            log.info(f"checkpoint {path}")
        if distributed:
            dist.barrier()

    writer = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    records = []
    flops_per_step = hardware_flops_per_step = None  # model FLOPs (MFU) and FLOPs executed (HFU), per step
    stop = StopSignal()
    peak_tflops = cfg.gpu_peak_tflops or next((v for k, v in GPU_BF16_PEAK_TFLOPS.items()
                                               if cuda and k in torch.cuda.get_device_name(device)), 0.0)
    frames_per_sample = spec.frames
    last_step = min(cfg.stop_at_step or cfg.max_steps, cfg.max_steps)
    window_time = window_wait = window_samples = window_produce = 0.0

    while step < last_step:
        started = time.perf_counter()
        # The step's randomness (noise, timesteps, guidance dropout, A2M sampling) depends only on the seed, the
        # step and the rank, so a resumed run draws exactly what an uninterrupted one would.
        # Overfitting repeats each batch with the same noise too: a truly fixed batch.
        draw = step % cfg.overfit_batches if cfg.overfit_batches else step
        torch.manual_seed(cfg.seed * 1_000_003 + draw * 1009 + rank)
        totals: dict[str, float] = {}
        wait = 0.0
        for micro in range(cfg.grad_accum):
            fetch = time.perf_counter()
            raw = dict(next(batches))
            wait += time.perf_counter() - fetch
            batches_seen += 1
            worker, position = (int(v) for v in raw.pop("position"))
            consumed[worker] = position
            window_produce += float(raw.pop("produce_s"))
            with amp:
                batch = training_batch(raw, cfg, model_cfg, vae, audio_encoder, device)
            generator = device_generator(device, cfg.seed * 7919 + draw * 131 + micro * 17 + rank)
            last_micro = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (not distributed or last_micro) else objective.no_sync()
            # FLOPs of one micro-step forward + backward, counted once; only for MFU, which needs a GPU's peak
            counting = hardware_flops_per_step is None and micro == 0 and bool(peak_tflops)
            counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
            with sync, counter:
                with amp:
                    losses = objective(batch, generator)
                (losses["total"] / cfg.grad_accum).backward()
            if counting:  # executed FLOPs include checkpointing's recomputation; the model's do not
                hardware_flops_per_step = counter.get_total_flops() * cfg.grad_accum
                flops_per_step = model_flops(model_cfg, cfg.stage, batch, vae, experts, options) * cfg.grad_accum
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        # a NaN/inf would be stepped into the weights and then saved as the newest checkpoint: stop first, on every
        # rank together (one rank's NaN need not reach the others' all-reduced gradients)
        bad = {k: v for k, v in {**totals, "grad_norm": grad_norm}.items() if not math.isfinite(v)}
        if any_rank(bool(bad), device, distributed):
            raise NonFiniteLossError(
                f"step {step + 1}: non-finite {bad or 'values on another rank'}; stopped before the optimizer step, "
                f"nothing of this step was saved ({checkpoints / 'latest'} is unchanged). Lower lr=, check grad_clip= "
                "and the batch's inputs (shards with NaN features), then resume")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up so early EMA is not the init
            for name in trainable_names:
                ema[name].lerp_(parameters[name].detach().float(), 1 - decay)
        step += 1
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        window_time += elapsed
        window_wait += wait
        window_samples += cfg.batch_size * cfg.grad_accum

        if step % cfg.log_every == 0 or step == last_step:
            if distributed:  # losses averaged over ranks for the log (the gradients already were)
                totals = mean_over_ranks(totals, device)
            samples_per_s = window_samples * world / window_time
            record = {
                "step": step, "stage": cfg.stage, **{k if k in STEP_STATISTICS else f"loss/{k}": v for k, v in totals.items()},
                "grad_norm": grad_norm, "lr": lr,
                "samples_per_s": samples_per_s, "frames_per_s": samples_per_s * frames_per_sample,
                "data_wait_fraction": window_wait / window_time,
                "loader_samples_per_s_per_worker": window_samples / max(window_produce, 1e-9),
                "skipped_samples": dataset.skipped.count,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                "mfu": (flops_per_step * window_samples / (cfg.batch_size * cfg.grad_accum) / window_time
                        / (peak_tflops * 1e12)) if peak_tflops and flops_per_step else None,
                "tflops_per_step": flops_per_step / 1e12 if flops_per_step else None,
                # executed FLOPs (with recomputation) over the peak: hardware FLOPs utilisation, not MFU
                "hfu": (hardware_flops_per_step * window_samples / (cfg.batch_size * cfg.grad_accum) / window_time
                        / (peak_tflops * 1e12)) if peak_tflops and hardware_flops_per_step else None,
                "hardware_tflops_per_step": hardware_flops_per_step / 1e12 if hardware_flops_per_step else None,
            }
            records.append(record)
            window_time = window_wait = window_samples = window_produce = 0.0
            if master:
                mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
                memory = f"{record['peak_memory_gb']:.1f} GB" if cuda else "n/a"
                log.info(f"step {step} loss {totals['total']:.4f} grad {grad_norm:.3f} lr {lr:.2e} "
                         f"{samples_per_s:.2f} samples/s {record['frames_per_s']:.1f} frames/s "
                         f"data wait {record['data_wait_fraction']:.0%} mem {memory} MFU {mfu}")
                with open(out / "log.jsonl", "a") as file:
                    file.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(key, value, step)
        stopping = any_rank(stop.received, device, distributed)  # every rank stops at the same step
        if step % cfg.checkpoint_every == 0 or step == last_step or stopping:
            checkpoint()
        if stopping:
            if master:
                log.info(f"stopped by SIGTERM after step {step}; the same command resumes from there")
            break

    stop.close()
    if writer is not None:
        writer.close()
    if distributed:
        dist.destroy_process_group()
    return TrainResult(records, model, ema)


def main(argv: list[str] | None = None, prog: str = "python -m model.training.train") -> TrainResult:
    return train(parse_config(argv, prog))


if __name__ == "__main__":
    main()
