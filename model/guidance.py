"""Classifier-free guidance: per-sample condition dropout in training, the matching null at sampling.

Each condition (reference image, audio, emotion, description) is dropped independently with the
probabilities of ``GuidanceDropout``. The null value is the same in training and sampling: dropped audio,
emotion and description tokens are zeros, and a dropped reference is masked out of the spatial attention
(``FrameConditions.reference_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import GuidanceDropout


@dataclass
class ConditionKeep:
    """``(B,)`` bool per condition; False = replaced by its null value."""

    reference: torch.Tensor
    audio: torch.Tensor
    emotion: torch.Tensor
    description: torch.Tensor

    @classmethod
    def all(cls, batch_size: int, keep: bool = True, device=None) -> ConditionKeep:
        flags = torch.full((batch_size,), keep, dtype=torch.bool, device=device)
        return cls(flags, flags.clone(), flags.clone(), flags.clone())


def sample_keep(batch_size: int, dropout: GuidanceDropout, generator: torch.Generator | None = None,
                device=None) -> ConditionKeep:
    def draw(p: float) -> torch.Tensor:
        return (torch.rand(batch_size, generator=generator) >= p).to(device)

    return ConditionKeep(draw(dropout.reference), draw(dropout.audio), draw(dropout.emotion),
                         draw(dropout.description))


def null_where_dropped(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the samples of ``values (B, ...)`` whose ``keep`` is False."""
    return values * keep.view(-1, *([1] * (values.ndim - 1))).to(values.dtype)
