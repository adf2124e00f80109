"""Audio, emotion and description cross-attention of each denoiser transformer block (sections 3.2, 3.4, 3.6).

The SD 1.5 cross-attention ``attn2`` keeps its pretrained weights and attends to the CLIP-text tokens of the
video description ``(B*F, 77, 768)``. Next to it, on the same normalised input ``x (B*F, H*W, C)``, two new
attentions of their own (the paper's "audio attention" and the emotion cross-attention) read

    audio tokens   (B*F, N_audio, D)    from ``model/audio_projection.py``
    emotion tokens (B*F, N_emotion, D)  from ``model/emotion_embedding.py``

and their outputs are added: ``attn2(x, text) + audio_attn(x, audio) + emotion_attn(x, emotion)``.
Deviation: the paper concatenates the emotion embedding into "a cross-attention layer"; keeping it a separate
attention with a zero-initialised output projection lets the network equal the image model at step 0 and lets
guidance drop emotion without changing the text attention's softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from model.conditions import FrameConditions, attend, multi_head_attention


class TokenCrossAttention(nn.Module):
    """Cross-attention from image tokens ``(N, L, hidden)`` to condition tokens ``(N, M, token_dim)``.

    The output projection starts at zero, so a new layer adds nothing until it is trained."""

    def __init__(self, hidden_size: int, token_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_k = nn.Linear(token_dim, hidden_size, bias=False)
        self.to_v = nn.Linear(token_dim, hidden_size, bias=False)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.to_q(hidden_states), self.to_k(tokens), self.to_v(tokens), self.heads)
        return self.to_out(out)


class AudioEmotionCrossAttnProcessor(nn.Module):
    """Processor for a denoiser ``attn2``: description cross-attention + audio attention + emotion attention.

    An ``nn.Module`` so that diffusers registers its weights under ``...attn2.processor.*`` (the same seam
    IP-Adapter uses); ``__call__`` is overridden because diffusers inspects its signature."""

    def __init__(self, hidden_size: int, token_dim: int, heads: int):
        super().__init__()
        self.audio_attention = TokenCrossAttention(hidden_size, token_dim, heads)
        self.emotion_attention = TokenCrossAttention(hidden_size, token_dim, heads)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 conditions: FrameConditions | None = None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attend(attn, hidden_states, context)
        if conditions is not None and conditions.audio_tokens is not None:
            out = out + self.audio_attention(hidden_states, conditions.audio_tokens)
        if conditions is not None and conditions.emotion_tokens is not None:
            out = out + self.emotion_attention(hidden_states, conditions.emotion_tokens)
        return out
