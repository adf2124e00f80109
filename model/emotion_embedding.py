"""Multi-modal emotion embedding (paper section 3.6, eq. 1): ``E = Concat(E_t, E_ser, E_va)`` to tokens.

Inputs per clip (``EmotionFeatures``):
    E_t   text sentiment of the transcript: probs ``(B, 7)`` + embedding ``(B, 768)``
    E_ser speech emotion recognition: probs ``(B, C_ser)`` + embedding ``(B, 256)`` (the SER head's input)
    E_va  valence/arousal/dominance per audio window (2 s, hop 1 s: 50% overlap): ``(B, K, 3)`` + ``(B, K, 1024)``

The window sequence is aligned to video frames (``align_windows_to_frames``: each frame blends the windows
that cover it, weighted by closeness to their centres), so ``E`` is ``(B, F, 7+768+C_ser+256+3+1024)`` and an
MLP maps it to ``N`` emotion tokens per frame ``(B, F, N, 768)`` for the denoiser's emotion attention.
Deviation: the paper feeds E through "a cross-attention layer" without saying how VA windows meet frames;
per-frame alignment is our choice so that emotion can change within a long video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EmotionFeatures:
    text_probs: torch.Tensor
    text_embedding: torch.Tensor
    speech_probs: torch.Tensor
    speech_embedding: torch.Tensor
    va_values: torch.Tensor  # (B, K, 3): valence, arousal, dominance per window
    va_embedding: torch.Tensor  # (B, K, D_va)

    def to(self, device) -> EmotionFeatures:
        return EmotionFeatures(*(t.to(device) for t in vars(self).values()))


def align_windows_to_frames(windows: torch.Tensor, first_frame: torch.Tensor, num_frames: int,
                            window_frames: int, hop_frames: int) -> torch.Tensor:
    """Per-window values ``(B, K, C)`` -> per-frame values ``(B, num_frames, C)``.

    Window ``k`` covers source frames ``[k*hop, k*hop + window)``; ``first_frame (B,)`` is the source index of
    the clip's first frame. Frames beyond the last window take the nearest window."""
    k = windows.shape[1]
    frame = first_frame[:, None].float() + torch.arange(num_frames, device=windows.device) + 0.5  # (B, F)
    centres = torch.arange(k, device=windows.device) * hop_frames + window_frames / 2  # (K,)
    distance = (frame[..., None] - centres).abs()  # (B, F, K)
    weights = (1 - distance / (window_frames / 2)).clamp(min=0)
    nearest = torch.nn.functional.one_hot(distance.argmin(-1), k).to(weights)
    covered = weights.sum(-1, keepdim=True) > 0
    weights = torch.where(covered, weights, nearest)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(windows.dtype) @ windows


class EmotionEmbedding(nn.Module):
    def __init__(self, input_dim: int, hidden: int, tokens: int, token_dim: int,
                 window_frames: int, hop_frames: int):
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.window_frames, self.hop_frames = window_frames, hop_frames
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.SiLU(), nn.Linear(hidden, tokens * token_dim))
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, emotion: EmotionFeatures, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Returns ``(B, num_frames, N, token_dim)``."""
        va = torch.cat([emotion.va_values, emotion.va_embedding], -1)
        va = align_windows_to_frames(va, first_frame, num_frames, self.window_frames, self.hop_frames)
        clip_level = torch.cat([emotion.text_probs, emotion.text_embedding,
                                emotion.speech_probs, emotion.speech_embedding], -1)
        e = torch.cat([clip_level[:, None].expand(-1, num_frames, -1), va], -1)  # eq. (1), per frame
        tokens = self.net(e.to(self.norm.weight.dtype))
        return self.norm(tokens.unflatten(-1, (self.tokens, self.token_dim)))
