"""Write generated frames as an mp4 with the driving audio muxed in (ffmpeg, argument list, no shell)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile


def write_video(frames: np.ndarray, path: str | Path, fps: int, audio: np.ndarray, sample_rate: int) -> Path:
    """``frames (T, H, W, 3)`` uint8 RGB (H, W even), ``audio (S,)`` float mono -> H.264/AAC mp4 at ``fps``."""
    path = Path(path)
    _t, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "audio.wav"
        soundfile.write(wav, np.asarray(audio, dtype=np.float32), sample_rate)
        command = [
            "ffmpeg", "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
            "-i", str(wav),
            "-map", "0:v", "-map", "1:a",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
            str(path),
        ]
        subprocess.run(command, input=np.ascontiguousarray(frames, dtype=np.uint8).tobytes(), check=True,
                       capture_output=True)
    return path
