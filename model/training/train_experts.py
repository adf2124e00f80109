"""Train the four loss experts of stage 2 (``model/experts.py``) on the preprocessing shards.

    synchrorama train-experts --shards out/hdtf/shards --out experts/ --model-size full [--sync-steps N ...]

Paper section 3.7 scores generated frames with Synchformer (eq. 2), a VA model (eq. 3), an AU detector (eq. 4)
and VideoLLaMA2 captions (eq. 5); stage 2 uses small differentiable stand-ins instead, and this module is what
trains them, so that those losses measure something:

* ``sync`` (``SyncNetExpert``): contrastive, SyncNet-style. A span of ``sync_window``-frame windows of the
  MOUTH crop (box from the clip's stored landmarks, ``mouth_box``) is compared with the clip's own wav2vec2
  windows shifted by ``-R..R`` frames; a softmax over the shifts (the expert's temperature) must pick shift 0.
  Negatives are the same clip's shifted audio, which is what makes it a sync detector and not a speaker detector.
* ``au``, ``valence_arousal``: per-frame regression (MSE) of the clip's ``aus.npy`` and of its VA windows
  (``emotion.npz``) aligned to frames exactly as stage 2 aligns them (``align_windows_to_frames``).
* ``description``: ``sync_window``-frame windows regressed onto the clip's ``clip_text.npy`` embedding with
  eq. 5's cosine loss.

Frames go through what stage 2's pixel losses see: area-resized to the model's ``image_size``, in [-1, 1], then
the experts' own resizing. Clips are split by clip into train and held-out (``heldout_fraction``); the scores
on held-out clips are saved with the weights (``<out>/<expert>.safetensors`` + ``<out>/experts.json``). An
expert whose targets the shards lack is skipped and the JSON says why; stage 2 then refuses its loss.

Sync scores: ``pair_accuracy`` (in-sync vs shifted by >= 2 frames, for the same video window; chance 0.5) and
offset detection (``SyncNetExpert.detect_offset``) on held-out clips whose audio was delayed by known amounts.

Deviations and limits: clips are held in memory (faces at ``expert_image_size``, uint8; ``max_clips`` caps
them), which suits datasets of a few thousand clips, not a streaming corpus; the mouth crop is steady per clip
(median box) with no jitter, while stage 2 crops generated frames with the expert's stored median box.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from safetensors.torch import save_file

from model.config import ModelConfig, config_for
from model.emotion_embedding import align_windows_to_frames
from model.experts import LossExperts, SyncNetExpert, description_embedding, mouth_box
from model.losses import attr_action_loss
from shards import schema
from shards.reader import SkipCounter, count_lost, decode_clip, shard_urls, verified_samples

log = logging.getLogger(__name__)

READ_MEMBERS = (schema.VIDEO_MEMBER, schema.AUDIO_MEMBER, schema.LANDMARKS_MEMBER, schema.META_MEMBER,
                schema.WAV2VEC_MEMBER, schema.AUS_MEMBER, schema.EMOTION_MEMBER, schema.DESCRIPTION_MEMBER)


@dataclass
class ExpertTrainingConfig:
    shards: str  # shard dir, tar or WebDataset spec (as model/training/train.py's shards=)
    out: str
    model_size: str = "tiny"  # the model config whose experts these are (tiny | full)
    sync_steps: int = 2000
    regressor_steps: int = 500  # per regressor (au, valence_arousal, description)
    batch_size: int = 16
    lr: float = 1e-3
    shift_range: int = 7  # R: audio shifts (frames) the sync expert learns to reject and offsets it can detect
    heldout_fraction: float = 0.2
    max_clips: int = 2000
    wav2vec: str = ""  # wav2vec2 folder for clips without cached wav2vec.npy (full model only)
    device: str = "auto"
    seed: int = 0


@dataclass
class Clip:
    """One clip in memory: ``faces`` uint8 ``(T, 3, s, s)`` at ``expert_image_size``, ``mouths`` uint8
    ``(T, 3, s/2, s)``, ``audio`` fp16 ``(T, L, D)`` wav2vec2 states; targets may be None."""

    clip_id: str
    faces: torch.Tensor
    mouths: torch.Tensor
    box: torch.Tensor
    audio: torch.Tensor | None = None
    aus: torch.Tensor | None = None
    va: torch.Tensor | None = None  # (T, 2) valence, arousal per frame
    description: torch.Tensor | None = None  # (D,)


@dataclass
class ExpertReport:
    trained: dict[str, dict] = field(default_factory=dict)  # expert -> scores
    skipped: dict[str, str] = field(default_factory=dict)  # expert -> why


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte()


# ------------------------------------------------------------------------------------------------ data


def _audio_encoder(cfg: ExpertTrainingConfig, device):
    if not cfg.wav2vec:
        return None
    from transformers import Wav2Vec2Model
    return Wav2Vec2Model.from_pretrained(cfg.wav2vec).requires_grad_(False).eval().to(device)


def prepare_clip(raw: dict, model_cfg: ModelConfig, expert: SyncNetExpert, audio_encoder=None) -> Clip:
    """A decoded shard clip (``shards.reader.decode_clip``) -> ``Clip``: frames as stage 2 decodes them (area
    resize to ``image_size``), the expert-sized faces, mouth crops and the targets the clip has."""
    from model.training.train import audio_features  # the same wav2vec2 framing as the training loop

    d = model_cfg.data
    size = model_cfg.expert_image_size
    box = mouth_box(raw["landmarks"])
    faces, mouths = [], []
    for chunk in raw["video"].split(32):  # bounded memory at 512 px
        frames = F.interpolate(chunk.float(), size=(d.image_size, d.image_size), mode="area") / 127.5 - 1
        faces.append(to_uint8(F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)))
        mouths.append(to_uint8(expert.crop_mouths(frames[None], box[None])[0]))
    n = raw["video"].shape[0]
    clip = Clip(raw["clip_id"], torch.cat(faces), torch.cat(mouths), box)
    features = raw.get("wav2vec")
    if features is not None and tuple(features.shape[-2:]) == (d.wav2vec_layers, d.wav2vec_dim):
        clip.audio = features.half()
    elif audio_encoder is not None:
        clip.audio = audio_features(audio_encoder, raw["audio"][None].to(next(audio_encoder.parameters()).device),
                                    n)[0].half().cpu()
    if "aus" in raw and raw["aus"].shape[-1] == d.au_count:
        clip.aus = raw["aus"].float()
    if schema.EMOTION_MEMBER in raw:
        with np.load(io.BytesIO(raw[schema.EMOTION_MEMBER]), allow_pickle=False) as arrays:
            if int(arrays["va_valid"]) and len(arrays["va_values"]):
                windows = torch.from_numpy(arrays["va_values"][:, :2].astype(np.float32))[None]
                clip.va = align_windows_to_frames(windows, torch.tensor([0]), n, d.va_window_frames,
                                                  d.va_hop_frames)[0]
    if "clip_text" in raw and raw["clip_text"].shape[-1] == d.text_dim:
        clip.description = description_embedding(raw["clip_text"][None])[0]
    return clip


def load_clips(cfg: ExpertTrainingConfig, model_cfg: ModelConfig, expert: SyncNetExpert, device) -> list[Clip]:
    """Every readable clip of the shards (up to ``max_clips``), sorted by clip id."""
    audio_encoder = _audio_encoder(cfg, device)
    clips, failed = [], 0
    expanded = shard_urls(cfg.shards)
    urls = wds.shardlists.expand_urls(expanded) if isinstance(expanded, str) else list(expanded)
    # each shard checked against its manifest (sha256, sample count) as the training loader does; losses counted
    lost = SkipCounter()
    for sample in count_lost(verified_samples({"url": url} for url in urls), skipped=lost):
        if len(clips) >= cfg.max_clips:
            break
        members = [m for m in READ_MEMBERS if m in sample]
        try:
            raw = decode_clip(sample, members=members, decode_video=True)
            clips.append(prepare_clip(raw, model_cfg, expert, audio_encoder))
        except Exception as error:  # one bad clip never stops the run
            failed += 1
            log.warning(f"skipping clip {sample.get('__key__')!r}: {error}")
    if lost.count:
        log.warning(f"{lost.count} samples of {cfg.shards} were lost to shards that failed their manifest check "
                    "(see the lines above); `synchrorama validate` names them")
    if not clips:
        raise ValueError(f"no readable clip in {cfg.shards} ({failed} failed, {lost.count} lost to damaged shards): "
                         "train-experts needs shards written "
                         "by the preprocessing pipeline (mp4, wav, landmarks.npy, json; wav2vec.npy for sync)")
    return sorted(clips, key=lambda c: c.clip_id)


def split_clips(clips: list[Clip], fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Train / held-out by clip (a seeded shuffle), at least one clip in each when there are two."""
    order = list(clips)
    random.Random(seed).shuffle(order)
    held = min(max(1, round(fraction * len(order))), len(order) - 1) if len(order) > 1 else 0
    return order[held:], order[:held]


