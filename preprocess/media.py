"""Thin, safe wrappers around the ffmpeg command line (argument lists, never a shell string)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class FfmpegError(RuntimeError):
    """ffmpeg/ffprobe failed; the message carries the end of its stderr."""


_LOG_CONTEXT_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")


def clean_ffmpeg_log(text: str) -> str:
    """Drop the memory addresses ffmpeg prints in its log prefixes (``[mov,mp4 @ 0x55...]``): they differ
    from run to run, and rejection details must be reproducible for re-runs to give identical tables."""
    return _LOG_CONTEXT_ADDRESS.sub("", text)


def run_ffmpeg(args: Sequence[str]) -> None:
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *map(str, args)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise FfmpegError(f"ffmpeg exited {completed.returncode}: {clean_ffmpeg_log(completed.stderr).strip()[-800:]}")


def count_video_frames(path: Path) -> int:
    """Exact number of video frames (packets) in the first video stream, read from the container."""
    completed = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets",
         "-show_entries", "stream=nb_read_packets", "-of", "json", str(path)],
        capture_output=True, text=True,
    )
    if completed.returncode != 0:
        raise FfmpegError(f"ffprobe failed on {path}: {clean_ffmpeg_log(completed.stderr).strip()[-400:]}")
    return int(json.loads(completed.stdout)["streams"][0]["nb_read_packets"])


def iter_rgb_frames(
    path: Path,
    *,
    width: int,
    height: int,
    start_s: float = 0.0,
    duration_s: float | None = None,
    fps: float | None = None,
    pre_filters: Sequence[str] = (),
) -> Iterator[np.ndarray]:
    """Decode frames as (height, width, 3) uint8 RGB arrays, resampled to ``fps`` when given.

    ffmpeg applies rotation metadata before the filters, so frames come out as displayed.
    """
    filters = list(pre_filters)
    if fps is not None:
        filters.append(f"fps={fps}")
    filters.append(f"scale={width}:{height}:flags=area")
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error"]
    if start_s > 0:
        command += ["-ss", f"{start_s:.3f}"]
    if duration_s is not None:
        command += ["-t", f"{duration_s:.3f}"]
    command += ["-i", str(path), "-map", "0:V:0", "-vf", ",".join(filters),
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame_bytes = width * height * 3
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        while True:
            chunk = process.stdout.read(frame_bytes)
            if len(chunk) < frame_bytes:
                break
            yield np.frombuffer(chunk, np.uint8).reshape(height, width, 3)
    finally:
        process.stdout.close()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        returncode = process.wait()
        process.stderr.close()
    if returncode != 0:
        raise FfmpegError(f"decoding {path} failed: {clean_ffmpeg_log(stderr).strip()[-400:]}")
