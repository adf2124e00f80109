"""Randomly initialised stand-ins for the frozen pretrained parts (SD VAE, wav2vec2-base), sized for
``tiny_config()``, so tests and smoke runs need no downloads. Never used for the full model."""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import Wav2Vec2Config, Wav2Vec2Model

from model.config import ModelConfig


def tiny_vae(cfg: ModelConfig) -> AutoencoderKL:
    """Two-level VAE: ``image_size`` -> ``latent_size`` = image_size / 2, 4 latent channels."""
    assert cfg.data.image_size == 2 * cfg.data.latent_size
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=cfg.data.latent_channels,
                         norm_num_groups=8, layers_per_block=1).requires_grad_(False)


def tiny_audio_encoder(cfg: ModelConfig) -> Wav2Vec2Model:
    """wav2vec2 with ``wav2vec_layers - 1`` transformer layers of width ``wav2vec_dim`` (50 Hz output)."""
    d = cfg.data
    config = Wav2Vec2Config(hidden_size=d.wav2vec_dim, num_hidden_layers=d.wav2vec_layers - 1,
                            num_attention_heads=2, intermediate_size=2 * d.wav2vec_dim, conv_dim=(16,) * 7,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return Wav2Vec2Model(config).requires_grad_(False)


def tiny_image_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """An SD-layout image UNet with ``cfg.unet``, as a stand-in for a Stable Diffusion 1.5 checkpoint."""
    return UNet2DConditionModel(**cfg.unet)
