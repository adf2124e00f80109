"""Denoising UNet: SD 1.5 inflated to video, four attentions per transformer block (paper section 3.2).

``diffusers.UNetMotionModel`` built from the SD 1.5 config holds the image layers under exactly the same
state-dict names as ``UNet2DConditionModel`` plus motion modules. Each spatial transformer block then has

1. spatial self-attention that also sees the ReferenceNet features (``model/attention/reference_attention.py``),
2. cross-attention to the CLIP-text description tokens (pretrained SD weights),
3. audio attention and emotion attention (``model/attention/condition_attention.py``), installed as the ``attn2``
   processor, and
4. temporal attention over frames (``model/attention/temporal_attention.py``).

New layers (motion modules, audio and emotion attention) start with zero output projections, so at step 0
the model equals the image UNet applied frame by frame. SD weights load by state-dict name
(``load_image_unet_weights``); every missing key must belong to a new layer and nothing may be unexpected.

Memory: ``unet.enable_gradient_checkpointing()`` in diffusers 0.42 checkpoints the resnets and spatial
transformers (and the mid block's motion module) but not the down and up blocks' motion modules, whose
activations over ``(B*H*W, F, C)`` tokens dominate stage 2 (about 55 GiB at 4 x (2+14) frames, 512x512; see
docs/model.md, "Memory"). ``checkpoint_motion_modules`` makes those modules honour the same switch.

Shapes: noisy ``(B, T, 4, h, w)``, motion ``(B, M, 4, h, w)``, description ``(B, 77, 768)``, audio and emotion
tokens ``(B, M+T, N, 768)``; the prediction is ``(B, T, 4, h, w)`` (the motion frames' outputs are dropped).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel, UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from einops import rearrange
from torch import nn

from model.attention.condition_attention import AudioEmotionCrossAttnProcessor
from model.attention.reference_attention import ReferenceReadProcessor
from model.attention.temporal_attention import zero_init_temporal_outputs
from model.conditions import FrameConditions
from model.config import ModelConfig

NEW_LAYER_MARKERS = (".motion_modules.", ".processor.")


def is_new_layer(name: str) -> bool:
    """True for parameters the image model does not have: temporal, audio and emotion attention."""
    return any(marker in f".{name}" for marker in NEW_LAYER_MARKERS)


def motion_unet_config(cfg: ModelConfig) -> dict:
    """Translate the SD UNet2DConditionModel config into UNetMotionModel arguments."""
    sd = cfg.unet
    return {
        "sample_size": sd["sample_size"],
        "in_channels": sd["in_channels"],
        "out_channels": sd["out_channels"],
        "down_block_types": tuple("CrossAttnDownBlockMotion" if "CrossAttn" in b else "DownBlockMotion"
                               for b in sd["down_block_types"]),
        "up_block_types": tuple("CrossAttnUpBlockMotion" if "CrossAttn" in b else "UpBlockMotion"
                             for b in sd["up_block_types"]),
        "block_out_channels": sd["block_out_channels"],
        "layers_per_block": sd["layers_per_block"],
        "norm_num_groups": sd["norm_num_groups"],
        "cross_attention_dim": sd["cross_attention_dim"],
        # SD 1.x stores its head count under the misnamed "attention_head_dim".
        "num_attention_heads": sd["attention_head_dim"],
        "motion_num_attention_heads": cfg.motion_attention_heads,
        "motion_max_seq_length": cfg.motion_max_frames,
        "use_motion_mid_block": True,
    }


def attention_path(processor_name: str) -> str:
    return processor_name.removesuffix(".processor")


class CheckpointedMotionModule(AnimateDiffTransformer3D):
    """diffusers' motion module that recomputes its activations in backward when ``gradient_checkpointing``
    is set, which ``UNetMotionModel.enable_gradient_checkpointing()`` does for every module with that
    attribute. Same parameters and state-dict names as ``AnimateDiffTransformer3D``.

    Always non-reentrant (``use_reentrant=False``), the mode diffusers' own regions use by default: reentrant
    checkpointing passes gradients only through tensor arguments that require grad, and in this UNet the
    ReferenceNet features, audio and emotion tokens reach the layers through ``cross_attention_kwargs`` (a
    side channel, not arguments), so a reentrant region would silently drop their gradients.
    """

    gradient_checkpointing = False

    def forward(self, hidden_states, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, hidden_states, *args, use_reentrant=False,
                                                     **kwargs)
        return super().forward(hidden_states, *args, **kwargs)


def checkpoint_motion_modules(unet: UNetMotionModel) -> int:
    """Turn the down and up blocks' motion modules into ``CheckpointedMotionModule``; returns how many.

    The class is swapped in place (``__class__``), not wrapped, so parameter names, state dicts and
    ``isinstance(m, AnimateDiffTransformer3D)`` stay exactly diffusers'. The mid block's motion modules are
    left alone: its own ``gradient_checkpointing`` branch already checkpoints them, and a second, nested
    region would recompute them twice in backward.
    """
    swapped = 0
    for block in [*unet.down_blocks, *unet.up_blocks]:
        for module in block.motion_modules:
            if type(module) is not AnimateDiffTransformer3D:
                raise TypeError(f"{type(module).__name__} in {type(block).__name__}.motion_modules: expected "
                                f"diffusers' AnimateDiffTransformer3D; update checkpoint_motion_modules for this "
                                f"diffusers version")
            module.__class__ = CheckpointedMotionModule
            swapped += 1
    return swapped


class DenoisingUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetMotionModel(**motion_unet_config(cfg))
        zero_init_temporal_outputs(self.unet)
        checkpoint_motion_modules(self.unet)  # inert until unet.enable_gradient_checkpointing()
        processors = dict(self.unet.attn_processors)  # temporal attention keeps diffusers' processor
        for name in processors:
            if ".motion_modules." in f".{name}":
                continue
            if name.endswith("attn1.processor"):
                processors[name] = ReferenceReadProcessor(attention_path(name))
            else:
                attn = self.unet.get_submodule(attention_path(name))
                processors[name] = AudioEmotionCrossAttnProcessor(
                    attn.to_q.in_features, cfg.cross_attention_dim, attn.heads)
        self.unet.set_attn_processor(processors)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, motion_latents: torch.Tensor | None,
                description: torch.Tensor, conditions: FrameConditions) -> torch.Tensor:
        """``conditions.audio_tokens``/``emotion_tokens`` are ``(B, M+T, N, D)`` here; flattened per frame."""
        clip_frames = noisy_latents.shape[1]
        frames = noisy_latents if motion_latents is None else torch.cat([motion_latents, noisy_latents], 1)
        total = frames.shape[1]
        flat = FrameConditions(
            reference_features=conditions.reference_features,
            reference_keep=conditions.reference_keep,
            audio_tokens=_per_frame(conditions.audio_tokens),
            emotion_tokens=_per_frame(conditions.emotion_tokens),
        )
        out = self.unet(
            rearrange(frames, "b f c h w -> b c f h w"),
            timesteps,
            encoder_hidden_states=description.repeat_interleave(total, dim=0),
            cross_attention_kwargs={"conditions": flat},
        ).sample
        return rearrange(out, "b c f h w -> b f c h w")[:, total - clip_frames:]

    def load_image_unet_weights(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load an SD-layout UNet2DConditionModel state dict; returns the (new-layer) keys left missing."""
        result = self.unet.load_state_dict(state_dict, strict=False)
        unexpected = list(result.unexpected_keys)
        missing_old = [k for k in result.missing_keys if not is_new_layer(k)]
        if unexpected or missing_old:
            raise ValueError(f"not an SD-layout UNet: unexpected {unexpected[:5]}, missing {missing_old[:5]}")
        return list(result.missing_keys)

    def load_motion_adapter(self, folder: str) -> None:
        """Initialise the temporal layers from an AnimateDiff ``MotionAdapter`` saved in a local diffusers folder
        (e.g. ``guoyww/animatediff-motion-adapter-v1-5-2``, made for SD 1.5: the same shapes as the full model).

        Deviation: the paper does not say how its temporal layers start; Hallo starts them from AnimateDiff's
        SD 1.5 motion module. With the adapter loaded the output projections are no longer zero, so step-0
        equality with the image UNet no longer holds. Loaded with diffusers' own ``MotionAdapter.from_pretrained``
        and ``UNetMotionModel.load_motion_modules`` (strict per block); the settings that do not show in tensor
        shapes (attention heads, norm groups) are compared first, since a mismatch there would load silently."""
        from diffusers import MotionAdapter

        adapter = MotionAdapter.from_pretrained(folder)

        def as_tuple(value, n):
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

        ours, theirs = self.unet.config, adapter.config
        n = len(ours.block_out_channels)
        checks = {
            "block_out_channels": (tuple(ours.block_out_channels), tuple(theirs.block_out_channels)),
            "layers per block": (as_tuple(ours.layers_per_block, n), as_tuple(theirs.motion_layers_per_block, n)),
            "attention heads": (as_tuple(ours.motion_num_attention_heads, n),
                                as_tuple(theirs.motion_num_attention_heads, n)),
            "norm groups": (ours.norm_num_groups, theirs.motion_norm_num_groups),
            "max frames": (ours.motion_max_seq_length, theirs.motion_max_seq_length),
            "motion mid block": (ours.use_motion_mid_block, theirs.use_motion_mid_block),
        }
        wrong = {name: pair for name, pair in checks.items() if pair[0] != pair[1]}
        if wrong:
            raise ValueError(f"motion_adapter={folder} does not fit this denoiser (ours, the adapter's): {wrong}; "
                             "use an adapter made for this UNet (AnimateDiff's SD 1.5 adapters for the full model)")
        self.unet.load_motion_modules(adapter)


def _per_frame(tokens: torch.Tensor | None) -> torch.Tensor | None:
    return None if tokens is None else rearrange(tokens, "b f n d -> (b f) n d")


def load_image_unet(folder: str, cfg: ModelConfig) -> UNet2DConditionModel:
    """Read an SD-layout UNet from a local diffusers folder (``<model>/unet`` or the unet folder itself) and
    check that its config matches ``cfg.unet``."""
    import os

    sub = "unet" if os.path.isdir(os.path.join(folder, "unet")) else None
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False)
    for key, value in cfg.unet.items():
        have = unet.config[key]
        if (tuple(have) if isinstance(have, list) else have) != value:
            raise ValueError(f"UNet config mismatch for {key}: folder has {have}, model expects {value}")
    return unet
