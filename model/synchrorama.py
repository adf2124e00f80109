"""The whole SynchroRaMa generator (paper section 3.1, Figure 2): ReferenceNet, denoising UNet, audio
projection, multi-modal emotion embedding and the A2M module, plus which parts each training stage trains.

Stages (section 4): ``"stage1"`` trains the ReferenceNet and the denoiser's image layers (appearance);
``"stage2"`` trains the new video layers: temporal, audio and emotion attention, audio projection and emotion
embedding; ``"a2m"`` trains the Audio-to-Motion VAE on its own loss. Everything else is frozen in a stage.
"""

from __future__ import annotations

import torch
from torch import nn

from model.a2m import AudioToMotion
from model.audio_projection import AudioProjection
from model.conditions import FrameConditions
from model.config import ModelConfig
from model.denoising_unet import DenoisingUNet, is_new_layer, load_image_unet
from model.emotion_embedding import EmotionEmbedding, EmotionFeatures
from model.guidance import ConditionKeep, null_where_dropped
from model.reference_net import ReferenceNet

STAGES = ("stage1", "stage2", "a2m")


class SynchroRamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.data
        self.cfg = cfg
        self.reference_net = ReferenceNet(cfg)
        self.denoiser = DenoisingUNet(cfg)
        self.audio_projection = AudioProjection(d.wav2vec_layers, d.wav2vec_dim, cfg.audio_context_frames,
                                                cfg.audio_hidden, cfg.audio_tokens, cfg.cross_attention_dim)
        emotion_dim = (d.text_emotion_classes + d.text_emotion_dim + d.speech_emotion_classes
                       + d.speech_emotion_dim + d.va_values + d.va_dim)
        self.emotion_embedding = EmotionEmbedding(emotion_dim, cfg.emotion_hidden, cfg.emotion_tokens,
                                                  cfg.cross_attention_dim, d.va_window_frames, d.va_hop_frames)
        self.a2m = AudioToMotion(d.latent_channels, d.wav2vec_layers, d.wav2vec_dim, cfg.a2m_hidden,
                                 cfg.a2m_latent_channels, cfg.a2m_downsample, cfg.a2m_flow_layers)

    @classmethod
    def from_image_unet(cls, cfg: ModelConfig, folder: str) -> SynchroRamaModel:
        """Initialise ReferenceNet and denoiser from an SD-layout UNet in a local diffusers folder."""
        model = cls(cfg)
        state = load_image_unet(folder, cfg).state_dict()
        model.reference_net.unet.load_state_dict(state)
        model.denoiser.load_image_unet_weights(state)
        return model

    def trainable_parameters(self, stage: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters ``stage`` trains (and the only ones left with ``requires_grad``)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        frozen_tail = {f"reference_net.unet.{n}" for n in self.reference_net.unused_parameter_names()}

        def trains(name: str) -> bool:
            if stage == "a2m":
                return name.startswith("a2m.")
            if stage == "stage1":
                return (name.startswith("reference_net.") and name not in frozen_tail) or (
                    name.startswith("denoiser.") and not is_new_layer(name))
            return name.startswith(("audio_projection.", "emotion_embedding.")) or (
                name.startswith("denoiser.") and is_new_layer(name))

        return [(n, p) for n, p in self.named_parameters() if trains(n)]

    def set_stage(self, stage: str) -> list[nn.Parameter]:
        selected = {n for n, _ in self.trainable_parameters(stage)}
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in selected)
        return [p for n, p in self.named_parameters() if n in selected]

    def conditions(self, reference_latents: torch.Tensor, description: torch.Tensor,
                   audio_features: torch.Tensor | None, emotion: EmotionFeatures | None,
                   first_frame: torch.Tensor, keep: ConditionKeep) -> tuple[FrameConditions, torch.Tensor]:
        """Everything that does not depend on the noisy latents (computed once per clip at sampling).

        ``audio_features (B, M+T, L, D)``; returns the conditions (tokens ``(B, M+T, N, D)``) and the
        description tokens with dropped samples nulled."""
        description = null_where_dropped(description.to(reference_latents.dtype), keep.description)
        conditions = FrameConditions(reference_features=self.reference_net(reference_latents, description),
                                     reference_keep=keep.reference)
        if audio_features is not None:
            frames = audio_features.shape[1]
            conditions.audio_tokens = null_where_dropped(self.audio_projection(audio_features), keep.audio)
            if emotion is not None:
                tokens = self.emotion_embedding(emotion, first_frame, frames)
                conditions.emotion_tokens = null_where_dropped(tokens, keep.emotion)
        return conditions, description

    def forward(self, noisy_latents, timesteps, motion_latents, description, conditions) -> torch.Tensor:
        """Denoiser prediction for the clip frames, ``(B, T, 4, h, w)``."""
        return self.denoiser(noisy_latents, timesteps, motion_latents, description, conditions)
