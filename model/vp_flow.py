"""Volume-preserving normalising flow, VP-Flow (paper section 3.5, Figure 2(c)).

A stack of ``[residual affine coupling, channel flip]`` pairs acting on ``z (B, C, F, h, w)`` (C even),
conditioned on ``cond (B, C_cond, F, 1, 1)``. A coupling splits channels into halves ``(z_a, z_b)`` and
shifts ``z_b <- z_b + m(z_a, cond)``: mean-only (no scale), so the Jacobian is unit-triangular and
``log|det J| = 0`` exactly, as in VITS's flows. The flip reverses the channel order so every channel is
shifted in turn. ``forward`` maps the simple latent ``z_q`` to the expressive ``z_p``; ``inverse`` undoes it.
Each coupling's last convolution starts at zero, so the untrained flow is the identity (up to flips).
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, cond_channels: int):
        super().__init__()
        half = channels // 2
        self.pre = nn.Conv3d(half, hidden, 1)
        self.cond = nn.Conv3d(cond_channels, hidden, 1)
        self.net = nn.Sequential(nn.SiLU(), nn.Conv3d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.post = nn.Conv3d(hidden, channels - half, 1)
        nn.init.zeros_(self.post.weight)
        nn.init.zeros_(self.post.bias)

    def shift(self, z_a: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.post(self.net(self.pre(z_a) + self.cond(cond)))

    def forward(self, z: torch.Tensor, cond: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        z_a, z_b = z.split([z.shape[1] // 2, z.shape[1] - z.shape[1] // 2], dim=1)
        shift = self.shift(z_a, cond)
        return torch.cat([z_a, z_b - shift if reverse else z_b + shift], dim=1)


class VPFlow(nn.Module):
    def __init__(self, channels: int, hidden: int, cond_channels: int, layers: int):
        super().__init__()
        if channels % 2:
            raise ValueError("VP-Flow needs an even number of latent channels")
        self.couplings = nn.ModuleList(ResidualCoupling(channels, hidden, cond_channels) for _ in range(layers))

    def forward(self, z_q: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_q -> (z_p, log_det)``; ``log_det (B,)`` is identically 0 (volume preserving)."""
        z = z_q
        for coupling in self.couplings:
            z = coupling(z, cond).flip(1)
        return z, z.new_zeros(z.shape[0])

    def inverse(self, z_p: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        z = z_p
        for coupling in reversed(self.couplings):
            z = coupling(z.flip(1), cond, reverse=True)
        return z
