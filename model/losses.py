"""The training losses of paper section 3.7, as plain functions.

* ``diffusion_loss``: MSE to the epsilon or v target with min-SNR-gamma weights (Hang et al. 2023) applied
  per sample *before* the batch mean (Hallo averages first and weights after, which mixes samples' weights).
* ``sync_loss`` (eq. 2): squared differences of the global offset and of the misalignment time, from any
  model implementing ``SyncModel`` (paper: Synchformer; here a SyncNet-style expert, ``model/experts.py``).
* ``emo_loss`` (eq. 3): valence/arousal averaged per 50%-overlap window, squared error averaged over windows.
* ``au_loss`` (eq. 4): mean squared error of per-frame action units.
* ``attr_action_loss`` (eq. 5): cosine distance of description embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, snr: torch.Tensor, prediction_type: str,
                   snr_gamma: float | None) -> torch.Tensor:
    """``prediction``/``target`` ``(B, ...)``, ``snr (B,)``; returns a scalar.

    Weight per sample: ``min(SNR, gamma) / SNR`` for epsilon and ``min(SNR, gamma) / (SNR + 1)`` for v (the
    same weighting expressed on each target). ``snr_gamma=None`` gives the plain MSE."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if snr_gamma is None:
        return per_sample.mean()
    clipped = snr.clamp(max=snr_gamma)
    if prediction_type == "v_prediction":
        weight = clipped / (snr + 1)
    else:
        weight = clipped / snr.clamp(min=1e-8)
    return (weight * per_sample).mean()


@dataclass
class SyncEstimate:
    """Global audio-visual offset and the time where misalignment is strongest, both in seconds, ``(B,)``."""

    offset_s: torch.Tensor
    misalignment_s: torch.Tensor


class SyncModel(Protocol):
    """Anything that can estimate sync from frames ``(B, T, 3, H, W)`` in [-1, 1] and per-frame audio
    features ``(B, T, L, D)``; Synchformer or the SyncNet-style expert both fit."""

    def estimate(self, frames: torch.Tensor, audio_features: torch.Tensor) -> SyncEstimate: ...


def sync_loss(predicted: SyncEstimate, ground_truth: SyncEstimate) -> torch.Tensor:
    """Eq. (2): ``(dt_p - dt_gt)^2 + (t_p - t_gt)^2``, averaged over the batch."""
    return ((predicted.offset_s - ground_truth.offset_s) ** 2
            + (predicted.misalignment_s - ground_truth.misalignment_s) ** 2).mean()


def window_means(values: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """``(B, T, C)`` -> ``(B, K, C)`` means over windows of ``window`` frames every ``hop`` frames; a clip
    shorter than a window is one window, and a last partial window is kept."""
    frames = values.shape[1]
    window = min(window, frames)
    hop = max(1, min(hop, window // 2)) if frames < 2 * window else hop
    starts = list(range(0, max(frames - window, 0) + 1, hop))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return torch.stack([values[:, s:s + window].mean(1) for s in starts], dim=1)


def emo_loss(predicted_va: torch.Tensor, target_va: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """Eq. (3). ``predicted_va``/``target_va`` ``(B, T, 2)`` per-frame (valence, arousal); windows of
    ``window`` frames with ``hop`` = window/2 (50% overlap)."""
    predicted, target = window_means(predicted_va, window, hop), window_means(target_va, window, hop)
    return ((predicted - target) ** 2).sum(-1).mean()


def au_loss(predicted_aus: torch.Tensor, target_aus: torch.Tensor) -> torch.Tensor:
    """Eq. (4): ``(B, T, N)`` action-unit intensities; mean over frames and units (and batch)."""
    return F.mse_loss(predicted_aus.float(), target_aus.float())


def attr_action_loss(predicted_embedding: torch.Tensor, target_embedding: torch.Tensor) -> torch.Tensor:
    """Eq. (5): ``1 - cos(e_p, e_gt)`` for ``(B, D)`` embeddings, averaged over the batch."""
    return (1 - F.cosine_similarity(predicted_embedding.float(), target_embedding.float(), dim=-1)).mean()
