"""What a multi-node run needs from ``model/training/train.py``, on the CPU: every tensor collective gets tensors on the
training device (NCCL takes only the rank's GPU tensors; gloo, used here, takes anything, so the loop checks
for it itself), ranks agree on the resume step, a resume with another world size or worker count stops with a
clear error, SIGTERM saves a checkpoint that the next run continues from, and MFU counts model FLOPs only."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train_loader import write_training_shards
from torch.utils.flop_counter import FlopCounterMode

from model.config import tiny_config
from model.emotion_embedding import EmotionFeatures
from model.experts import LossExperts
from model.schedule import train_scheduler
from model.synchrorama import SynchroRamaModel
from model.training import train as train_module
from model.training.batch import TrainingBatch, fake_batch
from model.training.tiny_components import tiny_vae
from model.training.train import (
    agree_on_step,
    any_rank,
    check_resume_layout,
    collective,
    main,
    mean_over_ranks,
    model_flops,
)
from model.training.training_step import StepOptions, training_losses

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train_tiny.toml")
META, CPU = torch.device("meta"), torch.device("cpu")
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                      "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
                      "scatter", "send", "recv", "isend", "irecv"}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("cluster-shards"), n_clips=4, frames=30)


@pytest.fixture
def gloo_world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_collective_refuses_a_tensor_off_the_training_device(gloo_world_of_one):
    # the training device is meta, a device this CPU tensor is not on: gloo itself would take it, NCCL would not
    with pytest.raises(RuntimeError, match="on cpu but this rank trains on meta"):
        collective("all_reduce", torch.ones(2), META)
    collective("all_reduce", torch.ones(2, device=META), META)  # gloo accepts meta tensors: no error
    assert collective("all_reduce", torch.ones(2), CPU).tolist() == [1.0, 1.0]


def test_the_loops_collectives_build_their_tensors_on_the_training_device(gloo_world_of_one):
    assert mean_over_ranks({"a": 1.5, "b": 2.0}, CPU) == {"a": 1.5, "b": 2.0}
    agree_on_step(7, CPU)
    assert any_rank(True, CPU, True) and not any_rank(False, CPU, True)
    # with meta as the training device each helper gets past the device check (a tensor made on the CPU would
    # stop there) and fails only where it reads the result back, which meta tensors cannot do
    for call in (lambda: mean_over_ranks({"a": 1.0}, META), lambda: agree_on_step(3, META),
                 lambda: any_rank(True, META, True)):
        with pytest.raises((RuntimeError, NotImplementedError)) as error:
            call()
        assert "this rank trains on" not in str(error.value) and "meta" in str(error.value)


def test_every_tensor_collective_in_train_py_goes_through_the_device_check():
    tree = ast.parse(Path(train_module.__file__).read_text())
    direct = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef) or function.name == "collective":
            continue
        for node in ast.walk(function):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dist"
                    and node.attr in TENSOR_COLLECTIVES):
                direct.append(f"{function.name}: dist.{node.attr} (line {node.lineno})")
    assert direct == []


def test_ranks_that_resume_at_different_steps_stop_with_a_clear_error(gloo_world_of_one):
    # one rank: MAX over [step, -step] is the rank's own; the mismatch path is the two-number comparison
    agree_on_step(0, CPU)
    with pytest.raises(ValueError, match="2 rank"):
        check_resume_layout({"data_positions": [{}, {}]}, {"num_workers": 0}, 1, 0, Path("ckpt"))
    with pytest.raises(ValueError, match="num_workers=2"):
        check_resume_layout({"data_positions": [{}], "world_size": 1, "num_workers": 2}, {}, 1, 0, Path("ckpt"))
    check_resume_layout({"data_positions": [{}]}, {"num_workers": 0}, 1, 0, Path("ckpt"))  # older checkpoints


def test_resuming_with_another_worker_count_is_refused(shard_dir, tmp_path):
    settings = ["--config", TINY, "--shards", str(shard_dir), "--out", str(tmp_path), "stage=a2m", "max_steps=2",
                "val_samples=0"]
    main([*settings, "stop_at_step=1", "num_workers=0"])
    with pytest.raises(ValueError, match="num_workers=0 to resume"):
        main([*settings, "num_workers=1"])


def test_sigterm_saves_a_checkpoint_and_the_next_run_continues(shard_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--config", TINY, "--shards", str(shard_dir), "--out", str(out), "stage=stage2", "max_steps=400",
            "checkpoint_every=1000", "val_samples=0", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "model.training.train", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "log.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    assert "stopped by SIGTERM" in output
    saved = (out / "checkpoints" / "latest").read_text()
    stopped_at = int(saved.removeprefix("step-"))
    assert 2 <= stopped_at < 400 and stopped_at == json.loads(log.read_text().splitlines()[-1])["step"]
    resumed = main([*args, f"max_steps={stopped_at + 2}", "num_workers=0"])
    assert [r["step"] for r in resumed.records] == [stopped_at + 1, stopped_at + 2]


def test_mfu_counts_model_flops_without_recomputation():
    # both counts on the meta device, where attention is counted the same way (the CPU's flash-attention kernel
    # has no FLOP formula in torch's counter; CUDA's have)
    tiny = tiny_config()  # every sample scored by the pixel losses, so stage 2 always decodes
    cfg = dataclasses.replace(tiny, recipe=dataclasses.replace(tiny.recipe, pixel_loss_max_timestep=10_000))
    with META:
        vae, experts = tiny_vae(cfg), LossExperts(cfg).requires_grad_(False)
    batch = fake_batch(cfg)
    meta_batch = TrainingBatch(**{k: v.to(META) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)},
                               emotion=EmotionFeatures(*(v.to(META) for v in vars(batch.emotion).values())))

    def executed(stage: str, checkpointing: bool) -> float:
        with META:
            model = SynchroRamaModel(cfg)
        model.set_stage(stage)
        if checkpointing:
            model.denoiser.unet.enable_gradient_checkpointing()
            model.reference_net.unet.enable_gradient_checkpointing()
        counter = FlopCounterMode(display=False)
        with counter:
            training_losses(model, meta_batch, train_scheduler(cfg.recipe), stage, vae, experts)["total"].backward()
        return float(counter.get_total_flops())

    # stage 1 has no pixel losses: without checkpointing, what runs is exactly the model's arithmetic
    stage1 = model_flops(cfg, "stage1", batch, vae, experts, StepOptions())
    assert stage1 == executed("stage1", checkpointing=False) < executed("stage1", checkpointing=True)
    # stage 2 also recomputes its pixel-loss decodes (always checkpointed): the model's count leaves that out
    stage2 = model_flops(cfg, "stage2", batch, vae, experts, StepOptions())
    assert stage2 < executed("stage2", checkpointing=False) < executed("stage2", checkpointing=True)
