"""Training data throughput, and (with CUDA) one training step's time, memory and MFU.

    python benchmarks/train_loader.py                      # sample shards made by the preprocess flow
    python benchmarks/train_loader.py --shards out/demo/shards --workers 4 --stage stage2

Loader section: windows per second from ``shards/training_loader.py`` at the full model's 512x512 frames
(decode + resize + audio, no latents cached), for the given DataLoader workers. Step section (CUDA only, or
``--step-size tiny`` to try it on the CPU): the full model with random weights on a data-shaped batch, bf16
autocast, forward + backward + AdamW; FLOPs counted once with ``FlopCounterMode``; with ``--write-docs`` the
figures replace the marked block of ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.config import config_for  # noqa: E402
from shards.training_loader import TrainingWindows, WindowSpec, data_loader  # noqa: E402

DOCS_BEGIN, DOCS_END = "<!-- step-benchmark:begin -->", "<!-- step-benchmark:end -->"


def sample_shards(directory: Path) -> Path:
    """Two generated talking-face videos through the real preprocess flow (tiny profile): the pipeline's format.

    In a child process: Prefect leaves threads and a temporary server behind, which forked loader workers would
    inherit (and fail on at exit)."""
    script = f"""
from pathlib import Path
from flows.preprocess import preprocess
from synchrorama.sample_data import make_talking_video
raw = Path({str(directory)!r}) / "raw"
for i in range(2):
    make_talking_video(raw / f"speaker{{i}}.mp4", layout="single", seconds=5.0)
preprocess(dataset="folder", raw_dir=str(raw), out_dir={str(directory / "out")!r}, profile="tiny")
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return directory / "out" / "shards"


def loader_throughput(shards, stage: str, workers: int, batch_size: int, batches: int) -> dict:
    cfg = config_for("full")
    m, t = (0, 1) if stage == "stage1" else (cfg.motion_frames, cfg.clip_frames)
    spec = WindowSpec(stage, t, m, cfg.data.image_size)
    dataset = TrainingWindows(shards, spec, batch_size, shuffle_buffer=16)
    loader = iter(data_loader(dataset, workers))
    next(loader)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    elapsed = time.perf_counter() - started
    samples = batches * batch_size
    return {"stage": stage, "workers": workers, "samples_per_s": samples / elapsed,
            "frames_per_s": samples * spec.frames / elapsed, "skipped": dataset.skipped.count,
            "frame_shape": tuple(batch["frames"].shape[1:])}


def step_benchmark(size: str, stage: str, batch_size: int, steps: int = 5) -> dict:
    """Time, peak memory and MFU of optimizer steps on a fake batch (random weights: speed only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.experts import LossExperts
    from model.schedule import train_scheduler
    from model.synchrorama import SynchroRamaModel
    from model.training.batch import fake_batch
    from model.training.train import GPU_BF16_PEAK_TFLOPS, Objective

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = config_for(size)
    if stage == "stage1":  # image pairs
        cfg = dataclasses.replace(cfg, clip_frames=1, motion_frames=0)
    if size == "tiny":
        from model.training.tiny_components import tiny_vae
        vae = tiny_vae(cfg)
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512).requires_grad_(False)
    model = SynchroRamaModel(cfg)
    trainable = model.set_stage(stage)
    model.denoiser.unet.enable_gradient_checkpointing()
    model.reference_net.unet.enable_gradient_checkpointing()
    objective = Objective(model, vae.eval(), LossExperts(cfg).requires_grad_(False), train_scheduler(cfg.recipe),
                          stage).to(device)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda)
    batch = fake_batch(cfg, batch_size)
    batch = type(batch)(**{k: v.to(device) for k, v in vars(batch).items()})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()

    def step(counter=contextlib.nullcontext()):
        with counter:
            with amp:
                losses = objective(batch, torch.Generator().manual_seed(0))
            losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    step(counter)
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), 0.0)
    return {"device": name, "size": size, "stage": stage, "batch_size": batch_size, "step_s": seconds,
            "samples_per_s": batch_size / seconds, "tflops_per_step": flops / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "mfu": flops / seconds / (peak * 1e12) if peak else None}


def write_docs(rows: list[dict]) -> None:
    path = REPO / "docs" / "training.md"
    text = path.read_text()
    table = ["| device | stage | batch | step s | samples/s | TFLOP/step | peak GB | MFU |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['device']} | {r['stage']} | {r['batch_size']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | "
              f"{r['tflops_per_step']:.1f} | {r['peak_memory_gb'] or 0:.1f} | "
              f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} |" for r in rows]
    head, _, rest = text.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    path.write_text(head + DOCS_BEGIN + "\n" + "\n".join(table) + "\n" + DOCS_END + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="shard directory or URL spec (default: made here by the preprocess flow)")
    parser.add_argument("--stage", default="stage2", choices=("a2m", "stage1", "stage2"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--step-size", choices=("full", "tiny"), default="full",
                        help="model size of the step section (it runs on CUDA, or on the CPU with tiny)")
    parser.add_argument("--write-docs", action="store_true", help="put the step figures into docs/training.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards or str(sample_shards(Path(scratch)))
        print(f"loader: {shards}, batch {args.batch_size}, 512x512 frames, no cached latents")
        for workers in args.workers:
            r = loader_throughput(shards, args.stage, workers, args.batch_size, args.batches)
            print(f"  {r['stage']} workers={r['workers']}: {r['samples_per_s']:.2f} windows/s "
                  f"({r['frames_per_s']:.1f} frames/s, window {r['frame_shape']}), skipped {r['skipped']}")

    if torch.cuda.is_available() or args.step_size == "tiny":
        rows = [step_benchmark(args.step_size, stage, 1 if stage == "stage2" else 4) for stage in ("stage1", "stage2")]
        for r in rows:
            memory = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GB"
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(f"step {r['device']} {r['size']} {r['stage']} batch {r['batch_size']}: {r['step_s']:.3f} s/step, "
                  f"{r['tflops_per_step']:.2f} TFLOP/step, peak {memory}, MFU {mfu}")
        if args.write_docs and torch.cuda.is_available():
            write_docs(rows)
    else:
        print("step section: no CUDA device (run on a GPU machine, or --step-size tiny for a CPU smoke run)")


if __name__ == "__main__":
    main()
