"""The tiny model trains: forward and backward on a data-shaped fake batch reach every trainable parameter."""

import pytest
import torch

from model.config import tiny_config
from model.experts import LossExperts
from model.schedule import train_scheduler
from model.synchrorama import STAGES, SynchroRamaModel
from model.training.batch import fake_batch
from model.training.tiny_components import tiny_vae
from model.training.training_step import training_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    torch.manual_seed(0)
    return cfg, SynchroRamaModel(cfg), tiny_vae(cfg), LossExperts(cfg), fake_batch(cfg)


@pytest.mark.parametrize("stage", STAGES)
def test_every_trainable_parameter_gets_a_gradient(parts, stage):
    cfg, model, vae, experts, batch = parts
    trainable = model.set_stage(stage)
    assert trainable
    with torch.no_grad():  # zero-initialised outputs block gradients at step 0; look like a trained model
        for parameter in trainable:
            if not parameter.any():
                parameter.normal_(0, 0.02)
    model.zero_grad(set_to_none=True)
    losses = training_losses(model, batch, train_scheduler(cfg.recipe), stage, vae, experts,
                             torch.Generator().manual_seed(1))
    if stage == "stage2":
        assert {"diffusion", "sync", "emo", "au", "attr_action"} <= set(losses)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.any() or not p.grad.isfinite().all())]
    assert missing == []
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []
    assert not any(p.requires_grad for p in list(vae.parameters()) + list(experts.parameters()))


def test_prediction_has_the_clip_shape(parts):
    cfg, model, _, _, batch = parts
    from model.guidance import ConditionKeep

    with torch.no_grad():
        conditions, description = model.conditions(batch.reference_latents, batch.description,
                                                   batch.audio_features, batch.emotion, batch.first_frame,
                                                   ConditionKeep.all(2))
        prediction = model(batch.latents, torch.tensor([3, 700]), batch.motion_latents, description, conditions)
    assert prediction.shape == batch.latents.shape
    assert conditions.audio_tokens.shape == (2, cfg.motion_frames + cfg.clip_frames, cfg.audio_tokens,
                                             cfg.cross_attention_dim)
