"""GPU memory of one stage-2 training step of the full model at the paper's batch, estimated on ``meta``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_stage2.py [--batch-size 4]

Prints the breakdown of ``model.training.memory_estimate.estimate_training_memory`` (bf16 autocast, fp32 master
weights, AdamW and EMA) with every memory measure on, then with each one off. No GPU and no weights needed;
about a minute on a CPU. The figures are recorded in docs/model.md, "Memory".
"""

from __future__ import annotations

import argparse
import time

from model.config import full_config
from model.training.memory_estimate import estimate_training_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=None, help="clips per GPU (default: the recipe's 4)")
    parser.add_argument("--stage", default="stage2", choices=["stage1", "stage2"])
    args = parser.parse_args()
    cfg = full_config()
    batch = args.batch_size or cfg.recipe.batch_size
    frames = cfg.motion_frames + cfg.clip_frames
    print(f"{args.stage}, full model, {batch} x ({cfg.motion_frames}+{cfg.clip_frames}) frames, "
          f"{cfg.data.image_size}x{cfg.data.image_size}, bf16 autocast, AdamW")
    variants = {
        "all measures on": {},
        "motion modules not checkpointed": {"motion_module_checkpointing": False},
        f"pixel-loss decode in one region ({batch} x {cfg.recipe.pixel_frames} frames)":
            {"decode_frames_per_region": batch * cfg.recipe.pixel_frames},
        "no pixel losses": {"pixel_losses": False},
        "no gradient checkpointing at all": {"gradient_checkpointing": False},
    }
    for name, options in variants.items():
        start = time.perf_counter()
        estimate = estimate_training_memory(cfg, args.stage, batch_size=batch, **options)
        print(f"\n{name} ({frames} frames per clip; estimated in {time.perf_counter() - start:.0f} s)")
        print(estimate.breakdown())


if __name__ == "__main__":
    main()
