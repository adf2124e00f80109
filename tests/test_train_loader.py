"""The training loader on real shard files: windows of the right shapes, cached members used when present,
bad samples skipped and counted, ranks disjoint, and a resumed stream identical to an uninterrupted one."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from model.config import tiny_config
from shards.schema import (
    AUDIO_SAMPLES_PER_FRAME,
    FPS,
    FRAME_SIZE,
    SAMPLE_RATE,
    ShardSample,
    clip_metadata,
    encode_json,
)
from shards.training_loader import TrainingWindows, WindowSpec
from shards.writer import write_shards


def _mp4(frames: int, phase: float) -> bytes:
    """A 512x512, 25 fps H.264 clip of a moving bright disc (what the pipeline's standardise step writes)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "23"})
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
        for i in range(frames):
            cx = 256 + 120 * np.sin(phase + i / 6)
            disc = ((x - cx) ** 2 + (y - 256) ** 2 < 90**2)
            image = np.stack([disc * 220 + 20, np.full_like(x, 60 + 4 * i % 100), (1 - disc) * 160], -1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _wav(frames: int, hz: float) -> bytes:
    t = np.arange(frames * AUDIO_SAMPLES_PER_FRAME) / SAMPLE_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * hz * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2, SAMPLE_RATE,
                    subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_training_shards(directory: Path, n_clips: int = 4, frames: int = 30, clips_per_shard: int = 2,
                          cached_wav2vec: bool = False, broken: bool = False) -> Path:
    """Shards in the pipeline's format (mp4, wav, landmarks, pose, json), written with ``shards.writer``.

    ``cached_wav2vec`` adds ``wav2vec.npy`` at the tiny model's width; ``broken`` adds a clip whose mp4 is junk."""
    d = tiny_config().data
    samples = []
    for i in range(n_clips):
        members = {
            "mp4": _mp4(frames, phase=i), "wav": _wav(frames, 180 + 40 * i),
            "landmarks.npy": _npy(np.full((frames, 478, 3), 0.5, np.float16)),
            "pose.npy": _npy(np.zeros((frames, 3), np.float32)),
            "json": encode_json(clip_metadata(clip_id=f"clip{i}", source=f"clip{i}.mp4", dataset="test", n_frames=frames)),
        }
        if cached_wav2vec:  # and the emotion inputs, at the tiny model's sizes
            members["wav2vec.npy"] = _npy(np.full((frames, d.wav2vec_layers, d.wav2vec_dim), i, np.float16))
            buffer = io.BytesIO()
            windows = 2 + i  # VA windows depend on the clip's length
            np.savez(buffer, text_probs=np.full(d.text_emotion_classes, i, np.float32),
                     text_embedding=np.full(d.text_emotion_dim, i, np.float32),
                     speech_probs=np.full(d.speech_emotion_classes, i, np.float32),
                     speech_embedding=np.full(d.speech_emotion_dim, i, np.float32),
                     va_values=np.full((windows, d.va_values), i, np.float32),
                     va_embedding=np.full((windows, d.va_dim), i, np.float32), text_valid=np.uint8(1),
                     speech_valid=np.uint8(1), va_valid=np.uint8(1))
            members["emotion.npz"] = buffer.getvalue()
        samples.append(ShardSample(f"clip{i}", members, content_key=str(i)))
    if broken:
        members = dict(samples[0].members, mp4=b"not an mp4")
        members["json"] = encode_json(clip_metadata(clip_id="broken", source="b.mp4", dataset="test", n_frames=frames))
        samples.insert(1, ShardSample("broken", members, content_key="broken"))
    write_shards(samples, directory, max_samples_per_shard=clips_per_shard)
    return directory


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("shards"), n_clips=4, broken=True)


def _spec(stage="stage2", **kwargs):
    cfg = tiny_config()
    return WindowSpec(stage, cfg.clip_frames, cfg.motion_frames, cfg.data.image_size, **kwargs)


def test_windows_have_the_stage_shapes_and_bad_clips_are_skipped(shard_dir):
    # 1 junk clip of 5 (20%) is more than the default max_skip_fraction (10%): this test is about the skip itself
    dataset = TrainingWindows(shard_dir, _spec(), batch_size=2, seed=0, shuffle_buffer=4, max_skip_fraction=0.5)
    batches = list(itertools.islice(iter(dataset), 4))
    m, t = 2, 4
    batch = batches[0]
    assert batch["frames"].shape == (2, m + t, 3, 32, 32) and batch["frames"].dtype == torch.uint8
    assert batch["reference"].shape == (2, 3, 32, 32)
    assert batch["audio"].shape == (2, (m + t) * AUDIO_SAMPLES_PER_FRAME)
    assert "wav2vec" not in batch and "latents" not in batch
    assert dataset.skipped.count >= 1  # the junk mp4, every epoch it comes by
    a2m = next(iter(TrainingWindows(shard_dir, _spec("a2m"), batch_size=2)))
    assert a2m["frames"].shape[1] == m and "aus" not in a2m
    stage1 = next(iter(TrainingWindows(shard_dir, WindowSpec("stage1", 1, 0, 32), batch_size=2)))
    assert stage1["frames"].shape[1] == 1 and "audio" not in stage1


def test_cached_features_are_used_when_present(tmp_path):
    directory = write_training_shards(tmp_path, n_clips=2, frames=12, cached_wav2vec=True)
    batch = next(iter(TrainingWindows(directory, _spec(), batch_size=2, shuffle_buffer=0)))
    d = tiny_config().data
    assert batch["wav2vec"].shape == (2, 6, d.wav2vec_layers, d.wav2vec_dim)
    assert sorted(batch["wav2vec"][:, 0, 0, 0].tolist()) == [0.0, 1.0]
    assert batch["emotion.va_embedding"].shape == (2, 3, d.va_dim)  # clip0's 2 VA windows padded to clip1's 3
    plain = next(iter(TrainingWindows(directory, _spec(prefer_cached=False), batch_size=2, shuffle_buffer=0)))
    assert "wav2vec" not in plain

    from model.training.tiny_components import tiny_audio_encoder, tiny_vae
    from model.training.train import training_batch
    from model.training.train_config import TrainConfig

    cfg = tiny_config()
    torch.manual_seed(0)
    for raw, cached in ((batch, True), (plain, False)):
        ready = training_batch(dict(raw), TrainConfig(), cfg, tiny_vae(cfg).eval(), tiny_audio_encoder(cfg).eval(), "cpu")
        assert ready.latents.shape == (2, 4, 4, 16, 16) and ready.motion_latents.shape == (2, 2, 4, 16, 16)
        assert ready.audio_features.shape == (2, 6, d.wav2vec_layers, d.wav2vec_dim)
        assert torch.equal(ready.audio_features, batch["wav2vec"]) == cached
        assert ready.emotion.text_probs.shape == (2, 7) and ready.emotion.va_embedding.shape[-1] == d.va_dim
        assert ready.emotion.va_values.any()  # emotion inputs are inputs, not caches: read either way


def test_ranks_read_disjoint_clips_and_a_resumed_stream_continues_exactly(shard_dir):
    def dataset(rank=0, **kwargs):
        return TrainingWindows(shard_dir, _spec(), batch_size=1, seed=3, shuffle_buffer=3, rank=rank, world_size=2,
                               max_skip_fraction=0.5, **kwargs)  # the junk clip is a quarter of a split's epoch

    full = list(itertools.islice(iter(dataset()), 6))
    resumed = list(itertools.islice(iter(dataset(start_positions={0: int(full[2]["position"][1])})), 3))
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["audio"], b["audio"])
    for splits in (2, 4):  # by shard (3 shards, 2 splits) and by sample (4 splits)
        seen = [[s["__key__"] for s in dataset().raw_samples(split, splits, epochs=1)] for split in range(splits)]
        assert sorted(sum(seen, [])) == ["broken", "clip0", "clip1", "clip2", "clip3"]


def test_index_json_lists_the_shards(shard_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["n_samples"] == 5
