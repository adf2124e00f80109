"""VP-Flow is invertible and volume preserving; A2M produces motion latents of the right shape."""

import pytest
import torch

from model.a2m import AudioToMotion
from model.config import tiny_config
from model.vp_flow import VPFlow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_looking_flow(channels=4, layers=3):
    torch.manual_seed(0)
    flow = VPFlow(channels, hidden=8, cond_channels=5, layers=layers).double()
    with torch.no_grad():  # the shift nets start at zero (identity flow); make them non-trivial
        for coupling in flow.couplings:
            coupling.post.weight.normal_(0, 0.5)
            coupling.post.bias.normal_(0, 0.5)
    return flow


def test_vp_flow_round_trip():
    flow = _trained_looking_flow()
    z_q = torch.randn(2, 4, 3, 4, 4, dtype=torch.double)
    cond = torch.randn(2, 5, 3, 1, 1, dtype=torch.double)
    z_p, log_det = flow(z_q, cond)
    assert not torch.allclose(z_p, z_q.flip(1)) and not torch.allclose(z_p, z_q)
    assert torch.allclose(flow.inverse(z_p, cond), z_q, atol=1e-5)
    assert torch.allclose(flow(flow.inverse(z_q, cond), cond)[0], z_q, atol=1e-5)
    assert torch.equal(log_det, torch.zeros(2, dtype=torch.double))


def test_vp_flow_keeps_volume():
    flow = _trained_looking_flow()
    cond = torch.randn(1, 5, 1, 1, 1, dtype=torch.double)
    z = torch.randn(1, 4, 1, 2, 2, dtype=torch.double)
    jacobian = torch.autograd.functional.jacobian(lambda x: flow(x, cond)[0], z).reshape(z.numel(), z.numel())
    _sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert abs(float(log_abs_det)) < 1e-6


def test_a2m_samples_and_trains():
    cfg = tiny_config()
    d = cfg.data
    a2m = AudioToMotion(d.latent_channels, d.wav2vec_layers, d.wav2vec_dim, cfg.a2m_hidden,
                        cfg.a2m_latent_channels, cfg.a2m_downsample, cfg.a2m_flow_layers)
    reference = torch.randn(2, d.latent_channels, d.latent_size, d.latent_size)
    audio = torch.randn(2, cfg.motion_frames, d.wav2vec_layers, d.wav2vec_dim)
    motion = a2m.sample(reference, audio, generator=torch.Generator().manual_seed(0))
    assert motion.shape == (2, cfg.motion_frames, d.latent_channels, d.latent_size, d.latent_size)
    losses = a2m.loss(motion.detach(), reference, audio)
    assert torch.isfinite(losses["a2m"])
