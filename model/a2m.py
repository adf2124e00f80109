"""Audio-to-Motion module, A2M (paper section 3.5, Figure 2(b)): a VAE whose prior is a VP-Flow.

It produces the ``M`` motion frames, in SD-VAE latent space ``(B, M, 4, h, w)``, that the denoiser's temporal
attention sees before the first generated clip (later clips use their predecessor's last frames).

Inputs: reference latent ``(B, 4, h, w)``, wav2vec2 states of the motion frames ``(B, M, L, D)``, and for
training the true motion latents ``(B, M, 4, h, w)``. The audio becomes a per-frame condition
``(B, H, M, 1, 1)`` shared by encoder, flow and decoder.

* Encoder: ``[motion, reference]`` -> posterior ``N(mu, sigma)`` over ``z_p (B, Z, M, h/s, w/s)``.
* Prior: ``z_q ~ N(0, I)``, ``z_p = VPFlow(z_q | audio)``. Because the flow preserves volume,
  ``log p(z_p) = log N(VPFlow^{-1}(z_p); 0, I)`` with no log-det term.
* Decoder: ``(z_p, audio, reference)`` -> motion latents, predicted as a residual on the reference latent.
  Its output layer starts at zero, so an untrained A2M returns the reference latent for every motion frame.

Training loss (``loss``): reconstruction MSE + ``kl_weight`` x single-sample KL(q(z_p|x) || p(z_p)).
Deviation: the paper leaves the network bodies and conditioning unspecified; these are small 3-D conv nets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.vp_flow import VPFlow


def _gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


class AudioToMotion(nn.Module):
    def __init__(self, latent_channels: int, audio_layers: int, audio_dim: int, hidden: int,
                 z_channels: int, downsample: int, flow_layers: int):
        super().__init__()
        steps = int(math.log2(downsample))
        self.audio = nn.Sequential(nn.Linear(audio_layers * audio_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.encoder_in = nn.Conv3d(2 * latent_channels, hidden, 3, padding=1)
        self.encoder_down = nn.ModuleList(nn.Conv3d(hidden, hidden, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
                                          for _ in range(steps))
        self.encoder_out = nn.Conv3d(hidden, 2 * z_channels, 1)
        self.reference_down = nn.Conv3d(latent_channels, hidden, (1, downsample, downsample),
                                        stride=(1, downsample, downsample))
        self.decoder_in = nn.Conv3d(z_channels, hidden, 3, padding=1)
        self.decoder_up = nn.ModuleList(nn.Conv3d(hidden, hidden, 3, padding=1) for _ in range(steps))
        self.decoder_out = nn.Conv3d(hidden, latent_channels, 3, padding=1)
        # Zero output: an untrained A2M returns the reference latent for every motion frame (what Hallo feeds the
        # first clip), never random noise; the decoder then learns a residual from there.
        nn.init.zeros_(self.decoder_out.weight)
        nn.init.zeros_(self.decoder_out.bias)
        self.flow = VPFlow(z_channels, hidden, hidden, flow_layers)
        self.z_channels, self.downsample = z_channels, downsample

    def audio_condition(self, audio_features: torch.Tensor) -> torch.Tensor:
        """``(B, M, L, D)`` -> ``(B, hidden, M, 1, 1)``."""
        cond = self.audio(audio_features.flatten(2).to(self.decoder_out.weight.dtype))
        return cond.permute(0, 2, 1)[..., None, None]

    def encode(self, motion_latents, reference_latents, cond):
        """Posterior ``(mu, log_std)``, each ``(B, Z, M, h/s, w/s)``."""
        frames = motion_latents.shape[1]
        reference = reference_latents[:, None].expand(-1, frames, -1, -1, -1)
        x = torch.cat([motion_latents, reference], 2).transpose(1, 2)  # (B, 2C, M, h, w)
        x = F.silu(self.encoder_in(x) + cond)
        for down in self.encoder_down:
            x = F.silu(down(x) + cond)
        mean, log_std = self.encoder_out(x).chunk(2, dim=1)
        return mean, log_std.clamp(-7, 2)

    def decode(self, z_p, reference_latents, cond):
        """``z_p (B, Z, M, h/s, w/s)`` -> motion latents ``(B, M, C, h, w)``."""
        reference = reference_latents[:, :, None]  # (B, C, 1, h, w)
        x = F.silu(self.decoder_in(z_p) + self.reference_down(reference) + cond)
        for up in self.decoder_up:
            x = F.silu(up(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")) + cond)
        return (reference + self.decoder_out(x)).transpose(1, 2)

    def loss(self, motion_latents, reference_latents, audio_features, kl_weight: float = 1e-3) -> dict:
        cond = self.audio_condition(audio_features)
        mean, log_std = self.encode(motion_latents, reference_latents, cond)
        z_p = mean + torch.randn_like(mean) * log_std.exp()
        reconstruction = F.mse_loss(self.decode(z_p, reference_latents, cond), motion_latents)
        z_q = self.flow.inverse(z_p, cond)
        zeros = torch.zeros_like(z_q)
        kl = (_gaussian_log_prob(z_p, mean, log_std) - _gaussian_log_prob(z_q, zeros, zeros)).mean()
        return {"a2m_reconstruction": reconstruction, "a2m_kl": kl,
                "a2m": reconstruction + kl_weight * kl}

    def sample(self, reference_latents, audio_features, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Motion latents ``(B, M, C, h, w)`` for the ``M`` frames whose audio is ``audio_features``.

        The noise is drawn on the reference's device, so ``generator`` must live there too
        (``model.devices.device_generator``; ``None`` on ``meta``, which has no generators)."""
        device = reference_latents.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"A2M samples on {device} but was given a generator on {generator.device}; "
                             f"make it with model.devices.device_generator({str(device)!r}, seed)")
        cond = self.audio_condition(audio_features)
        b, m = audio_features.shape[:2]
        h, w = (n // self.downsample for n in reference_latents.shape[-2:])
        z_q = torch.randn((b, self.z_channels, m, h, w), generator=generator,
                          device=device, dtype=reference_latents.dtype) * temperature
        z_p, _ = self.flow(z_q, cond)
        return self.decode(z_p, reference_latents, cond)


A2M_PREFIX = "a2m."


def load_trained_a2m(a2m: AudioToMotion, checkpoint: str, weights: str = "ema") -> dict[str, torch.Tensor]:
    """Copy the A2M trained by an ``a2m`` run into ``a2m``, exactly (the recipe's step that puts it in the model).

    ``checkpoint`` is that run's checkpoint folder (``.../checkpoints/step-NNNNNNN``); ``weights`` picks its
    ``model.safetensors`` (``"model"``, the last optimizer step) or its EMA (``"ema"``, what its validation used;
    the EMA holds every A2M parameter because the a2m stage trains them all). Strict: every A2M tensor must be
    there with its shape. Returns the loaded tensors (``a2m.``-less names)."""
    from pathlib import Path

    from safetensors.torch import load_file

    if weights not in ("ema", "model"):
        raise ValueError(f"init_a2m_weights must be 'ema' or 'model', got {weights!r}")
    folder = Path(checkpoint)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"init_a2m_from={checkpoint}: no model.safetensors there; pass the a2m run's "
                                "checkpoint folder, e.g. /runs/a2m/checkpoints/step-0030000")
    state = {k.removeprefix(A2M_PREFIX): v for k, v in load_file(str(folder / "model.safetensors")).items()
             if k.startswith(A2M_PREFIX)}
    if weights == "ema":
        ema = {k.removeprefix(A2M_PREFIX): v for k, v in load_file(str(folder / "ema.safetensors")).items()
               if k.startswith(A2M_PREFIX)}
        if not ema:
            raise ValueError(f"init_a2m_from={checkpoint}: its EMA holds no A2M weights, so it is not an a2m run's "
                             "checkpoint; use the a2m run's folder or init_a2m_weights=model")
        state.update(ema)
    try:
        a2m.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"init_a2m_from={checkpoint}: its A2M does not match this model's "
                         f"(model size or A2M settings differ): {error}") from error
    return state


def is_untrained(a2m: AudioToMotion) -> bool:
    """True while the output layer is still the zero initialisation: such an A2M returns the reference."""
    if a2m.decoder_out.weight.is_meta:  # a model built on the meta device has no values to look at
        return False
    return not (a2m.decoder_out.weight.any() or a2m.decoder_out.bias.any())
