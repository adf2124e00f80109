"""Throughput of each audio model stage, in audio-seconds per wall-second, on generated speech + music.

Runs the stages as the flow does (``preprocess.pipeline.run_stage``, from a fresh cache, one clip at a time, models
loaded before timing so that load time is excluded and printed separately). With ``--profile tiny`` (the
default) the tiny random models run on CPU: the numbers measure the pipeline's overhead, not real models. With
``--profile default`` the real models run when they are in the local caches (else the missing-model error says
how to get them); ``--device cuda`` puts them on a GPU.

    .venv/bin/python benchmarks/audio_stages.py [--clips 3] [--seconds 10] [--profile tiny] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

import tiny_models  # noqa: E402
from preprocess.pipeline import (  # noqa: E402
    AUDIO_STAGES,
    ClipJob,
    PieceOutcome,
    Workspace,
    load_model,  # noqa: E402
    run_stage,
)
from preprocess.run.model_loading import register_tiny_builder  # noqa: E402
from preprocess.run.records import Candidate  # noqa: E402
from preprocess.run.settings import load_settings  # noqa: E402
from preprocess.video.standardise import AUDIO_FILE, StandardisedClip  # noqa: E402
from synchrorama.sample_data import speech_wav  # noqa: E402

register_tiny_builder(tiny_models.BUILDER)  # the tiny profile's models, built on first use

MODEL_OF_STAGE = {"separate": "separation", "transcribe": "transcription", "text_emotion": "text_emotion",
                  "speech_emotion": "speech_emotion", "valence_arousal": "valence_arousal", "wav2vec": "wav2vec"}


def speech_with_music(path: Path, seconds: float, scratch: Path) -> None:
    from julius import resample_frac

    speech, rate = soundfile.read(speech_wav(scratch / "speech.wav"), dtype="float32")
    speech = resample_frac(torch.from_numpy(speech), rate, 16000).numpy()
    n = int(seconds * 25) * 640
    t = np.arange(n) / 16000
    mix = (0.1 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))).astype(np.float32)
    mix += np.resize(speech, n)
    soundfile.write(path, 0.5 * mix / np.abs(mix).max(), 16000, subtype="PCM_16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--device", default=None, help="override every model stage's device (auto, cpu, cuda)")
    args = parser.parse_args()
    overrides = ({"models": {kind: {"device": args.device} for kind in MODEL_OF_STAGE.values()}}
                 if args.device else None)
    settings = load_settings(args.profile, overrides)

    load_seconds = {}
    for kind in MODEL_OF_STAGE.values():
        started = time.perf_counter()
        loaded = load_model(kind, getattr(settings.models, kind))
        load_seconds[kind] = time.perf_counter() - started
    device = loaded.device

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        workspace = Workspace(scratch / "out")
        stage_seconds = dict.fromkeys(AUDIO_STAGES, 0.0)
        audio_seconds = 0.0
        for index in range(args.clips):
            files = scratch / f"clip{index}"
            files.mkdir()
            speech_with_music(files / AUDIO_FILE, args.seconds, scratch)
            n_frames = int(args.seconds * 25)
            # separation decodes the piece's range of its source: here the generated wav is the source too
            clip = StandardisedClip(video="clip.mp4", audio=AUDIO_FILE, n_frames=n_frames, fps=25, size=512,
                                    sample_rate=16000, loudness_in_lufs=None, gain_db=0.0, audio_padded_samples=0,
                                    notes=())
            job = ClipJob(candidate=Candidate(f"clip{index}", str(files / AUDIO_FILE), "bench"),
                          source_sha256=f"bench-{index}", standardised=clip)
            piece = PieceOutcome(clip_id=f"clip{index}", job=job, frames=(0, n_frames), files_dir=str(files),
                                 content_key=f"bench-{index}")
            for stage in AUDIO_STAGES:
                started = time.perf_counter()
                piece = run_stage(stage, piece, settings, workspace)
                stage_seconds[stage] += time.perf_counter() - started
                assert piece.kept, piece.rejection
            audio_seconds += n_frames / 25

    print(f"inputs: {args.clips} clips x {args.seconds:.0f} s of espeak-ng speech + sine chords "
          f"(profile {args.profile}, device {device}, {torch.get_num_threads()} torch threads, one clip at a time)")
    if args.profile == "tiny":
        print("NOTE: tiny random models: these rates measure the pipeline around the models, not real models")
    for stage in AUDIO_STAGES:
        kind = MODEL_OF_STAGE[stage]
        print(f"  {stage:16s} {audio_seconds / stage_seconds[stage]:9.1f} audio-s per s   "
              f"(load {load_seconds[kind]:5.2f} s, model {getattr(settings.models, kind).model})")
    total = sum(stage_seconds.values())
    print(f"  {'all audio stages':16s} {audio_seconds / total:9.1f} audio-s per s")


if __name__ == "__main__":
    main()
