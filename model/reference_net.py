"""ReferenceNet (paper section 3.3): encodes the reference image latent and the description.

A ``UNet2DConditionModel`` with the SD 1.5 layout and weights, run once per clip at timestep 0 on the
reference latent ``(B, 4, h, w)`` with the description tokens ``(B, 77, 768)`` in its cross-attention. Its
spatial self-attention processors record their inputs, and ``forward`` returns them: a dict from layer path
(e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``) to ``(B, h_l*w_l, C_l)``, which the
denoiser's layer of the same path reads (``model/attention/reference_attention.py``).

Deviation: the layers after the last recorded feature (the rest of the last transformer block, its output
projection and ``conv_norm_out``/``conv_out``) can never influence the denoiser, so they are frozen
(``unused_parameter_names``) instead of receiving no gradient silently; they are kept so that SD checkpoints
load with no missing keys.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from model.attention.reference_attention import ConditionsAwareProcessor, ReferenceWriteProcessor
from model.conditions import FrameConditions
from model.config import ModelConfig


class ReferenceNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.unet = UNet2DConditionModel(**cfg.unet)
        processors = {
            name: ReferenceWriteProcessor(name.removesuffix(".processor")) if name.endswith("attn1.processor")
            else ConditionsAwareProcessor()
            for name in self.unet.attn_processors
        }
        self.unet.set_attn_processor(processors)
        unused = set(self.unused_parameter_names())
        for name, parameter in self.unet.named_parameters():
            if name in unused:
                parameter.requires_grad_(False)

    def unused_parameter_names(self) -> list[str]:
        """Parameters downstream of the last recorded feature (see module docstring)."""
        last_block = len(self.unet.up_blocks) - 1
        last_attention = len(self.unet.up_blocks[-1].attentions) - 1
        transformer = self.unet.up_blocks[-1].attentions[-1]
        last_layer = len(transformer.transformer_blocks) - 1
        prefix = f"up_blocks.{last_block}.attentions.{last_attention}"
        tail_prefixes = [f"{prefix}.transformer_blocks.{last_layer}.{part}"
                         for part in ("attn1", "norm2", "attn2", "norm3", "ff")]
        tail_prefixes += [f"{prefix}.proj_out", "conv_norm_out", "conv_out"]
        return [name for name, _ in self.unet.named_parameters()
                if any(name.startswith(p + ".") for p in tail_prefixes)]

    def forward(self, reference_latents: torch.Tensor, description: torch.Tensor) -> dict[str, torch.Tensor]:
        conditions = FrameConditions()
        timesteps = torch.zeros(reference_latents.shape[0], device=reference_latents.device)
        self.unet(reference_latents, timesteps, encoder_hidden_states=description,
                  cross_attention_kwargs={"conditions": conditions})
        return conditions.reference_features
