"""Shard format: write, resume, validate and read back tiny synthetic clips (real H.264 mp4s)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from shards.reader import UnpublishedShardsError, clip_dataset, collate_clips, shard_urls
from shards.schema import (
    AUDIO_SAMPLES_PER_FRAME,
    FRAME_SIZE,
    INDEX_NAME,
    N_LANDMARKS,
    SAMPLE_RATE,
    SCHEMA_VERSION,
    ShardSample,
    clip_metadata,
    encode_json,
    shard_manifest_name,
    shard_tar_name,
    temp_name,
)
from shards.validate import validate_shards
from shards.writer import write_shards

CLIP_FRAMES = {"clip_a": 8, "clip_b": 10, "clip_c": 12}  # different T, as real clips have

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")


@pytest.fixture(scope="session")
def mp4_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny 512x512 25 fps H.264 mp4 without audio per clip, made once per session."""
    directory = tmp_path_factory.mktemp("mp4")
    files = {}
    for clip_id, n_frames in CLIP_FRAMES.items():
        path = directory / f"{clip_id}.mp4"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi",
             "-i", f"testsrc=size={FRAME_SIZE}x{FRAME_SIZE}:rate=25", "-frames:v", str(n_frames),
             "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", str(path)],
            check=True,
        )  # fmt: skip
        files[clip_id] = path
    return files


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def wav_bytes(n_samples: int) -> bytes:
    buffer = io.BytesIO()
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n_samples) / SAMPLE_RATE)
    soundfile.write(buffer, tone, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_sample(
    clip_id: str, mp4: Path, n_frames: int, content_key: str = "v1", **extra_members
) -> ShardSample:
    rng = np.random.default_rng(len(clip_id) + n_frames)
    landmarks = rng.random((n_frames, N_LANDMARKS, 3)).astype(np.float16)
    landmarks[0] = np.nan  # no face in the first frame
    pose = rng.uniform(-30, 30, (n_frames, 3)).astype(np.float32)
    pose[0] = np.nan
    meta = clip_metadata(
        clip_id=clip_id, source=f"{clip_id}_source.mp4", dataset="synthetic", n_frames=n_frames
    )
    members = {
        "mp4": mp4,
        "wav": wav_bytes(n_frames * AUDIO_SAMPLES_PER_FRAME),
        "landmarks.npy": npy_bytes(landmarks),
        "pose.npy": npy_bytes(pose),
        "json": encode_json(meta),
        **extra_members,
    }
    return ShardSample(clip_id=clip_id, members=members, content_key=f"{clip_id}-{content_key}")


@pytest.fixture
def samples(mp4_files: dict[str, Path]) -> list[ShardSample]:
    return [make_sample(clip_id, mp4_files[clip_id], n) for clip_id, n in CLIP_FRAMES.items()]


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_write_splits_into_shards_with_manifests_and_index(samples, tmp_path):
    manifests = write_shards(samples, tmp_path, max_samples_per_shard=2)

    assert [m.clip_ids for m in manifests] == [("clip_a", "clip_b"), ("clip_c",)]
    assert not any(m.reused for m in manifests)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX_NAME,
        "shard-000000.json",
        "shard-000000.tar",
        "shard-000001.json",
        "shard-000001.tar",
    ]
    for manifest in manifests:
        assert (tmp_path / manifest.tar_name).stat().st_size == manifest.n_bytes
        assert json.loads((tmp_path / manifest.manifest_name).read_text()) == manifest.to_json()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["n_samples"] == 3 and index["schema_version"] == SCHEMA_VERSION
    assert [shard["tar"] for shard in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"]


def test_byte_limit_closes_shards(samples, tmp_path):
    one_sample = sum(
        len(v) if isinstance(v, bytes) else v.stat().st_size for v in samples[0].members.values()
    )
    manifests = write_shards(samples, tmp_path, max_bytes_per_shard=one_sample + 5 * 1024)
    assert [m.n_samples for m in manifests] == [1, 1, 1]


def test_same_samples_give_byte_identical_shards(samples, tmp_path):
    write_shards(samples, tmp_path / "a", max_samples_per_shard=2)
    write_shards(samples, tmp_path / "b", max_samples_per_shard=2)
    assert directory_bytes(tmp_path / "a") == directory_bytes(tmp_path / "b")


def test_second_write_reuses_unchanged_shards(samples, mp4_files, tmp_path):
    first = write_shards(samples, tmp_path, max_samples_per_shard=2)
    tar_times = [(tmp_path / m.tar_name).stat().st_mtime_ns for m in first]

    second = write_shards(samples, tmp_path, max_samples_per_shard=2)
    assert [m.reused for m in second] == [True, True]
    assert second == first
    assert [(tmp_path / m.tar_name).stat().st_mtime_ns for m in second] == tar_times

    changed = [*samples[:2], make_sample("clip_c", mp4_files["clip_c"], 12, content_key="v2")]
    third = write_shards(changed, tmp_path, max_samples_per_shard=2)
    assert [m.reused for m in third] == [True, False]
    assert third[1].content_key != first[1].content_key
    assert validate_shards(tmp_path) == []


def test_stale_shards_and_temp_files_are_removed(samples, tmp_path):
    write_shards(samples, tmp_path, max_samples_per_shard=1)
    assert (tmp_path / shard_tar_name(2)).exists()
    leftover = tmp_path / temp_name(shard_tar_name(0), pid=99999)
    leftover.write_bytes(b"half a shard")
    assert any("leftover temp file" in problem for problem in validate_shards(tmp_path))

    write_shards(samples, tmp_path, max_samples_per_shard=2)

    assert not leftover.exists()
    assert not (tmp_path / shard_tar_name(2)).exists()
    assert not (tmp_path / shard_manifest_name(2)).exists()
    assert validate_shards(tmp_path) == []


def test_clip_id_with_a_dot_is_refused(mp4_files, tmp_path):
    sample = make_sample("clip_a", mp4_files["clip_a"], 8)
    dotted = ShardSample(clip_id="clip.a", members=sample.members, content_key="x")
    with pytest.raises(ValueError, match=r"invalid clip_id 'clip\.a'"):
        write_shards([dotted], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_member_and_duplicate_clip_are_refused(samples, tmp_path):
    without_pose = ShardSample(
        "clip_a", {k: v for k, v in samples[0].members.items() if k != "pose.npy"}, "x"
    )
    with pytest.raises(ValueError, match="lacks required members"):
        write_shards([without_pose], tmp_path)
    with pytest.raises(ValueError, match="more than once"):
        write_shards([samples[0], samples[0]], tmp_path)


def test_validation_passes_then_catches_corruption_and_missing_manifest(samples, tmp_path):
    write_shards(samples, tmp_path, max_samples_per_shard=2)
    assert validate_shards(tmp_path) == []

    tar_path = tmp_path / shard_tar_name(0)
    data = bytearray(tar_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar_path.write_bytes(bytes(data))
    assert any("sha256 differs" in problem for problem in validate_shards(tmp_path))

    (tmp_path / shard_manifest_name(1)).unlink()
    assert "shard-000001.tar: no manifest" in validate_shards(tmp_path)


def test_validation_catches_inconsistent_lengths(samples, mp4_files, tmp_path):
    short_pose = make_sample("clip_a", mp4_files["clip_a"], 8)
    short_pose.members["pose.npy"] = npy_bytes(np.zeros((7, 3), np.float32))
    write_shards([short_pose], tmp_path)
    problems = validate_shards(tmp_path)
    assert len(problems) == 1 and "pose.npy: shape (7, 3), expected (8, 3)" in problems[0]


def test_dataloader_with_two_workers_yields_every_clip_once(samples, tmp_path):
    write_shards(samples, tmp_path, max_samples_per_shard=2)
    dataset = clip_dataset(tmp_path)
    # spawn, not fork: earlier tests in this pytest process ran Prefect, whose exit hooks fail in forked children
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")

    clips = {clip["clip_id"]: clip for clip in loader}

    assert sorted(clips) == sorted(CLIP_FRAMES)
    for clip_id, n_frames in CLIP_FRAMES.items():
        clip = clips[clip_id]
        assert (
            clip["video"].shape == (n_frames, 3, FRAME_SIZE, FRAME_SIZE)
            and clip["video"].dtype == torch.uint8
        )
        assert (
            clip["audio"].shape == (n_frames * AUDIO_SAMPLES_PER_FRAME,)
            and clip["audio"].dtype == torch.float32
        )
        assert (
            clip["landmarks"].shape == (n_frames, N_LANDMARKS, 3) and clip["landmarks"].dtype == torch.float32
        )
        assert clip["pose"].shape == (n_frames, 3) and clip["pose"].dtype == torch.float32
        assert torch.isnan(clip["landmarks"][0]).all() and not torch.isnan(clip["landmarks"][1:]).any()
        assert clip["meta"]["n_frames"] == n_frames and clip["meta"]["clip_id"] == clip_id
    assert dataset.skipped.count == 0


def test_reader_decodes_only_requested_members(samples, tmp_path):
    write_shards(samples, tmp_path, max_samples_per_shard=2)
    clips = list(clip_dataset(tmp_path, members=["pose.npy"], shuffle_buffer=4))
    assert sorted(clip["clip_id"] for clip in clips) == sorted(CLIP_FRAMES)
    assert all(set(clip) == {"__key__", "clip_id", "meta", "pose"} for clip in clips)

    undecoded = next(iter(clip_dataset(str(tmp_path / shard_tar_name(0)), decode_video=False)))
    assert isinstance(undecoded["video"], bytes)


def test_validation_checks_feature_members_against_the_frame_count(mp4_files, tmp_path):
    sample = make_sample("clip_a", mp4_files["clip_a"], 8, **{
        "aus.npy": npy_bytes(np.zeros((7, 8), np.float32)),  # one frame short
        "latents.npy": npy_bytes(np.zeros((8, 4, 64, 64), np.float32)),  # float32, not float16
        "clip_text.npy": npy_bytes(np.zeros((77, 768), np.float16)),  # fine
    })
    write_shards([sample], tmp_path)
    problems = validate_shards(tmp_path)
    assert len(problems) == 2
    assert "aus.npy: shape (7, 8)" in problems[0] and "latents.npy: dtype float32, expected float16" in problems[1]


def test_extra_members_are_written_and_read(mp4_files, tmp_path):
    features = np.ones((8, 13, 768), np.float16)
    sample = make_sample("clip_a", mp4_files["clip_a"], 8, **{"wav2vec.npy": npy_bytes(features)})
    write_shards([sample], tmp_path)
    assert validate_shards(tmp_path) == []
    (clip,) = clip_dataset(tmp_path, members=["wav2vec.npy", "wav"])
    assert clip["wav2vec"].shape == (8, 13, 768) and clip["wav2vec"].dtype == torch.float32
    assert set(clip) == {"__key__", "clip_id", "meta", "audio", "wav2vec"}


def test_corrupted_npy_is_skipped_and_counted(samples, mp4_files, tmp_path):
    broken = make_sample("clip_b", mp4_files["clip_b"], 10)
    broken.members["landmarks.npy"] = b"\x93NUMPY this is not an array"
    write_shards([samples[0], broken, samples[2]], tmp_path, max_samples_per_shard=2)
    dataset = clip_dataset(tmp_path)
    # spawn, not fork: earlier tests in this pytest process ran Prefect, whose exit hooks fail in forked children
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")

    clip_ids = sorted(clip["clip_id"] for clip in loader)

    assert clip_ids == ["clip_a", "clip_c"]
    assert dataset.skipped.count == 1  # counted in a worker process, seen here
    assert any("clip_b: landmarks.npy: does not decode" in problem for problem in validate_shards(tmp_path))


def test_collate_clips_pads_to_the_longest_clip(samples, tmp_path):
    write_shards(samples, tmp_path)
    loader = torch.utils.data.DataLoader(clip_dataset(tmp_path), batch_size=3, collate_fn=collate_clips)
    (batch,) = list(loader)
    assert batch["n_frames"].tolist() == [8, 10, 12]
    assert batch["video"].shape == (3, 12, 3, FRAME_SIZE, FRAME_SIZE)
    assert batch["audio"].shape == (3, 12 * AUDIO_SAMPLES_PER_FRAME)
    assert batch["landmarks"].shape == (3, 12, N_LANDMARKS, 3)
    assert (
        torch.isnan(batch["pose"][0, 8:]).all()
        and (batch["audio"][0, 8 * AUDIO_SAMPLES_PER_FRAME :] == 0).all()
    )


def test_shard_urls_expands_directories_and_passes_specs_through(samples, tmp_path):
    write_shards(samples, tmp_path, max_samples_per_shard=2)
    tars = [str(tmp_path / shard_tar_name(i)) for i in range(2)]
    assert shard_urls(tmp_path) == tars
    (tmp_path / INDEX_NAME).unlink()  # not a finished shard set: refused, never a glob of whatever is there
    with pytest.raises(UnpublishedShardsError, match="has no index.json"):
        shard_urls(str(tmp_path))
    spec = f"{tmp_path}/shard-{{000000..000001}}.tar"
    assert shard_urls(spec) == spec
    assert shard_urls([spec]) == tars
    assert len(list(clip_dataset(spec, decode_video=False))) == 3
