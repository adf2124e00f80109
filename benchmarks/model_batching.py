"""Per-piece time of the model stages batched across pieces, against one piece at a time.

For each stage that ``preprocess.pipeline.run_piece_stage_batch`` batches (text sentiment, valence-arousal,
captioning, CLIP text, VAE latents) it times, from a fresh cache with the models loaded beforehand:

- ``batch 1``: every model at batch_size 1, one piece at a time (what the stages did before batching);
- ``alone``: the configured batch sizes, one piece at a time (each forward pass filled to batch_size rows with
  copies, ``preprocess.run.batching``: what a piece costs when it is redone on its own);
- ``batched``: the configured batch sizes, all pieces in one ``run_piece_stage_batch`` call (a partition);

prints wall and CPU time per piece (the speed-up is of CPU time, batch 1 over batched), and checks that
``alone`` and ``batched`` stored the same bits (np.array_equal of every array, equal JSON).
With ``--profile tiny`` (the default) the tiny random models of the real classes run: the figures show the
overhead per forward pass that batching removes, not what the real models gain (on a GPU, more).

    .venv/bin/python benchmarks/model_batching.py [--pieces 16] [--seconds 4] [--size 256] [--device cpu]
                                                  [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

import tiny_models  # noqa: E402
from preprocess.pipeline import (  # noqa: E402
    ClipJob,
    PieceOutcome,
    Workspace,
    load_model,  # noqa: E402
    run_piece_stage_batch,
    run_stage,
)
from preprocess.run.cache import FILES_KEY, RESULT_FILE  # noqa: E402
from preprocess.run.model_loading import register_tiny_builder  # noqa: E402
from preprocess.run.records import Candidate  # noqa: E402
from preprocess.run.settings import load_settings  # noqa: E402
from preprocess.video.standardise import VIDEO_FILE  # noqa: E402

register_tiny_builder(tiny_models.BUILDER)  # the tiny profile's models, built on first use

STAGE_MODELS = {"text_emotion": "text_emotion", "valence_arousal": "valence_arousal", "describe": "captioning",
                "text_embedding": "text_encoder", "latents": "vae"}
WORDS = ("hello there how are you today I am so glad to see you again what a lovely sunny day it is my friend "
         "the train was late and I was furious thank you so much").split()


def make_pieces(root: Path, n_pieces: int, seconds: float, size: int) -> list[PieceOutcome]:
    """Kept pieces with what the batched stages read: clip.mp4 (ffmpeg's testsrc2), vocals.wav (tones and noise),
    a transcript and a description of a few words (lengths vary, as real ones do)."""
    import subprocess

    rng = np.random.default_rng(0)
    pieces = []
    for index in range(n_pieces):
        files = root / f"p{index}"
        files.mkdir(parents=True)
        duration = round(seconds * rng.uniform(0.7, 1.0), 2)  # pieces of a partition differ in length
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}x{size}:rate=25", "-ss", str(index * 0.37), "-t", str(duration),
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                        str(files / VIDEO_FILE)], check=True)
        t = np.arange(int(duration * 16000)) / 16000
        vocals = 0.2 * np.sin(2 * np.pi * (120 + 15 * index) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(files / "vocals.wav", vocals.astype(np.float32), 16000, subtype="PCM_16")
        transcript = " ".join(rng.choice(WORDS, int(rng.integers(4, 30))))
        description = "a person " + " ".join(rng.choice(WORDS, int(rng.integers(3, 15))))
        pieces.append(PieceOutcome(
            clip_id=f"p{index}", job=ClipJob(candidate=Candidate(f"p{index}", str(files / VIDEO_FILE), "bench")),
            frames=(0, int(duration * 25)), files_dir=str(files), content_key=f"content-p{index}",
            features={"separate": {"dir": str(files), "vocals": "vocals.wav", "has_speech": True,
                                   "key": f"separate-p{index}"},
                      "transcribe": {"text": transcript, "language": "en", "status": "ok",
                                     "key": f"transcribe-p{index}"},
                      "describe": {"text": description, "key": f"describe-p{index}"}}))
    return pieces


def stored(outcome: PieceOutcome, stage: str) -> tuple[dict, dict[str, np.ndarray]]:
    entry = Path(outcome.features[stage]["dir"])
    result = json.loads((entry / RESULT_FILE).read_text())
    result.pop("seconds")
    return result, {name: np.load(entry / name) for name in result[FILES_KEY] if name.endswith(".npy")}


def identical(alone: list[PieceOutcome], batched: list[PieceOutcome], stage: str) -> bool:
    for one, many in zip(alone, batched, strict=True):
        (result_one, arrays_one), (result_many, arrays_many) = stored(one, stage), stored(many, stage)
        if result_one != result_many or arrays_one.keys() != arrays_many.keys():
            return False
        if not all(np.array_equal(array, arrays_many[name]) for name, array in arrays_one.items()):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0, help="longest piece (video and audio)")
    parser.add_argument("--size", type=int, default=256, help="frame side of the clips (latents run at this size)")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--device", default=None, help="every model stage's device (auto, cpu, cuda)")
    parser.add_argument("--captioning-batch", type=int, default=4,
                        help="captioning batch size (the default settings say 1: a 3B model at bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def settings_for(batch_size: int | None):
        models = {}
        for kind in STAGE_MODELS.values():
            models[kind] = {**({"device": args.device} if args.device else {}),
                            **({"batch_size": batch_size} if batch_size else {})}
        if batch_size is None:
            models["captioning"]["batch_size"] = args.captioning_batch
        return load_settings(args.profile, {"standardise": {"size": args.size}, "models": models,
                                            "visual": {"latents": {"enabled": True}}})

    configured, one_by_one = settings_for(None), settings_for(1)
    for kind in STAGE_MODELS.values():
        load_model(kind, getattr(configured.models, kind))
    print(f"{args.pieces} pieces of up to {args.seconds} s at {args.size}x{args.size}, profile {args.profile}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # CPU time (all threads of this process) next to wall time: on a shared machine it is the steadier figure
    print("per piece, wall / CPU time in ms")
    print(f"{'stage':<16}{'batch':>6}{'batch 1':>17}{'alone':>17}{'batched':>17}{'speed-up':>10}  identical")
    with tempfile.TemporaryDirectory() as scratch:
        pieces = make_pieces(Path(scratch) / "pieces", args.pieces, args.seconds, args.size)
        for stage, kind in STAGE_MODELS.items():
            times, cpu_times, results = {}, {}, {}
            for settings in (one_by_one, configured):  # warm-up: the first forward passes of a shape are slower
                run_piece_stage_batch(stage, pieces[:2], settings, Workspace(Path(scratch) / f"{stage}-warm"))
                shutil.rmtree(Path(scratch) / f"{stage}-warm")
            for name, settings, batched in (("batch 1", one_by_one, False), ("alone", configured, False),
                                            ("batched", configured, True)):
                workspace = Workspace(Path(scratch) / f"{stage}-{name.replace(' ', '')}")
                started, cpu_started = time.perf_counter(), time.process_time()
                if batched:
                    results[name] = run_piece_stage_batch(stage, pieces, settings, workspace)
                else:
                    results[name] = [run_stage(stage, piece, settings, workspace) for piece in pieces]
                times[name] = (time.perf_counter() - started) / len(pieces)
                cpu_times[name] = (time.process_time() - cpu_started) / len(pieces)
            same = identical(results["alone"], results["batched"], stage)
            print(f"{stage:<16}{getattr(configured.models, kind).batch_size:>6}"
                  + "".join(f"{1000 * times[name]:>9.1f} /{1000 * cpu_times[name]:>6.1f}"
                            for name in ("batch 1", "alone", "batched"))
                  + f"{cpu_times['batch 1'] / cpu_times['batched']:>9.1f}x  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
