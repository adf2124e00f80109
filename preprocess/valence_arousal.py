"""Stage: arousal, dominance and valence over overlapping windows of the vocals track (E_va of eq. 1).

Model: audEERING's ``wav2vec2-large-robust-12-ft-emotion-msp-dim`` (``preprocess.va_model.EmotionModel``).
Windows: ``window_s`` long (default 2.0 s), hop ``window_s / 2`` (50% overlap), starting at 0: window k covers
``[k * hop, k * hop + window_s)``, the last one ends at the clip's end (it is shorter when the clip is not a
whole number of hops; it is fed its real audio, not padding, since the model mean-pools over time). So the
windows cover the clip and every instant but the first and last half-window lies in exactly two windows; this
is the layout ``model.emotion_embedding.align_windows_to_frames`` expects. Each window is normalised by the
checkpoint's feature extractor on its own; full-length windows of a clip run in batches of ``batch_size``.

Values are the model's outputs (roughly 0-1; 0.5 is neutral). Embedding: the mean-pooled last hidden state
the regression head reads (1024 floats for the real model). Without speech every window is a row with
``status = "no_speech"`` and no values.

Writes ``emotion_va.npy``: float32 ``(K, 3 + D)``: valence, arousal, dominance (the order of
``model.emotion_embedding.EmotionFeatures.va_values``), then the embedding; zeros when not valid.
``write_outputs`` splits it into ``va_values`` and ``va_embedding``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio_io import read_mono
from preprocess.settings import ValenceArousalSettings
from preprocess.stage_models import LoadedModel
from preprocess.va_model import OUTPUTS

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
    audio, sample_rate = read_mono(vocals_path)
    window = int(round(settings.window_s * sample_rate))
    hop = window // 2
    bounds = window_bounds(len(audio), window, hop)
    dim = loaded.model.config.hidden_size
    status = "ok" if has_speech else "no_speech"
    values = np.zeros((len(bounds), 3), np.float32)  # arousal, dominance, valence (model order)
    embeddings = np.zeros((len(bounds), dim), np.float32)
    if has_speech:
        # Same-length windows batch without padding (padding would change wav2vec2's group-normalised features).
        groups: dict[int, list[int]] = {}
        for index, (start, end) in enumerate(bounds):
            groups.setdefault(end - start, []).append(index)
        for indices in groups.values():
            for first in range(0, len(indices), batch_size):
                batch = indices[first:first + batch_size]
                chunks = [audio[bounds[i][0]:bounds[i][1]] for i in batch]
                inputs = loaded.processor(chunks, sampling_rate=sample_rate, return_tensors="pt")
                with torch.inference_mode():
                    pooled, outputs = loaded.model(inputs["input_values"].to(loaded.device, loaded.dtype))
                values[batch] = outputs.float().cpu().numpy()
                embeddings[batch] = pooled.float().cpu().numpy()
    order = [OUTPUTS.index(name) for name in VA_FILE_COLUMNS]
    np.save(out_dir / VA_FILE, np.concatenate([values[:, order], embeddings], axis=1))
    windows = tuple(
        VAWindow(round(start / sample_rate, 4), round(end / sample_rate, 4),
                 *((float(v) for v in values[k]) if has_speech else (None, None, None)))
        for k, (start, end) in enumerate(bounds)
    )
    return VATrack(status, settings.window_s, hop / sample_rate, windows, dim, VA_FILE, loaded.reference)
