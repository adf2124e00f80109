"""Temporal attention over frames (paper section 3.2), with the motion frames prepended.

After every spatial resnet/transformer pair the denoiser runs a diffusers AnimateDiff motion module
(``AnimateDiffTransformer3D``): the features ``(B*F, C, H, W)`` are regrouped to ``(B*H*W, F, C)`` and each
pixel attends over the ``F = motion_frames + clip_frames`` frames, with sinusoidal frame positions. The
motion frames (the last frames of the previous clip, or A2M's output for the first clip) are clean latents
placed before the noisy frames, so temporal attention carries their motion forward; their outputs are
discarded. This layout is built by ``diffusers.UNetMotionModel`` itself, configured, not forked.

Deviation: diffusers initialises the motion module's output projection randomly (it expects AnimateDiff
weights); here it starts at zero so that the inflated UNet equals the image UNet frame by frame at step 0.
"""

from __future__ import annotations

from torch import nn


def zero_init_temporal_outputs(unet: nn.Module) -> int:
    """Zero the output projection of every motion module in ``unet``; returns how many were zeroed."""
    zeroed = 0
    for name, module in unet.named_modules():
        if name.endswith("proj_out") and ".motion_modules." in f".{name}":
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
            zeroed += 1
    return zeroed
