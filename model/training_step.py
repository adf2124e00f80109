"""One training step's losses (paper section 3.7), for each stage of ``model/synchrorama.py``.

The diffusion loss uses every clip frame. The pixel-space losses (sync, emo, AU, attr-action) decode only
``recipe.pixel_frames`` consecutive predicted frames, with activation checkpointing through the frozen VAE
decoder, and run only when their stage weight is non-zero (``LossWeights``): stage 1 has them off.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from model.batch import TrainingBatch
from model.emotion_embedding import align_windows_to_frames
from model.experts import LossExperts, description_embedding
from model.guidance import sample_keep
from model.losses import attr_action_loss, au_loss, diffusion_loss, emo_loss, sync_loss
from model.schedule import predicted_clean_latents, signal_to_noise, training_target
from model.synchrorama import SynchroRamaModel


def decode_frames(vae, latents: torch.Tensor, scale: float, checkpointed: bool) -> torch.Tensor:
    """``(B, n, 4, h, w)`` scaled latents -> ``(B, n, 3, H, W)`` frames in [-1, 1]."""
    flat = latents.flatten(0, 1) / scale

    def run(z):
        return vae.decode(z).sample

    frames = checkpoint(run, flat, use_reentrant=False) if checkpointed else run(flat)
    return frames.unflatten(0, latents.shape[:2])


def training_losses(model: SynchroRamaModel, batch: TrainingBatch, scheduler, stage: str, vae=None,
                    experts: LossExperts | None = None, generator: torch.Generator | None = None) -> dict:
    """Named losses of one batch; ``"total"`` is the weighted sum to back-propagate."""
    cfg = model.cfg
    m = cfg.motion_frames
    if stage == "a2m":
        losses = model.a2m.loss(batch.motion_latents, batch.reference_latents, batch.audio_features[:, :m])
        return {**losses, "total": losses["a2m"]}

    weights = cfg.recipe.stage1_losses if stage == "stage1" else cfg.recipe.stage2_losses
    latents = batch.latents
    b, device = latents.shape[0], latents.device
    keep = sample_keep(b, cfg.dropout, generator, device)
    with_audio = stage == "stage2"
    conditions, description = model.conditions(
        batch.reference_latents, batch.description, batch.audio_features if with_audio else None,
        batch.emotion if with_audio else None, batch.first_frame, keep)

    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, batch.motion_latents, description, conditions)
    target = training_target(scheduler, latents, noise, timesteps)
    snr = signal_to_noise(scheduler.alphas_cumprod, timesteps)
    losses = {"diffusion": diffusion_loss(prediction, target, snr, scheduler.config.prediction_type,
                                          cfg.recipe.snr_gamma)}

    pixel_weights = {"sync": weights.sync, "emo": weights.emo, "au": weights.au, "attr_action": weights.attr_action}
    if any(pixel_weights.values()):
        if vae is None or experts is None:
            raise ValueError(f"{stage} has pixel losses switched on but no VAE or experts were given")
        clean = predicted_clean_latents(scheduler, noisy, prediction, timesteps)
        losses.update(pixel_losses(model, batch, clean, vae, experts, pixel_weights, generator))

    all_weights = {"diffusion": weights.diffusion, **pixel_weights}
    losses["total"] = sum(all_weights[name] * value for name, value in losses.items())
    return losses


def pixel_losses(model, batch, clean_latents, vae, experts, weights, generator=None) -> dict:
    cfg, d = model.cfg, model.cfg.data
    t = clean_latents.shape[1]
    n = min(cfg.recipe.pixel_frames, t)
    start = int(torch.randint(0, t - n + 1, (1,), generator=generator))
    span = slice(start, start + n)
    predicted = decode_frames(vae, clean_latents[:, span], d.vae_scale, checkpointed=True)
    with torch.no_grad():
        real = decode_frames(vae, batch.latents[:, span], d.vae_scale, checkpointed=False)
    audio_start = cfg.motion_frames + start
    audio = batch.audio_features[:, audio_start:audio_start + n]

    losses = {}
    if weights["sync"]:
        with torch.no_grad():
            reference = experts.sync.estimate(real, audio)
        losses["sync"] = sync_loss(experts.sync.estimate(predicted, audio), reference)
    if weights["emo"]:
        target_va = align_windows_to_frames(batch.emotion.va_values[..., :2].float(),
                                            batch.first_frame + audio_start, n, d.va_window_frames, d.va_hop_frames)
        losses["emo"] = emo_loss(experts.valence_arousal(predicted), target_va, d.va_window_frames,
                                 d.va_window_frames // 2)
    if weights["au"]:
        losses["au"] = au_loss(experts.au(predicted), batch.aus[:, span])
    if weights["attr_action"]:
        losses["attr_action"] = attr_action_loss(experts.description(predicted),
                                                 description_embedding(batch.description))
    return losses
