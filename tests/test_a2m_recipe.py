"""The A2M module reaches the model the user gets (issue 11, items 4 and 5).

* an untrained A2M returns the reference (zero output layer);
* the three-run recipe (a2m, stage 1, stage 2 through ``model.training.train.main`` with the tiny config) ends in one
  checkpoint whose A2M is, bit for bit, what the a2m run trained;
* stage 2 replaces the true motion frames with A2M samples or the reference at the configured rates, and drops
  audio, emotion and description together (the sampler's unconditional branch) at its own rate;
* stage 1's reference is never the target frame; the temporal layers load from an AnimateDiff MotionAdapter.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_loader import write_training_shards

from model.a2m import AudioToMotion, is_untrained
from model.config import tiny_config
from model.denoising_unet import DenoisingUNet
from model.guidance import ConditionKeep
from model.synchrorama import SynchroRamaModel
from model.training.batch import fake_batch
from model.training.train import main
from model.training.training_step import (
    A2M_MOTION,
    REFERENCE_MOTION,
    TRUE_MOTION,
    StepOptions,
    drop_all_but_reference,
    training_motion_frames,
)
from shards.reader import ClipDecodeError
from shards.training_loader import TrainingWindows, WindowSpec, _reference_index

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train_tiny.toml")
NO_PIXEL_LOSSES = ["loss_sync=0", "loss_emo=0", "loss_au=0", "loss_attr_action=0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_a2m(cfg):
    d = cfg.data
    return AudioToMotion(d.latent_channels, d.wav2vec_layers, d.wav2vec_dim, cfg.a2m_hidden,
                         cfg.a2m_latent_channels, cfg.a2m_downsample, cfg.a2m_flow_layers)


def _as_if_trained(a2m):
    with torch.no_grad():
        a2m.decoder_out.weight.normal_(0, 0.05)
    return a2m


def test_an_untrained_a2m_returns_the_reference_and_still_learns():
    cfg = tiny_config()
    batch = fake_batch(cfg, batch_size=3)
    a2m = _tiny_a2m(cfg)
    assert is_untrained(a2m)
    sampled = a2m.sample(batch.reference_latents, batch.audio_features[:, :cfg.motion_frames],
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, batch.reference_latents[:, None].expand_as(sampled))
    a2m.loss(batch.motion_latents, batch.reference_latents, batch.audio_features[:, :cfg.motion_frames])["a2m"].backward()
    assert a2m.decoder_out.weight.grad.abs().sum() > 0  # the zero layer gets a gradient: training moves it
    assert not is_untrained(_as_if_trained(a2m))


@pytest.mark.parametrize(("from_a2m", "from_reference"), [(0.3, 0.2), (0.0, 0.5), (1.0, 0.0)])
def test_motion_frames_are_replaced_at_the_configured_rates(from_a2m, from_reference):
    cfg = tiny_config()
    model = SynchroRamaModel(cfg)
    _as_if_trained(model.a2m)  # so that A2M samples, the reference and the true frames all differ
    batch = fake_batch(cfg, batch_size=2000, seed=3)
    options = StepOptions(motion_from_a2m=from_a2m, motion_from_reference=from_reference)
    motion, source = training_motion_frames(model, batch, options, torch.Generator().manual_seed(7))

    n = len(source)
    for kind, rate in ((A2M_MOTION, from_a2m), (REFERENCE_MOTION, from_reference),
                       (TRUE_MOTION, 1 - from_a2m - from_reference)):
        tolerance = 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-9  # 4 binomial standard deviations
        assert abs(float((source == kind).float().mean()) - rate) <= tolerance, (kind, rate)
    # each sample holds exactly what its source says: the A2M sample drawn from the same seeded stream, the
    # reference repeated, or the untouched true frames
    generator = torch.Generator().manual_seed(7)
    torch.rand(n, generator=generator)
    expected_a2m = model.a2m.sample(batch.reference_latents, batch.audio_features[:, :cfg.motion_frames],
                                    generator=generator) if from_a2m else None
    for kind, expected in ((A2M_MOTION, expected_a2m), (TRUE_MOTION, batch.motion_latents),
                           (REFERENCE_MOTION, batch.reference_latents[:, None].expand_as(motion))):
        rows = source == kind
        if rows.any():
            assert torch.equal(motion[rows], expected[rows]), kind
    if from_a2m:  # and A2M's frames are neither the true frames nor the reference
        rows = source == A2M_MOTION
        assert (motion[rows] != batch.motion_latents[rows]).flatten(1).any(1).all()
        assert not torch.equal(motion[rows], batch.reference_latents[rows][:, None].expand_as(motion[rows]))


def test_off_by_default_the_step_draws_nothing_extra():
    cfg = tiny_config()
    batch = fake_batch(cfg)
    motion, source = training_motion_frames(SynchroRamaModel(cfg), batch, StepOptions(), torch.Generator())
    assert motion is batch.motion_latents and not source.any()
    keep = ConditionKeep.all(4)
    assert drop_all_but_reference(keep, 0.0)[0] is keep
    with pytest.raises(ValueError, match="at most 1"):
        StepOptions(motion_from_a2m=0.7, motion_from_reference=0.4)


def test_the_joint_drop_is_the_samplers_unconditional_branch():
    n, p = 4000, 0.2
    kept, joint = drop_all_but_reference(ConditionKeep.all(n), p, torch.Generator().manual_seed(0))
    assert abs(float(joint.float().mean()) - p) <= 4 * (p * (1 - p) / n) ** 0.5
    # the pipeline's unconditional branch: reference kept, audio, emotion and description nulled together
    assert kept.reference is None  # None: every sample keeps it (model/guidance.py)
    assert torch.equal(kept.audio, ~joint) and torch.equal(kept.emotion, ~joint)
    assert torch.equal(kept.description, ~joint)


def test_the_reference_keeps_its_distance_from_the_generated_frames(tmp_path):
    rng = random.Random(0)
    spec = WindowSpec("stage1", clip_frames=1, motion_frames=0, min_reference_distance=1)
    drawn = {_reference_index(rng, 10, 4, spec) for _ in range(500)}
    assert drawn == set(range(10)) - {4}  # every other frame, never the target
    wide = WindowSpec("stage2", clip_frames=4, motion_frames=2, min_reference_distance=3)
    drawn = {_reference_index(rng, 30, 10, wide) for _ in range(2000)}  # clip frames 12..15
    assert drawn == set(range(0, 10)) | set(range(18, 30))
    with pytest.raises(ClipDecodeError, match="min_reference_distance"):
        _reference_index(rng, 6, 0, wide)
    # distance 0 is Hallo's draw, unchanged: the same stream as before the setting existed
    anywhere = WindowSpec("stage1", clip_frames=1, motion_frames=0)
    assert [_reference_index(random.Random(5), 10, 4, anywhere) for _ in range(3)] == [
        random.Random(5).randrange(10)] * 3
    # on real shards: the decoded reference is never the target frame (the disc moves every frame)
    shards = write_training_shards(tmp_path, n_clips=2, frames=8)
    windows = TrainingWindows(str(shards), WindowSpec("stage1", 1, 0, 32, min_reference_distance=1), batch_size=2,
                              shuffle_buffer=0)
    for batch in (b for _, b in zip(range(6), windows, strict=False)):
        assert all(not torch.equal(r, f[0]) for r, f in zip(batch["reference"], batch["frames"], strict=True))


def _tiny_motion_adapter(folder: Path, heads: int = 2) -> dict[str, torch.Tensor]:
    from diffusers import MotionAdapter

    cfg = tiny_config()
    torch.manual_seed(11)
    adapter = MotionAdapter(block_out_channels=cfg.unet["block_out_channels"],
                            motion_layers_per_block=cfg.unet["layers_per_block"], motion_num_attention_heads=heads,
                            motion_norm_num_groups=cfg.unet["norm_num_groups"],
                            motion_max_seq_length=cfg.motion_max_frames, use_motion_mid_block=True)
    adapter.save_pretrained(folder)
    return adapter.state_dict()


def test_temporal_layers_load_from_an_animatediff_motion_adapter(tmp_path):
    adapter = _tiny_motion_adapter(tmp_path / "adapter")
    denoiser = DenoisingUNet(tiny_config())
    denoiser.load_motion_adapter(str(tmp_path / "adapter"))
    state = denoiser.unet.state_dict()
    # MotionAdapter keys are "<blocks>.<i>.motion_modules..." as in the UNet; every one of them was loaded
    assert adapter and all(torch.equal(state[k], v) for k, v in adapter.items())
    assert any(k.endswith("proj_out.weight") and v.any() for k, v in adapter.items())  # no longer zero
    _tiny_motion_adapter(tmp_path / "wrong", heads=4)  # same shapes, other head count: must not load silently
    with pytest.raises(ValueError, match="attention heads"):
        DenoisingUNet(tiny_config()).load_motion_adapter(str(tmp_path / "wrong"))


def _a2m_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.startswith("a2m.")}


def test_the_tiny_recipe_ends_in_one_checkpoint_holding_the_trained_a2m(tmp_path):
    shards = write_training_shards(tmp_path / "shards", n_clips=4, frames=30, cached_wav2vec=True)
    _tiny_motion_adapter(tmp_path / "adapter")

    def run(name, *overrides):  # flags first: argparse takes the key=value overrides only after them
        return main(["--config", TINY, "--shards", str(shards), "--out", str(tmp_path / name), "num_workers=0",
                     "val_samples=0", "warmup_steps=1", *overrides])

    run("a2m", "stage=a2m", "max_steps=3")
    a2m_checkpoint = tmp_path / "a2m" / "checkpoints" / "step-0000003"
    trained = _a2m_tensors(a2m_checkpoint / "ema.safetensors")  # init_a2m_weights=ema, the default
    assert not torch.equal(trained["a2m.decoder_out.weight"], torch.zeros_like(trained["a2m.decoder_out.weight"]))

    run("stage1", "stage=stage1", "clip_frames=1", "motion_frames=0", "max_steps=2",
        f"init_a2m_from={a2m_checkpoint}")
    stage1_checkpoint = tmp_path / "stage1" / "checkpoints" / "step-0000002"
    result = run("stage2", "stage=stage2", "max_steps=2", *NO_PIXEL_LOSSES, f"init_from={stage1_checkpoint}",
                 f"init_a2m_from={a2m_checkpoint}", f"motion_adapter={tmp_path / 'adapter'}", "motion_from_a2m=1",
                 "motion_from_reference=0")
    final = tmp_path / "stage2" / "checkpoints" / "step-0000002" / "model.safetensors"

    for checkpoint in (stage1_checkpoint / "model.safetensors", final):
        carried = _a2m_tensors(checkpoint)
        assert carried.keys() == trained.keys()
        assert all(torch.equal(carried[k], trained[k]) for k in trained), checkpoint  # bit for bit
    # stage 2 trained (its new layers moved) and every step saw A2M's motion frames, as configured
    stage1_state, final_state = load_file(stage1_checkpoint / "model.safetensors"), load_file(final)
    assert all(torch.equal(stage1_state[k], final_state[k]) for k in final_state if k.startswith("reference_net."))
    assert [r["motion_from_a2m"] for r in result.records] == [1.0, 1.0]
    logged = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert {"motion_from_a2m", "motion_from_reference", "unconditional"} <= set(logged[-1])
    assert "loss/motion_from_a2m" not in logged[-1]
    # the temporal layers started from the adapter: two small steps away from it, far from their zero init
    adapter = load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in adapter if k.endswith("proj_out.weight"))
    moved = (final_state[f"denoiser.unet.{name}"] - adapter[name]).abs().max()
    assert 0 < moved < 0.01 < adapter[name].abs().max(), (float(moved), name)
