"""Classifier-free guidance: per-sample condition dropout in training, the matching null at sampling.

Each condition (reference image, audio, emotion, description) is dropped independently with the
probabilities of ``GuidanceDropout``. The null value is the same in training and sampling: dropped audio,
emotion and description tokens are zeros, and a dropped reference is masked out of the spatial attention
(``FrameConditions.reference_keep``).

Devices: the flags are host decisions (``model/devices.py``): drawn on the CPU, because whether any sample
drops its reference decides, in Python, whether the denoiser needs the masked attention kernel at all, then
moved once to the model's device. ``reference`` is ``None`` when every sample keeps its reference (known on
the host, so no GPU sync and the unmasked, faster attention kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import GuidanceDropout


@dataclass
class ConditionKeep:
    """``(B,)`` bool per condition on the model's device; False = replaced by its null value.
    ``reference`` is ``None`` when no sample drops its reference."""

    reference: torch.Tensor | None
    audio: torch.Tensor
    emotion: torch.Tensor
    description: torch.Tensor

    @classmethod
    def all(cls, batch_size: int, keep: bool = True, device=None) -> ConditionKeep:
        flags = torch.full((batch_size,), keep, dtype=torch.bool, device=device)
        return cls(None if keep else flags.clone(), flags.clone(), flags.clone(), flags.clone())


def sample_keep(batch_size: int, dropout: GuidanceDropout, generator: torch.Generator | None = None,
                device=None) -> ConditionKeep:
    """Independent per-sample dropout of each condition, drawn on the host with ``generator`` (a CPU
    generator or ``None``; see ``model/devices.host_generator``) and returned on ``device``."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"sample_keep draws host decisions and needs a CPU generator, got one on "
                         f"{generator.device}; pass model.devices.host_generator(generator)")

    def draw(p: float) -> torch.Tensor:
        return torch.rand(batch_size, generator=generator) >= p

    reference, audio, emotion, description = (draw(p) for p in (dropout.reference, dropout.audio,
                                                                 dropout.emotion, dropout.description))
    return ConditionKeep(None if bool(reference.all()) else reference.to(device), audio.to(device),
                         emotion.to(device), description.to(device))


def null_where_dropped(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the samples of ``values (B, ...)`` whose ``keep`` is False (``keep`` on ``values``' device)."""
    return values * keep.view(-1, *([1] * (values.ndim - 1))).to(values.dtype)
