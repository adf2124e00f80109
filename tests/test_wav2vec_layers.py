"""Which wav2vec 2.0 hidden states the wav2vec stage stores (``audio.wav2vec.layers``): the stored array and the
clip json follow the setting, the stage's cache key changes with it, and the training loader refuses shards whose
stored layers are not the ones the model reads. Tiny random models (3 hidden states of 32), generated audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
from test_audio_stages import _chord, _piece
from test_train_loader import _mp4, _npy, _wav, write_training_shards

from model.config import tiny_config
from preprocess.audio.wav2vec_features import wav2vec_frames
from preprocess.pipeline import Workspace, load_model, run_audio_stages
from preprocess.run.outputs import audio_metadata
from preprocess.run.settings import Wav2VecSettings, load_settings
from shards.schema import ShardSample, clip_metadata, encode_json
from shards.training_loader import TrainingWindows, Wav2VecLayersMismatch, WindowSpec
from shards.writer import write_shards

N_FRAMES = 50  # 2 s at 25 fps
TINY_HIDDEN_STATES = 3  # the tiny wav2vec 2.0: projected CNN features + 2 transformer layers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same piece through every audio stage, storing all hidden states, then only the last one (the other
    stages' outputs come from the cache the second time)."""
    root = tmp_path_factory.mktemp("wav2vec-layers")
    piece = _piece(root / "pieces", "chord", _chord(N_FRAMES * 640, 0.3))
    workspace = Workspace(root / "out")
    settings = {"all": load_settings("tiny"),
                "last": load_settings("tiny", overrides={"audio": {"wav2vec": {"layers": [2]}}})}
    return {name: (run_audio_stages(piece, chosen, workspace), chosen) for name, chosen in settings.items()}


def _stored(outcome) -> np.ndarray:
    entry = outcome.features["wav2vec"]
    return np.load(Path(entry["dir"]) / entry["file"])


def test_the_stored_array_and_the_clip_json_follow_the_setting(runs):
    every, last = _stored(runs["all"][0]), _stored(runs["last"][0])
    assert every.shape == (N_FRAMES, TINY_HIDDEN_STATES, 32) and every.dtype == np.float16
    assert last.shape == (N_FRAMES, 1, 32)
    assert np.array_equal(last, every[:, [2]])  # the same numbers, fewer of them
    for name, layers in (("all", [0, 1, 2]), ("last", [2])):
        outcome, settings = runs[name]
        assert outcome.features["wav2vec"]["layers"] == layers
        entry = audio_metadata(outcome, settings)["audio"]["wav2vec"]
        assert entry["layers"] == layers and entry["shape"] == [N_FRAMES, len(layers), 32]


def test_the_stage_key_changes_with_the_layers_and_only_wav2vec_reruns(runs):
    every, last = runs["all"][0], runs["last"][0]
    assert every.features["wav2vec"]["key"] != last.features["wav2vec"]["key"]
    assert every.features["separate"]["key"] == last.features["separate"]["key"]
    cached = {timing.stage: timing.cached for timing in last.timings}
    assert cached["wav2vec"] is False and cached["separate"] is True
    explicit_all = load_settings("tiny", overrides={"audio": {"wav2vec": {"layers": [0, 1, 2]}}})
    assert explicit_all.audio.wav2vec.fingerprint() != load_settings("tiny").audio.wav2vec.fingerprint()


def test_layers_the_model_does_not_have_are_refused(runs, tmp_path):
    outcome, settings = runs["all"]
    vocals = Path(outcome.features["separate"]["dir"]) / outcome.features["separate"]["vocals"]
    with pytest.raises(ValueError, match=r"hidden states 0\.\.2"):
        wav2vec_frames(vocals, N_FRAMES, 25, load_model("wav2vec", settings.models.wav2vec), tmp_path, layers=(3,))
    for bad in ([], [2, 1], [1, 1], [-1]):
        with pytest.raises(pydantic.ValidationError, match="layers"):
            Wav2VecSettings(layers=bad)


def _shard_of(outcome, settings, directory: Path) -> Path:
    """A one-clip shard in the pipeline's format whose json and wav2vec.npy are the run's."""
    meta = clip_metadata(clip_id="chord", source="chord.mp4", dataset="test", n_frames=N_FRAMES,
                         **audio_metadata(outcome, settings))
    members = {"mp4": _mp4(N_FRAMES, phase=0), "wav": _wav(N_FRAMES, 200),
               "landmarks.npy": _npy(np.full((N_FRAMES, 478, 3), 0.5, np.float16)),
               "pose.npy": _npy(np.zeros((N_FRAMES, 3), np.float32)), "json": encode_json(meta),
               "wav2vec.npy": _npy(_stored(outcome))}
    write_shards([ShardSample("chord", members, content_key="chord")], directory, max_samples_per_shard=1)
    return directory


def test_the_loader_reads_matching_layers_and_refuses_others(runs, tmp_path):
    cfg = tiny_config()
    needs = cfg.data.wav2vec_hidden_states
    assert needs == tuple(range(TINY_HIDDEN_STATES))  # the tiny model reads every hidden state the tiny profile has
    spec = WindowSpec("a2m", cfg.clip_frames, cfg.motion_frames, cfg.data.image_size, wav2vec_layers=needs)
    matching = _shard_of(*runs["all"], tmp_path / "all")
    batch = next(iter(TrainingWindows(matching, spec, batch_size=1, shuffle_buffer=0)))
    assert batch["wav2vec"].shape == (1, cfg.motion_frames, TINY_HIDDEN_STATES, 32)

    other = _shard_of(*runs["last"], tmp_path / "last")
    with pytest.raises(Wav2VecLayersMismatch, match=r"hold hidden states \[2\].*the model reads \[0, 1, 2\]"):
        next(iter(TrainingWindows(other, spec, batch_size=1, shuffle_buffer=0)))
    # without the check (prefer_cached=False) the features are not read at all: the loop runs the audio encoder
    unchecked = WindowSpec("a2m", cfg.clip_frames, cfg.motion_frames, cfg.data.image_size, prefer_cached=False,
                           wav2vec_layers=needs)
    assert "wav2vec" not in next(iter(TrainingWindows(other, unchecked, batch_size=1, shuffle_buffer=0)))


def test_shards_without_a_layers_entry_count_as_every_layer(tmp_path):
    """Shards written before the json said which layers were stored held all of them, in order."""
    cfg = tiny_config()
    shards = write_training_shards(tmp_path / "old", n_clips=2, frames=30, cached_wav2vec=True)
    spec = WindowSpec("a2m", cfg.clip_frames, cfg.motion_frames, cfg.data.image_size,
                      wav2vec_layers=cfg.data.wav2vec_hidden_states)
    batch = next(iter(TrainingWindows(shards, spec, batch_size=2, shuffle_buffer=0)))
    assert batch["wav2vec"].shape[-2:] == (cfg.data.wav2vec_layers, cfg.data.wav2vec_dim)
    narrower = WindowSpec("a2m", cfg.clip_frames, cfg.motion_frames, cfg.data.image_size, wav2vec_layers=(0, 1))
    with pytest.raises(Wav2VecLayersMismatch):
        next(iter(TrainingWindows(shards, narrower, batch_size=2, shuffle_buffer=0)))
