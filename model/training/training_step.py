"""One training step's losses (paper section 3.7), for each stage of ``model/synchrorama.py``.

The diffusion loss uses every clip frame. The pixel-space losses (sync, emo, AU, attr-action) decode only
``recipe.pixel_frames`` consecutive predicted frames, with activation checkpointing through the frozen VAE
decoder, and run only when their stage weight is non-zero (``LossWeights``): stage 1 has them off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from model.devices import host_generator
from model.emotion_embedding import EmotionFeatures, align_windows_to_frames
from model.experts import LossExperts, description_embedding
from model.guidance import ConditionKeep, sample_keep
from model.losses import attr_action_loss, au_loss, diffusion_loss, emo_loss, sync_loss
from model.schedule import predicted_clean_latents, signal_to_noise, training_target
from model.synchrorama import SynchroRamaModel
from model.training.batch import TrainingBatch


def decode_frames(vae, latents: torch.Tensor, scale: float, checkpointed: bool) -> torch.Tensor:
    """``(B, n, 4, h, w)`` scaled latents -> ``(B, n, 3, H, W)`` frames in [-1, 1].

    One frame per VAE call, and with ``checkpointed`` one frame per checkpoint region: backward then keeps
    only each frame's latent and decoded image and recomputes one frame's decoder activations at a time
    (about 4.7 GiB per 512x512 frame under bf16 autocast) instead of all ``B*n`` at once (168 GiB for 4 x 9
    frames; ``model/training/memory_estimate.py``, docs/model.md "Memory"). The
    decoder has no cross-frame layers, so this is the same function; a 64x64 latent already fills a GPU's
    convolutions, so the frame loop costs little throughput. Frames without gradient are decoded one at a
    time too: their transient activations would otherwise add to the peak on top of the UNet's saved ones.
    """
    flat = latents.flatten(0, 1) / scale

    def run(z):
        return vae.decode(z).sample

    frames = [torch.utils.checkpoint.checkpoint(run, z, use_reentrant=False) if checkpointed else run(z)
              for z in flat.split(1)]
    return torch.cat(frames).unflatten(0, latents.shape[:2])


@dataclass(frozen=True)
class StepOptions:
    """Per-sample choices of a training step that are run settings, not model sizes (``TrainConfig`` sets them).

    * ``motion_from_a2m`` / ``motion_from_reference``: probability that a stage-2 sample's motion frames are
      replaced by the A2M module's sample from the reference and the motion frames' audio, or by the reference
      latent repeated, instead of the true frames before the clip. Paper section 6 (Table 3): the denoiser is
      trained on A2M's audio-driven motion frames, which is what the first clip gets at sampling. Deviation: the
      paper gives no rate; keeping some true motion frames trains the later clips' case (the previous clip's
      frames), and the reference case is what an untrained (zero-output) A2M returns.
    * ``unconditional``: probability of dropping audio, emotion and description together while keeping the
      reference: exactly the sampler's unconditional branch (``model/pipeline.py``), which independent dropout
      alone reaches with probability ``0.05 x 0.1 x 0.1 = 5e-4``.

    All zero (the defaults) draws nothing extra from the step's generator: the step is what it was without them.
    """

    motion_from_a2m: float = 0.0
    motion_from_reference: float = 0.0
    unconditional: float = 0.0

    def __post_init__(self):
        for name in ("motion_from_a2m", "motion_from_reference", "unconditional"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.motion_from_a2m + self.motion_from_reference > 1.0:
            raise ValueError(f"motion_from_a2m + motion_from_reference must be at most 1, got "
                             f"{self.motion_from_a2m} + {self.motion_from_reference}")


# How a sample's motion frames were chosen (``training_motion_frames``).
TRUE_MOTION, A2M_MOTION, REFERENCE_MOTION = 0, 1, 2
# Fractions of the batch that the step returns next to its losses; logged under their own names, never summed.
STEP_STATISTICS = ("motion_from_a2m", "motion_from_reference", "unconditional")


def drop_all_but_reference(keep: ConditionKeep, probability: float, generator: torch.Generator | None = None
                           ) -> tuple[ConditionKeep, torch.Tensor]:
    """``keep`` with audio, emotion and description dropped together for a ``probability`` share of the samples
    (the sampler's unconditional branch); returns it and the ``(B,)`` bool of those samples."""
    b, device = keep.audio.shape[0], keep.audio.device  # ``keep.reference`` may be None (all kept): unchanged
    if not probability:
        return keep, torch.zeros(b, dtype=torch.bool, device=device)
    joint = (torch.rand(b, generator=generator) < probability).to(device)
    return ConditionKeep(keep.reference, keep.audio & ~joint, keep.emotion & ~joint,
                         keep.description & ~joint), joint


def training_motion_frames(model: SynchroRamaModel, batch: TrainingBatch, options: StepOptions,
                           generator: torch.Generator | None = None, control: torch.Generator | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The motion frames the denoiser sees per sample, ``(B, M, 4, h, w)``, and how each was chosen ``(B,)``
    (``TRUE_MOTION``, ``A2M_MOTION`` or ``REFERENCE_MOTION``). A2M samples without gradient (it is frozen here)
    from the reference latent and the wav2vec2 states of the M motion frames, as the sampler does for the first
    clip. ``generator`` draws A2M's latent (on the device); ``control`` the per-sample choice (host). Pass the
    step's own host generator as ``control``: ``host_generator(generator)`` of a device generator is a fresh
    one with a fixed seed, which would repeat the condition-dropout draws."""
    motion = batch.motion_latents
    b, m = motion.shape[:2]
    if m == 0 or not (options.motion_from_a2m or options.motion_from_reference):
        return motion, torch.full((b,), TRUE_MOTION, dtype=torch.long, device=motion.device)
    draw = torch.rand(b, generator=control or host_generator(generator))  # a host decision (model/devices.py)
    source = torch.full((b,), TRUE_MOTION, dtype=torch.long)
    source[draw < options.motion_from_a2m + options.motion_from_reference] = REFERENCE_MOTION
    source[draw < options.motion_from_a2m] = A2M_MOTION
    source = source.to(motion.device)
    pick = source.view(b, 1, 1, 1, 1)
    reference = batch.reference_latents[:, None].to(motion.dtype).expand_as(motion)
    chosen = torch.where(pick == REFERENCE_MOTION, reference, motion)
    if options.motion_from_a2m:  # sampled for every sample, so the generator's stream does not depend on the draw
        with torch.no_grad():
            sampled = model.a2m.sample(batch.reference_latents, batch.audio_features[:, :m], generator=generator)
        chosen = torch.where(pick == A2M_MOTION, sampled.to(motion.dtype), chosen)
    return chosen, source


def training_losses(model: SynchroRamaModel, batch: TrainingBatch, scheduler, stage: str, vae=None,
                    experts: LossExperts | None = None, generator: torch.Generator | None = None,
                    options: StepOptions | None = None) -> dict:
    """Named losses of one batch; ``"total"`` is the weighted sum to back-propagate. Stages 1 and 2 also return
    ``STEP_STATISTICS`` (fractions of the batch, not losses)."""
    options = options or StepOptions()
    cfg = model.cfg
    m = cfg.motion_frames
    if stage == "a2m":
        losses = model.a2m.loss(batch.motion_latents, batch.reference_latents, batch.audio_features[:, :m])
        return {**losses, "total": losses["a2m"]}

    weights = cfg.recipe.stage1_losses if stage == "stage1" else cfg.recipe.stage2_losses
    latents = batch.latents
    b, device = latents.shape[0], latents.device
    # ``generator`` lives on the model's device (noise); keep flags, timesteps and the decoded span are host
    # decisions drawn with a CPU generator (model/devices.py); on the CPU both are the same generator
    control = host_generator(generator)
    keep, unconditional = drop_all_but_reference(sample_keep(b, cfg.dropout, control, device),
                                                 options.unconditional, control)
    motion, motion_source = training_motion_frames(model, batch, options, generator, control) if stage == "stage2" else (
        batch.motion_latents, torch.full((b,), TRUE_MOTION, dtype=torch.long, device=device))
    with_audio = stage == "stage2"
    conditions, description = model.conditions(
        batch.reference_latents, batch.description, batch.audio_features if with_audio else None,
        batch.emotion if with_audio else None, batch.first_frame, keep)

    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    host_timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=control)
    timesteps = host_timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, motion, description, conditions)
    target = training_target(scheduler, latents, noise, timesteps)
    snr = signal_to_noise(scheduler.alphas_cumprod, timesteps)
    losses = {"diffusion": diffusion_loss(prediction, target, snr, scheduler.config.prediction_type,
                                          cfg.recipe.snr_gamma)}

    pixel_weights = {"sync": weights.sync, "emo": weights.emo, "au": weights.au, "attr_action": weights.attr_action}
    if any(pixel_weights.values()):
        if vae is None or experts is None:
            raise ValueError(f"{stage} has pixel losses switched on but no VAE or experts were given")
        clean = predicted_clean_latents(scheduler, noisy, prediction, timesteps)
        # near pure noise the predicted clean frame is a guess: only samples below the threshold are scored
        scored = host_timesteps < cfg.recipe.pixel_loss_max_timestep  # on the host: no device sync to select
        losses.update(pixel_losses(model, batch, clean, vae, experts, pixel_weights, control, scored))

    all_weights = {"diffusion": weights.diffusion, **pixel_weights}
    losses["total"] = sum(all_weights[name] * value for name, value in losses.items())
    statistics = {"motion_from_a2m": (motion_source == A2M_MOTION).float().mean(),
                  "motion_from_reference": (motion_source == REFERENCE_MOTION).float().mean(),
                  "unconditional": unconditional.float().mean()}
    return {**losses, **statistics}


def pixel_losses(model, batch, clean_latents, vae, experts, weights, generator=None, scored=None) -> dict:
    """The weighted pixel losses of the samples where ``scored (B,)`` is true (all when None); zeros, and no
    decode at all, when no sample is scored."""
    cfg, d = model.cfg, model.cfg.data
    t = clean_latents.shape[1]
    n = min(cfg.recipe.pixel_frames, t)
    start = int(torch.randint(0, t - n + 1, (1,), generator=generator))
    if scored is not None and not scored.all():
        if not scored.any():
            zero = clean_latents.new_zeros(())
            return {name: zero for name, weight in weights.items() if weight}
        batch, clean_latents = select_samples(batch, scored), clean_latents[scored]
    span = slice(start, start + n)
    predicted = decode_frames(vae, clean_latents[:, span], d.vae_scale, checkpointed=True)
    with torch.no_grad():
        real = decode_frames(vae, batch.latents[:, span], d.vae_scale, checkpointed=False)
    audio_start = cfg.motion_frames + start
    audio = batch.audio_features[:, audio_start:audio_start + n]

    losses = {}
    if weights["sync"]:
        if getattr(experts.sync, "reads_waveform", False):  # syncnet_v2 (sync_expert=): MFCC of the waveform
            if batch.waveform is None:
                raise ValueError("the sync expert reads the clip's 16 kHz waveform, and this batch has none "
                                 "(TrainingBatch.waveform); model/training/train.py's training_batch fills it from the shards")
            spf = d.samples_per_frame
            audio = batch.waveform[:, audio_start * spf:(audio_start + n) * spf]
        with torch.no_grad():
            reference = experts.sync.estimate(real, audio)
        losses["sync"] = sync_loss(experts.sync.estimate(predicted, audio), reference)
    if weights["emo"]:
        target_va = align_windows_to_frames(batch.emotion.va_values[..., :2].float(),
                                            batch.first_frame + audio_start, n, d.va_window_frames, d.va_hop_frames)
        window = cfg.recipe.emo_window_frames  # eq. 3's windows, sized to fit the decoded frames (model/config.py)
        losses["emo"] = emo_loss(experts.valence_arousal(predicted), target_va, window, window // 2)
    if weights["au"]:
        losses["au"] = au_loss(experts.au(predicted), batch.aus[:, span])
    if weights["attr_action"]:
        losses["attr_action"] = attr_action_loss(experts.description(predicted),
                                                 description_embedding(batch.description))
    return losses


def select_samples(batch: TrainingBatch, index: torch.Tensor) -> TrainingBatch:
    """The samples of ``batch`` picked by a boolean or integer ``index`` over its first axis."""
    picked = {name: value[index] for name, value in vars(batch).items() if isinstance(value, torch.Tensor)}
    return TrainingBatch(**picked, emotion=EmotionFeatures(*(v[index] for v in vars(batch.emotion).values())))
