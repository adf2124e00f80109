"""Stage 2 at the paper's shapes on GPUs, then a 40-step DDIM generation: step time, peak memory, MFU, data wait.

    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_stage2.py            # one GPU
    torchrun --standalone --nproc_per_node=8 benchmarks/gpu_stage2.py --steps 8  # a node

Random weights and synthetic, data-shaped batches (nothing to download): the full SynchroRaMa model
(SD 1.5-size UNets, ``model/config.full_config``), SD's VAE architecture and the loss experts, stage 2's
trainable set, batch 4 per GPU of 2 motion + 14 clip frames at 512x512 (64x64 latents), bf16 autocast over
fp32 weights, gradient checkpointing, DDP over NCCL, fused AdamW, every stage-2 loss on, through the same
``Objective``, generators and collectives as ``model/training/train.py``. Batches are made on the host in a
background thread and copied to the GPU, so "data wait" is the loop's wait for them (a real loader's figure
comes from ``benchmarks/train_loader.py``). MFU counts model FLOPs (``model.training.train.model_flops``: no
recomputation); HFU counts what ran. Then rank 0 generates one clip-length video with 40 DDIM steps.
Without a CUDA device it says so and exits with status 2 at once. Under 10 minutes on one H100/H200 (the
first steps include cuDNN autotuning; only the later ones are timed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_batches(cfg, batch_size: int, seed: int, pinned: bool):
    """An endless stream of data-shaped batches (``model.training.batch.fake_batch``), made on the host."""
    from model.training.batch import fake_batch

    index = seed
    while True:
        batch = fake_batch(cfg, batch_size, seed=index)
        if pinned:
            batch = map_batch(batch, lambda t: t.pin_memory())
        yield batch
        index += 1


def map_batch(batch, function):
    from model.emotion_embedding import EmotionFeatures
    from model.training.batch import TrainingBatch

    moved = {k: function(v) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    return TrainingBatch(**moved, emotion=EmotionFeatures(*(function(v) for v in vars(batch.emotion).values())))


def prefetch(iterator, depth: int = 2) -> queue.Queue:
    buffer: queue.Queue = queue.Queue(depth)
    threading.Thread(target=lambda: [buffer.put(item) for item in iterator], daemon=True).start()
    return buffer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps; the first 2 are warm-up, not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=40, help="DDIM steps of the generation (0: skip it)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak per GPU; 0: look it up")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_stage2: no CUDA device here; this benchmark needs a GPU. Run it on a GPU machine with:\n"
              "  torchrun --standalone --nproc_per_node=1 benchmarks/gpu_stage2.py", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from diffusers import AutoencoderKL
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from model.config import full_config
    from model.devices import device_generator
    from model.experts import LossExperts
    from model.pipeline import TalkingFacePipeline
    from model.schedule import train_scheduler
    from model.synchrorama import SynchroRamaModel
    from model.training.train import GPU_BF16_PEAK_TFLOPS, Objective, mean_over_ranks, model_flops
    from model.training.training_step import StepOptions

    torchrun = "RANK" in os.environ
    if torchrun:
        dist.init_process_group("nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if torchrun else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), 0.0)

    torch.manual_seed(0)
    cfg = full_config()
    model = SynchroRamaModel(cfg)
    vae = AutoencoderKL(latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512).requires_grad_(False).eval()
    experts = LossExperts(cfg).requires_grad_(False).eval()
    trainable = model.set_stage("stage2")
    model.denoiser.unet.enable_gradient_checkpointing()
    model.reference_net.unet.enable_gradient_checkpointing()
    model.to(device).train()
    vae.to(device)
    experts.to(device)
    options = StepOptions(motion_from_a2m=0.5, motion_from_reference=0.1, unconditional=0.05)
    objective = Objective(model, vae, experts, train_scheduler(cfg.recipe), "stage2", options)
    if torchrun:
        objective = DistributedDataParallel(objective, device_ids=[device.index], broadcast_buffers=False)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    batches = prefetch(synthetic_batches(cfg, args.batch_size, seed=1000 * rank, pinned=True))

    times, waits, flops = [], [], None
    for step in range(args.steps):
        started = time.perf_counter()
        batch = batches.get()
        waits.append(time.perf_counter() - started)
        batch = map_batch(batch, lambda t: t.to(device, non_blocking=True))
        if flops is None:
            flops = model_flops(cfg, "stage2", batch, vae, experts, options)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = objective(batch, device_generator(device, step * 131 + rank))
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = {k: float(v.detach()) for k, v in losses.items()}
        if torchrun:
            logged = mean_over_ranks(logged, device)  # the NCCL path of the training log
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        if rank == 0:
            print(f"step {step + 1}: {times[-1]:.2f} s, loss {logged['total']:.4f}", flush=True)
    timed = times[2:] or times
    step_s = sum(timed) / len(timed)
    result = {
        "gpu": name, "gpus": world, "batch_per_gpu": args.batch_size, "frames": cfg.motion_frames + cfg.clip_frames,
        "step_s": step_s, "samples_per_s": args.batch_size * world / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "data_wait_fraction": sum(waits[2:] or waits) / sum(timed),
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / step_s / (peak * 1e12) if peak else None,
    }
    if torchrun:
        dist.barrier()

    if rank == 0 and args.sample_steps:
        del optimizer, objective
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        audio_encoder = Wav2Vec2Model(Wav2Vec2Config()).requires_grad_(False).to(device)
        pipeline = TalkingFacePipeline(model, vae, audio_encoder)  # bf16 autocast on CUDA
        image = torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8).numpy()
        audio = (0.1 * torch.randn(cfg.clip_frames * cfg.data.samples_per_frame)).numpy()  # one clip
        started = time.perf_counter()
        frames = pipeline.frames(image, audio, num_inference_steps=args.sample_steps, seed=0)
        torch.cuda.synchronize(device)
        result.update(generation_s=time.perf_counter() - started, generation_frames=int(frames.shape[0]),
                      generation_steps=args.sample_steps,
                      generation_peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    if rank == 0:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (unknown GPU: --peak-tflops)"
        print(f"stage 2, {world} x {name}, batch {args.batch_size} x {result['frames']} frames at 512x512, bf16: "
              f"{step_s:.2f} s/step, peak memory {result['peak_memory_gib']:.1f} GiB, MFU {mfu}, "
              f"data wait {result['data_wait_fraction']:.1%}")
        if "generation_s" in result:
            print(f"generation: {result['generation_frames']} frames, {args.sample_steps} DDIM steps in "
                  f"{result['generation_s']:.1f} s, peak memory {result['generation_peak_memory_gib']:.1f} GiB")
        print(json.dumps(result))
    if torchrun:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
