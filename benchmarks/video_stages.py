"""Benchmark of the video stages against a bare ffmpeg baseline, in the same process on the same inputs.

Prints, for generated 720p talking-face videos:
- baseline: one ffmpeg call per clip doing decode + crop + scale to 512 + 25 fps + libx264 encode, with the
  same crop box and encoder settings as the pipeline (clip-seconds per wall-second);
- pipeline: the video stages as the flow runs them (probe, face survey, standardise with the face mesh and the
  frame-quality measures on its own decode, face-landmarks, filters and cut), from a fresh cache
  (clip-seconds per wall-second), and the ratio to baseline;
- both in CPU seconds per clip-second (this process and the tools it ran): on a machine shared with other work
  the wall-clock ratio moves with the load, the CPU ratio much less; on ``cores`` idle cores the wall-clock
  ratio cannot beat about ``baseline CPU / pipeline CPU`` once both keep every core busy.

A first clip (not counted) warms up what a run loads once per process (MediaPipe graphs, Silero VAD, about
2-4 s here): a real run amortises that over hundreds of clips, a 3-clip benchmark would not.

    .venv/bin/python benchmarks/video_stages.py [--clips 3] [--seconds 10] [--profile default]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from preprocess.datasets.video_files import folder_candidates
from preprocess.pipeline import (
    Workspace,
    run_select,
    run_stage,
    start_job,
)
from preprocess.run.media import run_ffmpeg
from preprocess.run.settings import load_settings
from synchrorama.sample_data import make_talking_video

STAGES = ("probe", "locate", "standardise", "faces")


def cpu_seconds() -> float:
    """CPU time of this process (MediaPipe's threads included) and of the tools it has waited for (ffmpeg)."""
    own, tools = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    settings = load_settings(args.profile)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        raw = scratch / "raw"
        for index in range(args.clips + 1):  # variant 0: the warm-up clip
            make_talking_video(raw / f"clip{index}.mp4", seconds=args.seconds, width=args.width,
                               height=args.height, fps=30.0, variant=index)
        warm_up, *candidates = sorted(folder_candidates(raw), key=lambda candidate: candidate.source)
        workspace = Workspace(scratch / "out")
        job = start_job(warm_up, workspace)
        for stage in STAGES:
            job = run_stage(stage, job, settings, workspace)
        run_select(job, settings, workspace)

        # Baseline and pipeline alternate clip by clip so that load from other processes hits both alike.
        stage_seconds = {"probe": 0.0, "locate": 0.0, "standardise": 0.0, "faces": 0.0, "filters+cut": 0.0}
        stage_cpu = dict.fromkeys(stage_seconds, 0.0)
        clip_seconds, pipeline_wall, baseline_wall, pipeline_cpu, baseline_cpu = 0.0, 0.0, 0.0, 0.0, 0.0
        for candidate in candidates:
            started, cpu_started = time.perf_counter(), cpu_seconds()
            job = start_job(candidate, workspace)
            for name in STAGES:
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                job = run_stage(name, job, settings, workspace)
                stage_seconds[name] += time.perf_counter() - t0
                stage_cpu[name] += cpu_seconds() - cpu0
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            run_select(job, settings, workspace)
            stage_seconds["filters+cut"] += time.perf_counter() - t0
            stage_cpu["filters+cut"] += cpu_seconds() - cpu0
            pipeline_wall += time.perf_counter() - started
            pipeline_cpu += cpu_seconds() - cpu_started
            assert job.rejection is None, job.rejection
            assert not any(timing.cached for timing in job.timings), "inputs must differ: a cache hit is not work"
            clip_seconds += job.standardised.duration_s

            box = job.crop_box
            started, cpu_started = time.perf_counter(), cpu_seconds()
            run_ffmpeg(["-ss", "0", "-t", f"{job.duration_s:.3f}", "-i", job.candidate.source, "-map", "0:v:0",
                        "-vf", f"fps=25,crop={int(box.w)}:{int(box.h)}:{int(box.x)}:{int(box.y)},"
                               f"scale=512:512:flags=lanczos,format=yuv420p",
                        "-c:v", "libx264", "-preset", settings.standardise.preset,
                        "-crf", str(settings.standardise.crf), "-an", str(scratch / "baseline.mp4")])
            baseline_wall += time.perf_counter() - started
            baseline_cpu += cpu_seconds() - cpu_started

    pipeline_rate, baseline_rate = clip_seconds / pipeline_wall, clip_seconds / baseline_wall
    print(f"inputs: {args.clips} x {args.seconds:.0f} s at {args.width}x{args.height} 30 fps "
          f"(profile {args.profile}, x264 preset {settings.standardise.preset}, one worker, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print(f"bare ffmpeg decode+crop+scale+encode: {baseline_rate:7.2f} clip-s per wall-s, "
          f"{baseline_cpu / clip_seconds:.3f} CPU-s per clip-s")
    print(f"pipeline video stages:                {pipeline_rate:7.2f} clip-s per wall-s, "
          f"{pipeline_cpu / clip_seconds:.3f} CPU-s per clip-s")
    print(f"ratio to bare ffmpeg: {pipeline_rate / baseline_rate:.2f} (wall clock), "
          f"{baseline_cpu / pipeline_cpu:.2f} (CPU time)")
    for name, seconds in stage_seconds.items():
        print(f"  {name:12s} {seconds:7.2f} s  ({clip_seconds / seconds:8.2f} clip-s per s), "
              f"{stage_cpu[name]:6.2f} CPU-s")


if __name__ == "__main__":
    main()
