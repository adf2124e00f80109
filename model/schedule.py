"""Noise schedules for training and DDIM sampling, built from one description so they cannot drift apart.

SD 1.5's scaled-linear betas, rescaled to zero terminal SNR, with "trailing" timestep spacing and
v-prediction by default (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
Hallo trains with one scheduler configuration and validates with another; here ``sample_scheduler`` is
``DDIMScheduler.from_config(train_scheduler.config)``, so betas, prediction type and spacing are identical.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from model.config import TrainRecipe


def train_scheduler(recipe: TrainRecipe) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=recipe.prediction_type,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        steps_offset=1,
    )


def sample_scheduler(recipe: TrainRecipe) -> DDIMScheduler:
    return DDIMScheduler.from_config(train_scheduler(recipe).config)


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), ``(B,)``."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the network predicts: the noise (epsilon) or the velocity v."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {scheduler.config.prediction_type}")


def predicted_clean_latents(scheduler, noisy, prediction, timesteps) -> torch.Tensor:
    """x0 implied by a prediction; ``timesteps (B,)`` broadcast over the remaining dims."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float()
    alpha_bar = alpha_bar.view(-1, *([1] * (noisy.ndim - 1)))
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    # zero terminal SNR makes alpha_bar(T) = 0; clamp so epsilon-prediction stays finite there
    return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt().clamp(min=1e-4)
