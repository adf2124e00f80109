"""A training batch as the data loader provides it, and a fake one with the same shapes for tests.

Shapes (B samples, M motion frames, T clip frames, 25 fps):
    latents            (B, T, 4, h, w)   target frames, SD-VAE latents already multiplied by ``vae_scale``
    motion_latents     (B, M, 4, h, w)   the M frames just before the clip
    reference_latents  (B, 4, h, w)      one frame of the same video
    audio_features     (B, M+T, L, D)    wav2vec2 states per frame (all layers), for motion and clip frames
    description        (B, 77, 768)      CLIP-text last hidden state of the video description
    emotion            EmotionFeatures   clip-level text/speech emotion, per-window VA (whole source clip)
    aus                (B, T, N_AU)      action units of the clip frames
    first_frame        (B,)              source-frame index of the first motion frame (aligns VA windows)
    waveform           (B, (M+T)*640)    16 kHz audio of the motion and clip frames, or None; read only by a
                                         sync loss whose expert takes audio, not wav2vec2 states (model/syncnet.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.emotion_embedding import EmotionFeatures


@dataclass
class TrainingBatch:
    latents: torch.Tensor
    motion_latents: torch.Tensor
    reference_latents: torch.Tensor
    audio_features: torch.Tensor
    description: torch.Tensor
    emotion: EmotionFeatures
    aus: torch.Tensor
    first_frame: torch.Tensor
    waveform: torch.Tensor | None = None


def fake_batch(cfg: ModelConfig, batch_size: int = 2, va_windows: int = 4, seed: int = 0) -> TrainingBatch:
    d = cfg.data
    g = torch.Generator().manual_seed(seed)
    b, m, t, s = batch_size, cfg.motion_frames, cfg.clip_frames, d.latent_size

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def probs(classes):
        return randn(b, classes).softmax(-1)

    return TrainingBatch(
        latents=randn(b, t, d.latent_channels, s, s),
        motion_latents=randn(b, m, d.latent_channels, s, s),
        reference_latents=randn(b, d.latent_channels, s, s),
        audio_features=randn(b, m + t, d.wav2vec_layers, d.wav2vec_dim).half(),
        description=randn(b, d.text_tokens, d.text_dim),
        emotion=EmotionFeatures(probs(d.text_emotion_classes), randn(b, d.text_emotion_dim),
                                probs(d.speech_emotion_classes), randn(b, d.speech_emotion_dim),
                                randn(b, va_windows, d.va_values).tanh(), randn(b, va_windows, d.va_dim)),
        aus=torch.rand(b, t, d.au_count, generator=g),
        first_frame=torch.randint(0, d.fps, (b,), generator=g),
    )
