"""What one UNet call is conditioned on, handed to the attention processors through ``cross_attention_kwargs``.

diffusers passes ``cross_attention_kwargs`` unchanged to every spatial attention layer, so one object under
the key ``"conditions"`` carries the reference features, audio tokens and emotion tokens to the processors of
``model/attention/reference_attention.py`` and ``model/attention/condition_attention.py`` without touching any ``forward``.
Batch layout inside the UNet is ``(batch * frames)``, frame-major within each sample, as in
``diffusers.UNetMotionModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FrameConditions:
    """Conditioning for one UNet call.

    reference_features: layer name -> ``(B, H*W, C)`` spatial features of the reference image, filled by the
        ReferenceNet (section 3.3) and read by the denoiser's spatial self-attention of the same name.
    reference_keep: ``(B,)`` bool; ``False`` hides the reference from that sample (guidance dropout).
    audio_tokens: ``(B * F, N_audio, D)`` audio tokens per frame (section 3.2), or ``None``.
    emotion_tokens: ``(B * F, N_emotion, D)`` emotion tokens per frame (section 3.6), or ``None``.
    """

    reference_features: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_keep: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None
    emotion_tokens: torch.Tensor | None = None


def attend(attn, query_input: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
    """Multi-head attention with the projections of a diffusers ``Attention`` (SD 1.5 layout: no group or
    spatial norm, no residual inside). ``query_input (N, Lq, C)``, ``context (N, Lk, Ck)``, ``mask`` boolean,
    broadcastable to ``(N, heads, Lq, Lk)``, True = may attend. Returns ``(N, Lq, C)``."""
    query = attn.to_q(query_input)
    key = attn.to_k(context)
    value = attn.to_v(context)
    out = multi_head_attention(query, key, value, attn.heads, mask)
    return attn.to_out[1](attn.to_out[0](out))


def multi_head_attention(query, key, value, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads; ``(N, L, heads * d)`` in and out."""
    n, lq, inner = query.shape
    head_dim = inner // heads
    q, k, v = (t.view(n, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(n, lq, inner).to(query.dtype)
