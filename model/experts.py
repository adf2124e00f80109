"""Small differentiable evaluators that let the section 3.7 losses reach the generator.

The paper scores generated videos with non-differentiable or very large tools (Synchformer, a wav2vec2 VA
model on the audio, an AU detector, VideoLLaMA2 captions). Each is replaced by a compact network that maps
decoded frames ``(B, T, 3, H, W)`` in [-1, 1] to the same quantity, trained beforehand on the preprocessing
outputs and frozen here; weights load from a safetensors file (``load_expert_weights``):

* ``SyncNetExpert``: SyncNet-style two-tower model (lower-half face windows vs audio windows). Sync
  estimate = soft-argmax of similarity over audio shifts (offset) and soft-argmin over windows of the
  in-sync similarity (where misalignment is strongest). Deviation: the audio tower reads the per-frame
  wav2vec2 states already in the shards rather than MFCCs, and the offset is signed, not its magnitude.
* ``AURegressor``: per-frame AU intensities ``(B, T, N_AU)``, targets from preprocessing.
* ``ValenceArousalRegressor``: per-frame (valence, arousal) ``(B, T, 2)`` from faces. The paper reads VA
  from the generated video's *audio*, which is the driving audio and carries no gradient; the face is the
  only part of the output the generator controls, so we regress VA from it.
* ``DescriptionProjector``: a video embedding ``(B, 768)`` trained to match the CLIP-text embedding of the
  clip's description: the differentiable proxy for "caption the generated video with VideoLLaMA2, embed it".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from model.config import ModelConfig
from model.losses import SyncEstimate


def load_expert_weights(module: nn.Module, path: str) -> nn.Module:
    """Load a safetensors state dict (strictly) and freeze the module."""
    module.load_state_dict(load_file(path))
    return module.requires_grad_(False).eval()


class FrameEncoder(nn.Module):
    """``(N, C_in, S, S)`` -> ``(N, width * 4)``: four stride-2 conv stages and global average pooling."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        layers, channels = [], in_channels
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.SiLU()]
            channels = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width * 4

    def forward(self, x):
        return self.net(x)


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, T, 3, H, W)`` -> ``(B*T, 3, size, size)``."""
    return F.interpolate(frames.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)


class SyncNetExpert(nn.Module):
    def __init__(self, cfg: ModelConfig, temperature: float = 0.1):
        super().__init__()
        d = cfg.data
        self.window, self.max_shift, self.fps = cfg.sync_window, cfg.sync_max_shift, d.fps
        self.size, self.temperature = cfg.expert_image_size, temperature
        self.video = FrameEncoder(3 * self.window, cfg.expert_width)
        self.audio = nn.Sequential(nn.Linear(self.window * d.wav2vec_layers * d.wav2vec_dim, 4 * cfg.expert_width),
                                   nn.SiLU(), nn.Linear(4 * cfg.expert_width, self.video.out_features))

    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T-w+1, E)`` one embedding per window of the lower face half."""
        b, t = frames.shape[:2]
        lower = frames[..., frames.shape[-2] // 2:, :]
        x = F.interpolate(lower.flatten(0, 1), size=(self.size // 2, self.size), mode="bilinear",
                          align_corners=False).unflatten(0, (b, t))
        windows = x.unfold(1, self.window, 1)  # (B, K, 3, h, w, win)
        windows = windows.permute(0, 1, 5, 2, 3, 4).flatten(2, 3)  # (B, K, win*3, h, w)
        return F.normalize(self.video(windows.flatten(0, 1)).unflatten(0, (b, -1)), dim=-1)

    def embed_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """``(B, T, L, D)`` -> ``(B, T-w+1, E)``."""
        windows = audio_features.flatten(2).unfold(1, self.window, 1).transpose(2, 3).flatten(2)
        return F.normalize(self.audio(windows.float()), dim=-1)

    def estimate(self, frames: torch.Tensor, audio_features: torch.Tensor) -> SyncEstimate:
        """Frames ``(B, T, 3, H, W)`` and their audio ``(B, T, L, D)`` (same frames, aligned)."""
        s = self.max_shift
        video = self.embed_video(frames)  # (B, K, E)
        padded = torch.cat([audio_features[:, :1].expand(-1, s, -1, -1), audio_features,
                            audio_features[:, -1:].expand(-1, s, -1, -1)], 1)
        audio = self.embed_audio(padded)  # (B, K + 2s, E)
        k = video.shape[1]
        similarity = torch.stack([(video * audio[:, shift:shift + k]).sum(-1) for shift in range(2 * s + 1)], -1)
        shifts = torch.arange(-s, s + 1, device=frames.device, dtype=similarity.dtype)
        offset = (similarity.mean(1) / self.temperature).softmax(-1) @ shifts
        in_sync = similarity[..., s]  # (B, K)
        centres = torch.arange(k, device=frames.device, dtype=similarity.dtype) + self.window / 2
        where = (-in_sync / self.temperature).softmax(-1) @ centres
        return SyncEstimate(offset / self.fps, where / self.fps)


class AURegressor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, cfg.data.au_count)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, N_AU)``."""
        return self.head(self.encoder(_resize(frames, self.size))).unflatten(0, frames.shape[:2])


class ValenceArousalRegressor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, 2)`` (valence, arousal)."""
        return self.head(self.encoder(_resize(frames, self.size))).unflatten(0, frames.shape[:2])


class DescriptionProjector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, cfg.data.text_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, text_dim)``, in the space of ``description_embedding``."""
        per_frame = self.encoder(_resize(frames, self.size)).unflatten(0, frames.shape[:2])
        return self.head(per_frame.mean(1))


def description_embedding(description_tokens: torch.Tensor) -> torch.Tensor:
    """CLIP-text last hidden state ``(B, 77, D)`` -> one vector ``(B, D)`` (mean over tokens: the shards keep
    the hidden states but not the token ids that would locate the end-of-text token)."""
    return description_tokens.float().mean(1)


class LossExperts(nn.Module):
    """The four evaluators together; frozen. Build, then ``load_expert_weights`` each from its file."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.sync = SyncNetExpert(cfg)
        self.au = AURegressor(cfg)
        self.valence_arousal = ValenceArousalRegressor(cfg)
        self.description = DescriptionProjector(cfg)
        self.requires_grad_(False).eval()
