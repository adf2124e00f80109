"""Unit tests of the section 3.7 losses, guidance dropout, schedules and emotion alignment."""

import pytest
import torch

from model.config import GuidanceDropout, TrainRecipe, tiny_config
from model.emotion_embedding import align_windows_to_frames
from model.experts import SyncNetExpert
from model.guidance import null_where_dropped, sample_keep
from model.losses import (
    SyncEstimate,
    attr_action_loss,
    au_loss,
    diffusion_loss,
    emo_loss,
    sync_loss,
    window_means,
)
from model.schedule import predicted_clean_latents, sample_scheduler, train_scheduler, training_target


def test_min_snr_weight_is_applied_per_sample_before_the_mean():
    prediction = torch.zeros(2, 3, 4)
    target = torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])  # per-sample MSE 1 and 4
    snr = torch.tensor([1.0, 10.0])
    # epsilon: weights min(snr, 5)/snr = 1, 0.5 -> (1*1 + 0.5*4) / 2
    assert diffusion_loss(prediction, target, snr, "epsilon", 5.0) == pytest.approx(1.5)
    # v: weights min(snr, 5)/(snr+1) = 0.5, 5/11
    assert diffusion_loss(prediction, target, snr, "v_prediction", 5.0) == pytest.approx((0.5 + 4 * 5 / 11) / 2)
    assert diffusion_loss(prediction, target, snr, "epsilon", None) == pytest.approx(2.5)


def test_train_and_sample_schedules_are_identical():
    recipe = TrainRecipe()
    train, sample = train_scheduler(recipe), sample_scheduler(recipe)
    assert torch.equal(train.alphas_cumprod, sample.alphas_cumprod)
    for key in ("prediction_type", "timestep_spacing", "rescale_betas_zero_snr", "beta_schedule"):
        assert train.config[key] == sample.config[key]
    sample.set_timesteps(recipe.sample_steps)
    assert len(sample.timesteps) == 40 and int(sample.timesteps[0]) == 999


def test_clean_latents_recovered_from_exact_targets():
    scheduler = train_scheduler(TrainRecipe())
    latents, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    timesteps = torch.tensor([10, 500, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    assert torch.allclose(predicted_clean_latents(scheduler, noisy, target, timesteps), latents, atol=1e-4)


def test_sync_loss_is_eq2():
    predicted = SyncEstimate(torch.tensor([0.2, 0.0]), torch.tensor([1.0, 0.5]))
    truth = SyncEstimate(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert sync_loss(predicted, truth) == pytest.approx((0.04 + 0.25) / 2)


def test_syncnet_expert_is_differentiable():
    cfg = tiny_config()
    expert = SyncNetExpert(cfg)
    frames = torch.randn(2, 5, 3, 32, 32, requires_grad=True)
    audio = torch.randn(2, 5, cfg.data.wav2vec_layers, cfg.data.wav2vec_dim)
    estimate = expert.estimate(frames, audio)
    assert estimate.offset_s.shape == (2,) and estimate.offset_s.abs().max() <= cfg.sync_max_shift / cfg.data.fps
    estimate.offset_s.sum().backward()
    assert frames.grad is not None


def test_emo_loss_uses_half_overlapping_windows():
    values = torch.arange(8.0)[None, :, None]  # (1, 8, 1)
    assert window_means(values, 4, 2)[0, :, 0].tolist() == [1.5, 3.5, 5.5]
    predicted = torch.zeros(1, 8, 2)
    target = torch.ones(1, 8, 2)
    assert emo_loss(predicted, target, 4, 2) == pytest.approx(2.0)  # (1 + 1) per window, mean over K
    assert window_means(values, 50, 25).shape == (1, 1, 1)  # clip shorter than a window: one window


def test_au_and_attr_action_losses():
    assert au_loss(torch.zeros(2, 3, 12), torch.full((2, 3, 12), 0.5)) == pytest.approx(0.25)
    e = torch.randn(4, 16)
    assert attr_action_loss(e, e) == pytest.approx(0.0, abs=1e-6)
    assert attr_action_loss(e, -e) == pytest.approx(2.0, abs=1e-6)


def test_va_windows_align_to_frames():
    windows = torch.tensor([[[0.0], [1.0], [2.0]]])  # windows of 50 frames every 25
    per_frame = align_windows_to_frames(windows, torch.tensor([0]), 100, 50, 25)
    assert per_frame.shape == (1, 100, 1)
    assert per_frame[0, 0, 0] == 0.0 and per_frame[0, 49, 0] == pytest.approx(1.0, abs=0.05)
    assert per_frame[0, 99, 0] == 2.0  # past the last window: nearest window
    assert torch.all(per_frame[0, 1:, 0] >= per_frame[0, :-1, 0])


def test_guidance_dropout_rates_and_null():
    keep = sample_keep(10_000, GuidanceDropout(reference=0.0, audio=0.5, emotion=1.0, description=0.1),
                       torch.Generator().manual_seed(0))
    assert keep.reference is None and not keep.emotion.any()  # None: every sample keeps its reference
    assert 0.45 < keep.audio.float().mean() < 0.55 and 0.87 < keep.description.float().mean() < 0.93
    tokens = torch.ones(3, 2, 4)
    nulled = null_where_dropped(tokens, torch.tensor([True, False, True]))
    assert nulled[1].abs().sum() == 0 and nulled[0].sum() == 8