# ------------------------------------------------------------------------------------------------ sync


def sync_batch(clips: list[Clip], expert: SyncNetExpert, shifts: int, windows: int, batch_size: int,
               rng: random.Random, device):
    """Mouth spans ``(B, w + windows - 1, 3, h, w)`` and audio ``(B, w + windows - 1 + 2*shifts, L, D)`` whose
    audio window ``k + shifts`` is in sync with video window ``k``."""
    span = expert.window + windows - 1
    mouths, audio = [], []
    for _ in range(batch_size):
        clip = rng.choice(clips)
        start = rng.randrange(shifts, clip.mouths.shape[0] - span - shifts + 1)
        mouths.append(clip.mouths[start:start + span])
        audio.append(clip.audio[start - shifts:start + span + shifts])
    return to_unit(torch.stack(mouths)).to(device), torch.stack(audio).float().to(device)


def train_sync(expert: SyncNetExpert, train: list[Clip], cfg: ExpertTrainingConfig, device) -> list[float]:
    """Contrastive training over audio shifts (InfoNCE, target: shift 0); returns the loss every 50 steps."""
    windows = 4
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(expert.parameters(), lr=cfg.lr, weight_decay=1e-4)
    expert.train().requires_grad_(True)
    target = torch.full((cfg.batch_size * windows,), cfg.shift_range, device=device)
    history = []
    for step in range(cfg.sync_steps):
        mouths, audio = sync_batch(train, expert, cfg.shift_range, windows, cfg.batch_size, rng, device)
        similarity = expert.shift_similarity(expert.embed_mouths(mouths), expert.embed_audio(audio),
                                             cfg.shift_range)
        loss = F.cross_entropy(similarity.flatten(0, 1) / expert.temperature, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == cfg.sync_steps - 1:
            history.append(round(loss.item(), 4))
    return history


@torch.no_grad()
def evaluate_sync(expert: SyncNetExpert, clips: list[Clip], shift_range: int, device,
                  delays: tuple[int, ...] | None = None) -> dict:
    """Held-out sync scores: in-sync vs shifted pair accuracy, and the offset detected when the audio is delayed
    by each of ``delays`` frames (default ``-R, -R/2, 0, R/2, R`` rounded) within ``shift_range``."""
    expert.eval()
    delays = delays or tuple(sorted({-shift_range, -(shift_range // 2), 0, shift_range // 2, shift_range}))
    wins, pairs, errors, detected = 0, 0, [], {}
    for clip in clips:
        mouths, audio = to_unit(clip.mouths)[None].to(device), clip.audio.float()[None].to(device)
        video_windows, audio_windows = expert.embed_mouths(mouths), expert.embed_audio(audio)
        k = video_windows.shape[1] - 2 * shift_range
        if k < 1:
            continue
        similarity = expert.shift_similarity(video_windows[:, shift_range:shift_range + k], audio_windows,
                                             shift_range)[0]  # (k, 2R+1); index R is in sync
        far = [j for j in range(2 * shift_range + 1) if abs(j - shift_range) >= 2]
        wins += int((similarity[:, shift_range:shift_range + 1] > similarity[:, far]).sum())
        pairs += similarity[:, far].numel()
        margin = max(abs(x) for x in delays)
        for delay in delays:  # audio delayed by `delay` frames: audio[t] belongs with video[t - delay]
            length = mouths.shape[1] - 2 * margin
            offset, _ = expert.detect_offset_from_mouths(mouths[:, margin:margin + length],
                                                        audio[:, margin - delay:margin - delay + length], shift_range)
            detected.setdefault(str(delay), []).append(int(offset[0]))
            errors.append(abs(int(offset[0]) - delay))
    if not pairs:
        raise ValueError(f"held-out clips are too short for sync windows of {expert.window} frames with shifts up to "
                         f"{shift_range}: lower --shift-range or use longer clips")
    return {"pair_accuracy": wins / pairs, "pair_chance": 0.5, "offset_within_1_frame": float(np.mean(
        [e <= 1 for e in errors])), "offset_mean_abs_error_frames": float(np.mean(errors)),
        "offset_chance_within_1_frame": 3 / (2 * shift_range + 1), "detected_offsets": detected,
        "heldout_clips": len(clips)}


# ------------------------------------------------------------------------------------------- regressors


def _frame_batch(clips: list[Clip], target: str, batch_size: int, rng: random.Random, device):
    """Random frames ``(1, B, 3, s, s)`` and their per-frame targets ``(1, B, C)``."""
    faces, targets = [], []
    for _ in range(batch_size):
        clip = rng.choice(clips)
        i = rng.randrange(clip.faces.shape[0])
        faces.append(clip.faces[i])
        targets.append(getattr(clip, target)[i])
    return to_unit(torch.stack(faces))[None].to(device), torch.stack(targets)[None].to(device)


def _window_batch(clips: list[Clip], frames: int, batch_size: int, rng: random.Random, device):
    """Random windows ``(B, frames, 3, s, s)`` and their clip's description embedding ``(B, D)``."""
    faces, targets = [], []
    for _ in range(batch_size):
        clip = rng.choice(clips)
        start = rng.randrange(clip.faces.shape[0] - frames + 1)
        faces.append(clip.faces[start:start + frames])
        targets.append(clip.description)
    return to_unit(torch.stack(faces)).to(device), torch.stack(targets).to(device)


def train_regressor(module, kind: str, train: list[Clip], held: list[Clip], cfg: ExpertTrainingConfig,
                    window: int, device) -> dict:
    """``kind``: ``aus``/``va`` (per-frame MSE) or ``description`` (eq. 5 cosine). Returns held-out scores."""
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=1e-4)
    module.train().requires_grad_(True)
    for _ in range(cfg.regressor_steps):
        if kind == "description":
            faces, target = _window_batch(train, window, cfg.batch_size, rng, device)
            loss = attr_action_loss(module(faces), target)
        else:
            faces, target = _frame_batch(train, kind, cfg.batch_size, rng, device)
            loss = F.mse_loss(module(faces), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        if kind == "description":
            mean = torch.stack([c.description for c in train]).mean(0)
            predicted = [module(to_unit(c.faces[:window])[None].to(device))[0].cpu() for c in held]
            cosine = [float(F.cosine_similarity(p, c.description, dim=0)) for p, c in zip(predicted, held, strict=True)]
            baseline = [float(F.cosine_similarity(mean, c.description, dim=0)) for c in held]
            return {"heldout_cosine": float(np.mean(cosine)), "train_mean_cosine": float(np.mean(baseline)),
                    "heldout_clips": len(held)}
        mean = torch.cat([getattr(c, kind) for c in train]).mean(0)
        errors, baseline = [], []
        for clip in held:
            values = getattr(clip, kind)
            predicted = torch.cat([module(to_unit(chunk)[None].to(device))[0].cpu() for chunk in clip.faces.split(64)])
            errors.append(((predicted - values) ** 2).mean().item())
            baseline.append(((mean - values) ** 2).mean().item())
        mse, base = float(np.mean(errors)), float(np.mean(baseline))
        return {"heldout_mse": mse, "train_mean_mse": base, "heldout_r2": 1 - mse / base if base > 0 else None,
                "heldout_clips": len(held)}


# ------------------------------------------------------------------------------------------------ run


def train_experts(cfg: ExpertTrainingConfig) -> ExpertReport:
    """Load the shards, train every expert their targets allow, save weights + ``experts.json``; the report."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model_cfg = config_for(cfg.model_size)
    experts = LossExperts(model_cfg).to(device)
    clips = load_clips(cfg, model_cfg, experts.sync, device)
    train, held = split_clips(clips, cfg.heldout_fraction, cfg.seed)
    log.info(f"{len(clips)} clips: {len(train)} to train, {len(held)} held out")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ExpertReport()
    if not held:
        raise ValueError(f"{cfg.shards} has one clip: held-out scores need at least two")

    span = model_cfg.sync_window + 3 + 2 * cfg.shift_range  # a training span: 4 windows and the shifts
    sync_train = [c for c in train if c.audio is not None and c.mouths.shape[0] >= span]
    sync_held = [c for c in held if c.audio is not None and c.mouths.shape[0] >= span]
    if not sync_train or not sync_held:
        report.skipped["sync"] = (f"needs wav2vec.npy at the model's width {(model_cfg.data.wav2vec_layers, model_cfg.data.wav2vec_dim)} "
                                  f"(or --wav2vec) and clips of at least {span} frames in both splits")
    else:
        box = torch.stack([c.box for c in sync_train]).median(0).values
        experts.sync.default_mouth_box.copy_(box)  # where stage 2 looks for the mouth in generated frames
        history = train_sync(experts.sync, sync_train, cfg, device)
        scores = evaluate_sync(experts.sync, sync_held, cfg.shift_range, device)
        report.trained["sync"] = {**scores, "loss_history": history, "train_clips": len(sync_train),
                                  "default_mouth_box": [round(float(x), 4) for x in box]}
    for child, kind, window in (("au", "aus", 1), ("valence_arousal", "va", 1),
                                ("description", "description", model_cfg.sync_window)):
        usable_train = [c for c in train if getattr(c, kind) is not None and c.faces.shape[0] >= window]
        usable_held = [c for c in held if getattr(c, kind) is not None and c.faces.shape[0] >= window]
        if not usable_train or not usable_held:
            member = {"aus": schema.AUS_MEMBER, "va": schema.EMOTION_MEMBER, "description": schema.DESCRIPTION_MEMBER}
            report.skipped[child] = f"needs {member[kind]} (with valid values at the model's sizes) in both splits"
            continue
        report.trained[child] = train_regressor(getattr(experts, child), kind, usable_train, usable_held, cfg,
                                                window, device)
        report.trained[child]["train_clips"] = len(usable_train)

    for child in report.trained:
        module = getattr(experts, child)
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(out / f"{child}.safetensors"))
    summary = {"model_size": cfg.model_size, "settings": asdict(cfg),
               "expert_config": {"sync_window": model_cfg.sync_window, "expert_width": model_cfg.expert_width,
                                 "expert_image_size": model_cfg.expert_image_size, "image_size": model_cfg.data.image_size},
               "clips": {"total": len(clips), "train": [c.clip_id for c in train], "heldout": [c.clip_id for c in held]},
               "trained": report.trained, "skipped": report.skipped, "seconds": round(time.perf_counter() - started, 1)}
    (out / "experts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report


__all__ = ["Clip", "ExpertReport", "ExpertTrainingConfig", "evaluate_sync", "load_clips", "prepare_clip",
           "train_experts"]
