"""Device placement at the full (SD 1.5-size) config, without a GPU: the model lives on the ``meta`` device
(shapes only, no memory, no arithmetic), where mixing a CPU tensor into a meta computation raises exactly as
mixing CPU and CUDA does. A training step (stage 1, stage 2 with every pixel loss and A2M motion frames, A2M)
and a 2-step generation run end to end here, so whatever they create internally (noise, timesteps, guidance
flags, masks, generators) must be created on, or moved to, the model's device.

Two rules the meta device cannot see by itself are checked by ``DeviceAudit``, a dispatch mode that looks at
every op as it runs: a random op given a ``torch.Generator`` must produce its tensor on the generator's device
(CUDA refuses a CPU generator for a CUDA ``randn``; meta silently accepts it), and random tensors bigger than a
few per-sample decisions (noise) must be drawn on the model's device, not on the host and copied.
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Wav2Vec2Config, Wav2Vec2Model

from model.config import full_config
from model.emotion_embedding import EmotionFeatures
from model.experts import LossExperts
from model.pipeline import TalkingFacePipeline
from model.schedule import train_scheduler
from model.synchrorama import SynchroRamaModel
from model.training.batch import TrainingBatch, fake_batch
from model.training.training_step import StepOptions, training_losses

META = torch.device("meta")
RANDOM_OPS = ("rand", "randn", "randint", "randperm", "normal", "uniform", "bernoulli", "multinomial",
              "exponential", "random_")
HOST_DRAW_LIMIT = 64  # per-sample decisions (flags, timesteps, a slice start) may be drawn on the host


class DeviceAudit(TorchDispatchMode):
    """Records random draws that would fail or be wasteful on an accelerator (see the module docstring)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.problems = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0].lstrip("_")
        if name.startswith(RANDOM_OPS) and isinstance(out, torch.Tensor):
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != out.device.type:
                self.problems.append(f"{func}: generator on {generator.device}, tensor on {out.device}")
            if out.device != self.device and out.numel() > HOST_DRAW_LIMIT:
                self.problems.append(f"{func}: {tuple(out.shape)} drawn on {out.device}, model on {self.device}")
        return out


def sd_vae() -> AutoencoderKL:
    """Stable Diffusion's VAE architecture (512 px <-> 4 x 64 x 64), as ``AutoencoderKL.from_pretrained`` of
    SD 1.5's ``vae`` folder builds it."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=512).requires_grad_(False)


@pytest.fixture(scope="module")
def full():
    cfg = full_config()
    with META:
        parts = (SynchroRamaModel(cfg), sd_vae(), Wav2Vec2Model(Wav2Vec2Config()).requires_grad_(False),
                 LossExperts(cfg).requires_grad_(False))
    return cfg, *parts


def meta_batch(cfg, batch_size: int) -> TrainingBatch:
    """The paper's batch (4 samples of 2 motion + 14 clip frames at 64x64 latents) on the meta device."""
    batch = fake_batch(cfg, batch_size)
    moved = {k: v.to(META) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    return TrainingBatch(**moved, emotion=EmotionFeatures(*(v.to(META) for v in vars(batch.emotion).values())))


@pytest.mark.parametrize("stage", ["stage1", "stage2", "a2m"])
def test_a_full_size_training_step_runs_on_the_models_device(full, stage):
    cfg, model, vae, _, experts = full
    assert cfg.data.image_size == 512 and cfg.clip_frames == 14 and cfg.motion_frames == 2
    assert next(model.parameters()).device == META
    model.set_stage(stage)
    model.zero_grad(set_to_none=True)
    options = StepOptions(motion_from_a2m=0.5, motion_from_reference=0.1, unconditional=0.1)
    batch = meta_batch(cfg, 4)
    started = time.perf_counter()
    with DeviceAudit(META) as audit:
        # the training step's generator, as model/training/train.py makes it: on the model's device (None on meta)
        losses = training_losses(model, batch, train_scheduler(cfg.recipe), stage, vae, experts,
                                 generator=None, options=options)
        losses["total"].backward()
    assert audit.problems == []
    if stage == "stage2":  # the full recipe's pixel losses ran too
        assert {"diffusion", "sync", "emo", "au", "attr_action"} <= set(losses)
    assert all(v.device == META for v in losses.values())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device == META for p in trained)
    assert time.perf_counter() - started < 60


def test_a_two_step_full_size_generation_runs_on_the_models_device(full):
    cfg, model, vae, audio_encoder, _ = full
    pipeline = TalkingFacePipeline(model, vae, audio_encoder)
    image = torch.zeros(512, 512, 3, dtype=torch.uint8).numpy()
    audio = torch.zeros(20 * cfg.data.samples_per_frame).numpy()  # 20 frames: two clips of 14
    started = time.perf_counter()
    with DeviceAudit(META) as audit:
        frames = pipeline.frames(image, audio, num_inference_steps=2, seed=3)
    assert audit.problems == []
    assert frames.device == META and frames.shape == (20, 512, 512, 3) and frames.dtype == torch.uint8
    assert time.perf_counter() - started < 60


def test_the_audit_catches_a_host_generator_and_host_noise():
    # the two mistakes this file guards against, made on purpose: the audit is what would fail the tests above
    with DeviceAudit(META) as audit:
        torch.randn(4, 8, 8, generator=torch.Generator(), device=META)  # CUDA would raise here; meta does not
        torch.randn(4, 8, 8).to(META)  # noise drawn on the host and copied
        torch.rand(4)  # a per-sample host decision: allowed
    assert len(audit.problems) == 2, audit.problems


def test_a2m_refuses_a_generator_on_another_device(full):
    cfg, model, *_ = full
    batch = meta_batch(cfg, 1)
    with pytest.raises(ValueError, match="device_generator"):
        model.a2m.sample(batch.reference_latents, batch.audio_features[:, :2], generator=torch.Generator())
