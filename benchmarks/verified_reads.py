"""What verified reads cost: sha256 speed, the writer's re-hash before reusing a shard, and the reader's
throughput with each ``verify`` mode.

    python benchmarks/verified_reads.py                 # 4 shards of 8 clips, about 55 MB
    python benchmarks/verified_reads.py --clips 64 --repeat 5

The shards are written with ``shards.writer`` from generated clips (a 2 s H.264 mp4, its wav, and a float16
``latents.npy`` of random values, the pipeline's heaviest member: 1.6 MB per 50-frame clip), so their size is
realistic and their bytes incompressible. Figures are with the shards in the page cache (just written), which
is the steady state of a training run re-reading its data every epoch; a cold first read is bounded by the
disk instead, for the hash and the read alike.

Reader rows read ``latents.npy`` + ``wav`` + ``json`` with ``decode_video=False``: the least decoding work per
byte, so the hashing pass weighs the most there; a loader that decodes mp4s pays the same absolute cost against
a much longer decode. Loader rows: one epoch of ``TrainingWindows`` stage-2 windows (M=2, T=16) from the
cached latents and from the mp4, verified and not. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from shards.reader import VERIFY_MODES, clip_dataset  # noqa: E402
from shards.schema import ShardSample, clip_metadata, encode_json, file_sha256  # noqa: E402
from shards.training_loader import TrainingWindows, WindowSpec  # noqa: E402
from shards.writer import write_shards  # noqa: E402


def make_samples(n_clips: int, frames: int) -> list[ShardSample]:
    from test_train_loader import _mp4, _npy, _wav  # the test suite's small real-media generators

    rng = np.random.default_rng(0)
    video = _mp4(frames, phase=0.0)  # one encode, shared: encoding is not what is measured
    samples = []
    for i in range(n_clips):
        latents = rng.standard_normal((frames, 4, 64, 64)).astype(np.float16)
        members = {
            "mp4": video, "wav": _wav(frames, 200 + i),
            "landmarks.npy": _npy(np.zeros((frames, 478, 3), np.float16)),
            "pose.npy": _npy(np.zeros((frames, 3), np.float32)), "latents.npy": _npy(latents),
            "json": encode_json(clip_metadata(clip_id=f"clip{i}", source=f"clip{i}.mp4", dataset="bench",
                                              n_frames=frames)),
        }
        samples.append(ShardSample(f"clip{i}", members, content_key=str(i)))
    return samples


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--clips-per-shard", type=int, default=8)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per figure")
    args = parser.parse_args()

    samples = make_samples(args.clips, args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp) / "shards"
        started = time.perf_counter()
        manifests = write_shards(samples, shard_dir, max_samples_per_shard=args.clips_per_shard)
        first_write_s = time.perf_counter() - started
        total_mb = sum(m.n_bytes for m in manifests) / 1e6
        tars = [shard_dir / m.tar_name for m in manifests]

        def hash_all() -> None:
            for tar in tars:
                with open(tar, "rb") as file:
                    file_sha256(file)

        hash_s = best_of(args.repeat, hash_all)
        reuse_s = best_of(args.repeat, lambda: write_shards(samples, shard_dir,
                                                             max_samples_per_shard=args.clips_per_shard))
        assert all(m.reused for m in write_shards(samples, shard_dir, max_samples_per_shard=args.clips_per_shard))

        reader = {}
        for mode in VERIFY_MODES:
            def read(mode=mode) -> None:
                n = sum(1 for _ in clip_dataset(shard_dir, members=["latents.npy", "wav"], decode_video=False,
                                                verify=mode))
                assert n == args.clips, n
            seconds = best_of(args.repeat, read)
            reader[mode] = {"s": round(seconds, 3), "mb_per_s": round(total_mb / seconds, 1),
                            "clips_per_s": round(args.clips / seconds, 1)}
        off = reader["off"]["s"]
        for mode in VERIFY_MODES:
            reader[mode]["overhead_vs_off"] = f"{100 * (reader[mode]['s'] - off) / off:+.0f}%"

        # The training loader, one epoch of stage-2 windows (M=2, T=16), batch 1: from the cached latents (no
        # video decode) and from the mp4 (decode + resize to 512, the uncached path).
        loader = {}
        for name, cached in (("latents", True), ("pixels", False)):
            spec = WindowSpec("stage2", clip_frames=16, motion_frames=2, prefer_cached=cached)
            for mode in ("sha256", "off"):
                def epoch(spec=spec, mode=mode) -> None:
                    windows = TrainingWindows(shard_dir, spec, batch_size=1, shuffle_buffer=0, verify=mode)
                    batches = iter(windows)
                    for _ in range(args.clips):
                        next(batches)
                seconds = best_of(args.repeat if cached else 1, epoch)
                loader[f"{name}_{mode}"] = {"s": round(seconds, 2), "windows_per_s": round(args.clips / seconds, 1)}

    print(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "shards": len(manifests), "clips": args.clips, "total_mb": round(total_mb, 1),
        "sha256_mb_per_s": round(total_mb / hash_s, 1),
        "first_write_s": round(first_write_s, 2),
        "reuse_write_s": round(reuse_s, 3), "reuse_mb_per_s": round(total_mb / reuse_s, 1),
        "reader_decode_video_false": reader,
        "loader_stage2_one_epoch": loader,
    }, indent=1))


if __name__ == "__main__":
    main()
