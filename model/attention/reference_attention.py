"""ReferenceNet-to-denoiser feature passing through spatial self-attention (paper section 3.3).

Each transformer block of the ReferenceNet records the normalised input of its spatial self-attention,
``(B, H*W, C)``, under the layer's name; the denoiser's spatial self-attention of the same name appends those
tokens to its keys and values, so every generated frame attends to itself and to the reference:

    out = Attention(q = x, k = v = [x ; ref])      x: (B*F, H*W, C), ref repeated over the F frames

Layers are paired by their module path (both UNets share the SD 1.5 layout), never by sorting widths, and the
features travel explicitly in ``FrameConditions.reference_features`` rather than through a patched
``forward``. Deviation: a sample whose reference is dropped (classifier-free guidance) masks the reference
tokens out of the softmax, so "no reference" is exactly the plain image self-attention.
"""

from __future__ import annotations

import torch

from model.conditions import FrameConditions, attend


class ReferenceWriteProcessor:
    """ReferenceNet side: plain self-attention that also stores its input under ``layer_name``."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 conditions: FrameConditions | None = None):
        if conditions is not None:
            conditions.reference_features[self.layer_name] = hidden_states
        return attend(attn, hidden_states, hidden_states)


class ReferenceReadProcessor:
    """Denoiser side: self-attention whose keys/values are the frame's tokens followed by the reference's."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 conditions: FrameConditions | None = None):
        reference = None if conditions is None else conditions.reference_features.get(self.layer_name)
        if reference is None:
            return attend(attn, hidden_states, hidden_states)
        frames = hidden_states.shape[0] // reference.shape[0]
        reference = reference.repeat_interleave(frames, dim=0)
        context = torch.cat([hidden_states, reference], dim=1)
        mask = None
        # None means every sample keeps its reference (decided on the host, model/guidance.py): no mask, no
        # device sync here, and the unmasked attention kernel
        if conditions.reference_keep is not None:
            keep = conditions.reference_keep.repeat_interleave(frames).to(hidden_states.device)
            mask = torch.ones(hidden_states.shape[0], 1, 1, context.shape[1], dtype=torch.bool,
                              device=hidden_states.device)
            mask[:, 0, 0, hidden_states.shape[1]:] = keep[:, None]
        return attend(attn, hidden_states, context, mask)


class ConditionsAwareProcessor:
    """Plain attention for layers that take no extra condition (ReferenceNet cross-attention), declared so
    that diffusers hands it ``conditions`` silently instead of warning on every call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 conditions: FrameConditions | None = None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return attend(attn, hidden_states, context)
