"""Reading and writing the pipeline's 16 kHz mono wav files, and the energy measures the audio stages share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    """float32 (N,) in [-1, 1] and the sample rate (Hz)."""
    audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.mean(axis=1)), sample_rate


def write_pcm16(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float audio as 16-bit PCM, clipped to [-1, 1] (deterministic bytes for the same samples)."""
    soundfile.write(path, np.clip(audio, -1.0, 1.0).astype(np.float32), sample_rate, subtype="PCM_16")


def dbfs(value: float) -> float | None:
    """20 log10 of an amplitude (1.0 = 0 dBFS), rounded; None for digital silence."""
    return round(float(20 * np.log10(value)), 2) if value > 0 else None


def active_fraction(audio: np.ndarray, sample_rate: int, frame_ms: float, threshold_dbfs: float) -> float:
    """Fraction of non-overlapping ``frame_ms`` frames whose RMS is above ``threshold_dbfs``."""
    frame = max(1, int(round(sample_rate * frame_ms / 1000)))
    n_frames = len(audio) // frame
    if n_frames == 0:
        return 0.0
    frames = audio[:n_frames * frame].astype(np.float64).reshape(n_frames, frame)
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    return round(float(np.mean(rms > 10 ** (threshold_dbfs / 20))), 4)
