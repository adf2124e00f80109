"""Stage: arousal, dominance and valence over overlapping windows of the vocals track (E_va of eq. 1).

Model: audEERING's ``wav2vec2-large-robust-12-ft-emotion-msp-dim`` (``preprocess.audio.va_model.EmotionModel``).
Windows: ``window_s`` long (default 2.0 s), hop ``window_s / 2`` (50% overlap), starting at 0: window k covers
``[k * hop, k * hop + window_s)``, the last one ends at the clip's end (it is shorter when the clip is not a
whole number of hops; it is fed its real audio, not padding, since the model mean-pools over time). So the
windows cover the clip and every instant but the first and last half-window lies in exactly two windows; this
is the layout ``model.emotion_embedding.align_windows_to_frames`` expects. Each window is normalised by the
checkpoint's feature extractor on its own. Full-length windows run in batches of exactly ``batch_size`` windows,
across the clips of a partition (``valence_arousal_tracks``); a shorter last window runs on its own. A window's
numbers do not depend on its batch-mates (``preprocess.run.batching``).

Values are the model's outputs (roughly 0-1; 0.5 is neutral). Embedding: the mean-pooled last hidden state
the regression head reads (1024 floats for the real model). Without speech every window is a row with
``status = "no_speech"`` and no values.

Writes ``emotion_va.npy``: float32 ``(K, 3 + D)``: valence, arousal, dominance (the order of
``model.emotion_embedding.EmotionFeatures.va_values``), then the embedding; zeros when not valid.
``write_outputs`` splits it into ``va_values`` and ``va_embedding``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio import separate as separation
from preprocess.audio.audio_io import read_mono
from preprocess.audio.va_model import OUTPUTS, EmotionModel
from preprocess.run.batching import run_fixed_shape_batches
from preprocess.run.model_loading import (
    LoadedModel,
    from_pretrained,
    load_model,
    model_identity,
    prepare_module,
)
from preprocess.run.settings import ModelChoice, ValenceArousalSettings
from preprocess.run.stage import Stage

VA_FILE = "emotion_va.npy"
VA_FILE_COLUMNS = ("valence", "arousal", "dominance")


@dataclass(frozen=True)
class VAWindow:
    start_s: float
    end_s: float
    arousal: float | None
    dominance: float | None
    valence: float | None


@dataclass(frozen=True)
class VATrack:
    status: str  # ok / no_speech
    window_s: float
    hop_s: float
    windows: tuple[VAWindow, ...]
    embedding_dim: int
    file: str
    model: str


def window_bounds(n_samples: int, window: int, hop: int) -> list[tuple[int, int]]:
    """Sample ranges of the windows (see the module docstring): regular starts, the last clipped to the end."""
    if n_samples <= window:
        return [(0, n_samples)]
    count = math.ceil((n_samples - window) / hop) + 1
    return [(k * hop, min(k * hop + window, n_samples)) for k in range(count)]


def valence_arousal_windows(vocals_path: Path, has_speech: bool, loaded: LoadedModel,
                            settings: ValenceArousalSettings, batch_size: int, out_dir: Path) -> VATrack:
    return valence_arousal_tracks([(vocals_path, has_speech)], loaded, settings, batch_size, [out_dir])[0]


def valence_arousal_tracks(clips: Sequence[tuple[Path, bool]], loaded: LoadedModel, settings: ValenceArousalSettings,
                           batch_size: int, out_dirs: Sequence[Path]) -> list[VATrack]:
    """``valence_arousal_windows`` of each (vocals path, has speech) clip, its file written to its out_dir.

    The full-length windows of all the clips run together, in batches of exactly ``batch_size`` windows (a short
    batch filled with copies, ``preprocess.run.batching``); a shorter last window runs on its own (a batch of one),
    since its length is rarely shared. So each window's numbers are those it gets when its clip runs alone."""
    sample_rates, all_bounds, windows = [], [], []  # windows: (clip index, window index, samples)
    for clip_index, (vocals_path, has_speech) in enumerate(clips):
        audio, sample_rate = read_mono(vocals_path)
        window = int(round(settings.window_s * sample_rate))
        bounds = window_bounds(len(audio), window, window // 2)
        sample_rates.append(sample_rate)
        all_bounds.append(bounds)
        if has_speech:
            windows += [(clip_index, k, audio[start:end]) for k, (start, end) in enumerate(bounds)]

    def forward(rows: list[tuple[int, int, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        # one sample rate per batch: it is part of the shape key below
        inputs = loaded.processor([samples for _, _, samples in rows], sampling_rate=sample_rates[rows[0][0]],
                                  return_tensors="pt")
        with torch.inference_mode():
            pooled, outputs = loaded.model(inputs["input_values"].to(loaded.device, loaded.dtype))
        return list(zip(outputs.float().cpu().numpy(), pooled.float().cpu().numpy(), strict=True))

    # Same-length windows batch without padding (padding would change wav2vec2's normalised features).
    full = [w for w in windows if len(w[2]) == int(round(settings.window_s * sample_rates[w[0]]))]
    short = [w for w in windows if len(w[2]) != int(round(settings.window_s * sample_rates[w[0]]))]
    results = {}
    for group, size in ((full, batch_size), (short, 1)):
        shapes = [(len(samples), sample_rates[clip_index]) for clip_index, _, samples in group]
        for (clip_index, k, _), output in zip(group, run_fixed_shape_batches(group, shapes, size, forward),
                                              strict=True):
            results[clip_index, k] = output
    dim = loaded.model.config.hidden_size
    order = [OUTPUTS.index(name) for name in VA_FILE_COLUMNS]
    tracks = []
    for clip_index, ((_, has_speech), out_dir) in enumerate(zip(clips, out_dirs, strict=True)):
        bounds, sample_rate = all_bounds[clip_index], sample_rates[clip_index]
        values = np.zeros((len(bounds), 3), np.float32)  # arousal, dominance, valence (model order)
        embeddings = np.zeros((len(bounds), dim), np.float32)
        if has_speech:
            for k in range(len(bounds)):
                values[k], embeddings[k] = results[clip_index, k]
        np.save(out_dir / VA_FILE, np.concatenate([values[:, order], embeddings], axis=1))
        track_windows = tuple(
            VAWindow(round(start / sample_rate, 4), round(end / sample_rate, 4),
                     *((float(v) for v in values[k]) if has_speech else (None, None, None)))
            for k, (start, end) in enumerate(bounds)
        )
        tracks.append(VATrack("ok" if has_speech else "no_speech", settings.window_s,
                              (int(round(settings.window_s * sample_rate)) // 2) / sample_rate, track_windows, dim,
                              VA_FILE, loaded.reference))
    return tracks


# ---------------------------------------------------------------- the stage: on each kept piece's vocals, batched


def _valence_arousal_many(pieces: list, settings, workspace, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.valence_arousal
    clips = [(separation.vocals_path(piece), piece.features["separate"]["has_speech"]) for piece in pieces]
    return [asdict(track) for track in valence_arousal_tracks(clips, load_model("valence_arousal", choice, load_valence_arousal_model),
                                                              settings.audio.valence_arousal, choice.batch_size,
                                                              out_dirs)]


def load_valence_arousal_model(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoFeatureExtractor

    extractor = from_pretrained("valence_arousal", AutoFeatureExtractor, choice)
    model = from_pretrained("valence_arousal", EmotionModel, choice)
    return LoadedModel("valence_arousal", choice.model, prepare_module(model, device, dtype), device, dtype, extractor)


STAGE = Stage(
    name="valence_arousal", version=2, group="audio", models=("valence_arousal",), loader=load_valence_arousal_model, run_many=_valence_arousal_many,
    key_parts=lambda piece, settings, workspace: [
        piece.features.get("separate", {}).get("key"), settings.audio.valence_arousal.fingerprint(),
        model_identity(settings.models.valence_arousal)],
    run=lambda piece, settings, workspace, out_dir: _valence_arousal_many([piece], settings, workspace,
                                                                          [out_dir])[0])
