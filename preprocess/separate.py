"""Stage: music and noise removal with Demucs; the vocals stem becomes the speech track of every later audio stage.

Input: a kept piece's ``clip.wav`` (16 kHz mono, loudness-normalised). It is resampled to the model's rate
(44.1 kHz for the htdemucs family) and duplicated to its channels, normalised as ``demucs.separate`` does (zero
mean, unit std), and separated by ``demucs.apply.apply_model`` with ``split=True``: the audio is cut into the
model's training-length segments that overlap by ``overlap`` and are cross-faded with a triangular weight, so
long audio has no clicks at the seams. ``shifts=0`` (the random time-shift averaging would make outputs differ
from run to run). The vocals stem is averaged to mono, resampled back to 16 kHz and written as ``vocals.wav``,
exactly as many samples as ``clip.wav``, at the level Demucs gives it (not re-normalised: its level relative
to the mix says how much was music).

Digital silence (peak below ``silence_peak_dbfs``) is not separated (Demucs' normalisation would divide by a
zero std): the vocals are silence. An energy check on the vocals (fraction of 30 ms frames above -45 dBFS)
decides ``has_speech``; the text, speech-emotion and valence-arousal stages record flagged rows without numbers
for clips without speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio_io import active_fraction, dbfs, read_mono, write_pcm16
from preprocess.settings import SeparationSettings
from preprocess.stage_models import LoadedModel

VOCALS_FILE = "vocals.wav"


@dataclass(frozen=True)
class SeparatedAudio:
    vocals: str  # file name in the stage's output directory
    status: str  # "separated" or "silent_input"
    n_samples: int
    sample_rate: int  # Hz
    input_peak_dbfs: float | None
    vocals_rms_dbfs: float | None
    speech_fraction: float  # 0-1 of activity frames above the threshold, in the vocals
    has_speech: bool
    model: str


def separate_vocals(audio_path: Path, loaded: LoadedModel, settings: SeparationSettings,
                    out_dir: Path) -> SeparatedAudio:
    """Write ``out_dir/vocals.wav`` (same length and rate as ``audio_path``) and describe it."""
    from demucs.apply import apply_model
    from julius import resample_frac

    audio, sample_rate = read_mono(audio_path)
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak < 10 ** (settings.silence_peak_dbfs / 20):
        vocals, status = np.zeros_like(audio), "silent_input"
    else:
        model = loaded.model
        if settings.stem not in model.sources:
            raise ValueError(f"Demucs model {loaded.reference!r} has no {settings.stem!r} source: {model.sources}")
        mix = torch.from_numpy(audio)[None].repeat(model.audio_channels, 1)  # (channels, N)
        mix = resample_frac(mix, sample_rate, model.samplerate)
        mean, std = mix.mean(), mix.std()
        with loaded.lock, torch.inference_mode():
            sources = apply_model(model, ((mix - mean) / std)[None], shifts=0, split=True,
                                  overlap=settings.overlap, segment=settings.segment_s, device=loaded.device)[0]
        stem = sources[model.sources.index(settings.stem)].cpu() * std + mean  # (channels, N')
        stem = resample_frac(stem.mean(0), model.samplerate, sample_rate)
        vocals = np.zeros_like(audio)
        n = min(len(vocals), stem.shape[-1])
        vocals[:n] = stem[:n].numpy()
        status = "separated"
    write_pcm16(out_dir / VOCALS_FILE, vocals, sample_rate)
    vocals, _ = read_mono(out_dir / VOCALS_FILE)  # measure what later stages will read
    fraction = active_fraction(vocals, sample_rate, settings.activity_frame_ms, settings.activity_frame_dbfs)
    return SeparatedAudio(
        vocals=VOCALS_FILE, status=status, n_samples=len(vocals), sample_rate=sample_rate,
        input_peak_dbfs=dbfs(peak), vocals_rms_dbfs=dbfs(float(np.sqrt(np.mean(vocals.astype(np.float64) ** 2)))),
        speech_fraction=fraction, has_speech=fraction >= settings.min_speech_fraction, model=loaded.reference,
    )
