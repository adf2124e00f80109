"""Stage: wav2vec 2.0 features of the vocals track, one vector set per 25 fps video frame.

Model: ``Wav2Vec2Model`` (default ``facebook/wav2vec2-base-960h``), run once over the whole clip after the
checkpoint's feature extractor (normalisation), with ``output_hidden_states``: the feature projection output
plus every transformer layer, ``L + 1`` vectors of size H per 20 ms step (13 x 768 for the base model).

Alignment to video frames: the convolutional encoder has a stride of 320 samples (20 ms, 50 Hz) and a
receptive field of 400 samples, so feature i is centred at ``(320 i + 200) / 16000`` s and a clip of T frames
(T x 640 samples) gives 2T - 1 features. Video frame j is centred at ``(j + 0.5) / 25`` s, i.e. at feature
position ``2j + 0.375``; each frame's vectors are the linear interpolation of the two features around that
position (clamped at the ends). The result has exactly T rows.

Writes ``wav2vec.npy``: float16 ``(T, K, H)``, the K hidden states chosen by ``layers`` (audio.wav2vec.layers in
the settings; None: all ``L + 1``, what the SynchroRaMa model reads). Each stored layer is ``fps x H x 2`` bytes
per second (38.4 KB at 25 fps for wav2vec2-base; all 13: 499.2 KB), so storing fewer is the way to smaller shards
when the model that trains on them reads fewer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio.audio_io import read_mono
from preprocess.audio.separate import vocals_path
from preprocess.run.model_loading import LoadedModel, load_model, model_identity
from preprocess.run.stage import Stage

WAV2VEC_FILE = "wav2vec.npy"


@dataclass(frozen=True)
class Wav2VecFeatures:
    file: str
    n_frames: int
    n_layers: int  # stored hidden states: len(layers)
    hidden_size: int
    model: str
    layers: tuple[int, ...]  # which hidden states are stored (0: the projected CNN features, i: transformer layer i)


def chosen_layers(layers: tuple[int, ...] | None, available: int) -> tuple[int, ...]:
    """The hidden-state indices to store out of ``available`` (L + 1); None: all of them."""
    if layers is None:
        return tuple(range(available))
    if layers[-1] >= available:
        raise ValueError(f"wav2vec layers {list(layers)} asked for, the model has hidden states 0..{available - 1} "
                         "(audio.wav2vec.layers in the preprocessing settings)")
    return tuple(layers)


def encoder_geometry(config) -> tuple[int, int]:
    """(stride, receptive field) in samples of a wav2vec-style convolutional feature encoder."""
    stride, field = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride, strict=True):
        field += (kernel - 1) * stride
        stride *= step
    return stride, field


def features_to_frames(features: np.ndarray, n_frames: int, samples_per_frame: int, stride: int,
                       field: int) -> np.ndarray:
    """Resample ``(T_feat, ...)`` encoder features to ``(n_frames, ...)`` at the video frames' centres."""
    centres = (np.arange(n_frames) * samples_per_frame + samples_per_frame / 2 - field / 2) / stride
    position = np.clip(centres, 0, len(features) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(features) - 1)
    weight = (position - low).reshape(-1, *([1] * (features.ndim - 1)))
    return (1 - weight) * features[low] + weight * features[high]


def wav2vec_frames(vocals_path: Path, n_frames: int, fps: int, loaded: LoadedModel, out_dir: Path,
                   layers: tuple[int, ...] | None = None) -> Wav2VecFeatures:
    """``wav2vec.npy`` of the vocals: the hidden states ``layers`` (None: all), one set per video frame."""
    audio, sample_rate = read_mono(vocals_path)
    samples_per_frame = sample_rate // fps
    if len(audio) != n_frames * samples_per_frame:
        raise ValueError(f"{vocals_path} has {len(audio)} samples, expected {n_frames} x {samples_per_frame}")
    inputs = loaded.processor(audio, sampling_rate=sample_rate, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model(inputs["input_values"].to(loaded.device, loaded.dtype), output_hidden_states=True)
    # hidden_states: L + 1 tensors of (1, T_feat, H); the chosen ones stacked on a new third axis ->
    # (T_feat, K, H), so that the resampling below runs over time, not over layers
    kept = chosen_layers(layers, len(output.hidden_states))
    states = torch.stack([output.hidden_states[i] for i in kept], dim=2)[0].float().cpu().numpy()
    stride, field = encoder_geometry(loaded.model.config)
    frames = features_to_frames(states, n_frames, samples_per_frame, stride, field).astype(np.float16)
    np.save(out_dir / WAV2VEC_FILE, frames)
    return Wav2VecFeatures(WAV2VEC_FILE, n_frames, frames.shape[1], frames.shape[2], loaded.reference, kept)


# ---------------------------------------------------------------- the stage: on each kept piece's vocals


def _wav2vec_run(piece, settings, workspace, out_dir: Path) -> dict:
    n_frames = piece.frames[1] - piece.frames[0]
    return asdict(wav2vec_frames(vocals_path(piece), n_frames, settings.standardise.fps,
                                 load_model("wav2vec", settings.models.wav2vec), out_dir,
                                 layers=settings.audio.wav2vec.layers))


STAGE = Stage(
    name="wav2vec", version=2, group="audio", models=("wav2vec",), run=_wav2vec_run,
    # keyed on the layer choice: a run that stores other layers must not reuse this file
    key_parts=lambda piece, settings, workspace: [
        piece.features.get("separate", {}).get("key"), settings.standardise.fps,
        model_identity(settings.models.wav2vec), settings.audio.wav2vec.fingerprint()])
