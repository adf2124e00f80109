"""Audio projection (paper sections 3.2 and 3.5): wav2vec 2.0 hidden states to audio tokens per video frame.

Input: ``(B, F, L, D)`` hidden states of all ``L`` wav2vec2 layers (13 x 768 for wav2vec2-base, the CNN
output plus 12 transformer layers), already resampled to one set per 25 fps video frame. Each frame takes
``context`` frames on each side (edges repeat the first/last frame), all layers concatenated, and an MLP maps
that ``(2*context+1) * L * D`` vector to ``N`` tokens of width ``token_dim``: output ``(B, F, N, token_dim)``.

Same recipe as Hallo's audio projection (5 frames of context, 32 tokens); the only difference is that all 13
layers are used, as the data stores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frame_context(features: torch.Tensor, context: int) -> torch.Tensor:
    """``(B, F, ...)`` -> ``(B, F, 2*context+1, ...)``: each frame with its neighbours, edges repeated."""
    if context == 0:
        return features.unsqueeze(2)
    frames = features.shape[1]
    index = torch.arange(frames, device=features.device)[:, None] + torch.arange(-context, context + 1,
                                                                                  device=features.device)
    return features[:, index.clamp(0, frames - 1)]


class AudioProjection(nn.Module):
    def __init__(self, layers: int, dim: int, context: int, hidden: int, tokens: int, token_dim: int):
        super().__init__()
        self.context, self.tokens, self.token_dim = context, tokens, token_dim
        self.net = nn.Sequential(
            nn.Linear((2 * context + 1) * layers * dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, tokens * token_dim),
        )
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        windows = frame_context(features, self.context).flatten(2)
        tokens = self.net(windows.to(self.norm.weight.dtype))
        return self.norm(tokens.unflatten(-1, (self.tokens, self.token_dim)))


def resample_to_frames(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """wav2vec2 states ``(L, S, D)`` at 50 Hz -> ``(num_frames, L, D)`` at the video rate (linear)."""
    states = F.interpolate(hidden_states.transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
    return states.permute(2, 0, 1)
