"""Verified reads (issue 12): shards are checked against their manifests by the writer (before reusing one),
the reader and the training loader (when they open one); losses are counted, never silent; a loader whose
epoch yields no window, or skips too much, stops with an error; index.json cannot point outside its directory.

Real shards (``shards.writer`` over PyAV-encoded H.264 clips), real tar damage (a flipped payload byte, a broken
member header), no mocks of the reader or the loader.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tarfile
from pathlib import Path

import pytest
from test_train_loader import _npy, _wav, write_training_shards

from shards.reader import clip_dataset, shard_urls
from shards.schema import INDEX_NAME, ShardSample, clip_metadata, encode_json, shard_tar_name
from shards.training_loader import TrainingDataError, TrainingWindows, WindowSpec
from shards.validate import validate_shards
from shards.writer import write_shards

FRAMES = 8  # short clips: enough for the 1-frame stage-1 window used below, quick to decode


def _stage1() -> WindowSpec:
    return WindowSpec("stage1", clip_frames=1, motion_frames=0, image_size=32)


def _stage2_audio() -> WindowSpec:
    return WindowSpec("a2m", clip_frames=1, motion_frames=2, image_size=32)  # reads mp4 and wav


def _member_offset(tar_path: Path, member: str) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(member)


def _flip(path: Path, offset: int) -> None:
    """Flip one byte in place: the file keeps its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_wav_payload(shard_dir: Path, clip_id: str) -> None:
    """Flip a byte of the PCM samples of ``clip_id``'s wav in shard 0: the tar still parses, the wav decodes."""
    tar_path = shard_dir / shard_tar_name(0)
    info = _member_offset(tar_path, f"{clip_id}.wav")
    _flip(tar_path, info.offset_data + 1000)


@pytest.fixture
def five_clips(tmp_path) -> Path:
    """clip0..clip4 in two shards: clip0-2 in shard 0, clip3-4 in shard 1."""
    return write_training_shards(tmp_path / "shards", n_clips=5, frames=FRAMES, clips_per_shard=3)


# --- the writer -----------------------------------------------------------------------------------------------


def test_a_corrupted_shard_of_the_same_size_is_rewritten_not_reused(five_clips, caplog):
    tar_path = five_clips / shard_tar_name(0)
    good = tar_path.read_bytes()
    _flip_wav_payload(five_clips, "clip1")
    assert tar_path.stat().st_size == len(good)

    with caplog.at_level(logging.WARNING, logger="shards.writer"):
        write_training_shards(five_clips, n_clips=5, frames=FRAMES, clips_per_shard=3)

    assert tar_path.read_bytes() == good  # rewritten from the samples, not kept
    assert validate_shards(five_clips) == []
    assert "shard-000000.tar: sha256" in caplog.text and "rewriting" in caplog.text
    index = json.loads((five_clips / INDEX_NAME).read_text())
    manifest = json.loads((five_clips / "shard-000000.json").read_text())
    assert index["shards"][0]["sha256"] == manifest["sha256"]


# --- flipped bytes: the reader and the loader -----------------------------------------------------------------


def test_flipped_bytes_are_reported_and_not_delivered_by_the_reader(five_clips, caplog):
    _flip_wav_payload(five_clips, "clip1")

    dataset = clip_dataset(five_clips, decode_video=False)
    with caplog.at_level(logging.ERROR, logger="shards.reader"):
        clip_ids = sorted(clip["clip_id"] for clip in dataset)

    assert clip_ids == ["clip3", "clip4"]  # nothing of shard 0 is delivered
    assert dataset.skipped.count == 3  # its manifest's three samples
    assert "shard-000000.tar" in caplog.text and "sha256" in caplog.text
    expected = json.loads((five_clips / "shard-000000.json").read_text())["sha256"]
    assert expected in caplog.text  # the expected hash, next to the actual one

    unchecked = clip_dataset(five_clips, decode_video=False, verify="off")  # the knob: what was read before
    assert sorted(clip["clip_id"] for clip in unchecked) == ["clip0", "clip1", "clip2", "clip3", "clip4"]


def test_flipped_bytes_are_reported_and_not_delivered_by_the_loader(five_clips, caplog):
    _flip_wav_payload(five_clips, "clip1")
    dataset = TrainingWindows(five_clips, _stage2_audio(), batch_size=1, shuffle_buffer=0, max_skip_fraction=0.7)

    keys = [s["__key__"] for s in dataset.raw_samples(0, 1, epochs=1) if "__lost__" not in s]
    assert sorted(keys) == ["clip3", "clip4"]

    with caplog.at_level(logging.ERROR, logger="shards.reader"):
        batches = list(itertools.islice(iter(dataset), 3))  # the 3rd batch comes from the 2nd epoch
    assert len(batches) == 3
    assert dataset.skipped.count == 3
    assert "shard-000000.tar" in caplog.text and "sha256" in caplog.text


def test_a_loss_is_counted_once_when_the_loader_splits_by_sample(five_clips):
    # 2 shards for 4 splits: every split reads every shard and keeps every 4th sample; a lost sample keeps its
    # place, so it is counted by exactly the split it belonged to.
    _flip_wav_payload(five_clips, "clip1")
    dataset = TrainingWindows(five_clips, _stage1(), batch_size=1, shuffle_buffer=0)
    splits = [list(dataset.raw_samples(split, 4, epochs=1)) for split in range(4)]
    assert sorted(s["__key__"] for split in splits for s in split if "__lost__" in s) == ["clip0", "clip1", "clip2"]
    assert sorted(s["__key__"] for split in splits for s in split if "__lost__" not in s) == ["clip3", "clip4"]


def test_a_shard_without_a_manifest_is_read_unverified_and_said_once(five_clips, tmp_path, caplog):
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("a.tar", "b.tar"):  # not shard-NNNNNN names: nothing to check them against
        (loose / name).write_bytes((five_clips / shard_tar_name(1)).read_bytes())
    with caplog.at_level(logging.WARNING, logger="shards.reader"):
        clips = list(clip_dataset([str(loose / "a.tar"), str(loose / "b.tar")], decode_video=False))
    assert len(clips) == 4
    assert caplog.text.count("cannot verify the shards in") == 1 and str(loose) in caplog.text


# --- a broken tar header ----------------------------------------------------------------------------------------


@pytest.fixture
def broken_header(tmp_path) -> Path:
    """Five clips in one shard; the header of clip2's first member is damaged, so tar stops reading there."""
    directory = write_training_shards(tmp_path / "shards", n_clips=5, frames=FRAMES, clips_per_shard=5)
    tar_path = directory / shard_tar_name(0)
    info = _member_offset(tar_path, "clip2.json")  # members are sorted: json comes first
    _flip(tar_path, info.offset + 10)  # inside the member's name: its header checksum no longer holds
    return directory


def test_a_broken_tar_header_counts_the_lost_clips_as_skipped(broken_header):
    # Count-only verification: the clips before the damage are delivered, the three after it are counted.
    counted = clip_dataset(broken_header, decode_video=False, verify="count")
    assert sorted(clip["clip_id"] for clip in counted) == ["clip0", "clip1"]
    assert counted.skipped.count == 3

    # Full verification (the default): the shard's bytes are not its manifest's, so none of it is trusted.
    hashed = clip_dataset(broken_header, decode_video=False)
    assert list(hashed) == [] and hashed.skipped.count == 5

    loader = TrainingWindows(broken_header, _stage1(), batch_size=1, shuffle_buffer=0, verify="count",
                             max_skip_fraction=0.7)
    batches = list(itertools.islice(iter(loader), 3))  # 2 windows per epoch: the 3rd is from epoch 2
    assert len(batches) == 3 and loader.skipped.count == 3


# --- the loader stops instead of looping or training on too little ---------------------------------------------


def _junk_shards(directory: Path, n_clips: int = 3) -> Path:
    samples = []
    for i in range(n_clips):
        members = {"mp4": b"not an mp4", "wav": _wav(FRAMES, 200), "landmarks.npy": _npy(_zeros((FRAMES, 478, 3))),
                   "pose.npy": _npy(_zeros((FRAMES, 3))),
                   "json": encode_json(clip_metadata(clip_id=f"junk{i}", source="j.mp4", dataset="test",
                                                     n_frames=FRAMES))}
        samples.append(ShardSample(f"junk{i}", members, content_key=str(i)))
    write_shards(samples, directory, max_samples_per_shard=2)
    return directory


def _zeros(shape):
    import numpy as np

    return np.zeros(shape, np.float32)


@pytest.mark.timeout(120)  # before the fix this loops forever: the timeout turns a hang into a failure
def test_the_loader_raises_when_no_sample_decodes(tmp_path):
    shards = _junk_shards(tmp_path / "junk")
    dataset = TrainingWindows(shards, _stage1(), batch_size=1, shuffle_buffer=0)
    with pytest.raises(TrainingDataError) as caught:
        next(iter(dataset))
    message = str(caught.value)
    assert "no window" in message and "3 of 3 samples skipped" in message
    assert "shard-000000.tar" in message and "shard-000001.tar" in message
    assert "max_skip_fraction=0.1" in message


@pytest.mark.timeout(120)
def test_the_loader_raises_when_the_skipped_share_exceeds_the_threshold(tmp_path):
    shards = write_training_shards(tmp_path / "shards", n_clips=4, frames=FRAMES, clips_per_shard=5, broken=True)
    strict = TrainingWindows(shards, _stage1(), batch_size=1, shuffle_buffer=0)  # 1 of 5 skipped: 20% > 10%
    with pytest.raises(TrainingDataError, match=r"1 of 5 samples skipped .*max_skip_fraction=0\.1"):
        list(itertools.islice(iter(strict), 10))
    lenient = TrainingWindows(shards, _stage1(), batch_size=1, shuffle_buffer=0, max_skip_fraction=0.25)
    assert len(list(itertools.islice(iter(lenient), 10))) == 10  # two epochs and more


# --- index.json stays inside its directory ----------------------------------------------------------------------

_opened: list[str] = []
_watching: list[str] = []


def _audit(event: str, args: tuple) -> None:
    # An audit hook cannot be removed: it stays cheap (a list check) when no test is watching.
    if _watching and event == "open" and isinstance(args[0], str | bytes | Path):
        path = os.fsdecode(args[0])
        if any(os.path.normpath(path) == watched for watched in _watching):
            _opened.append(path)


sys.addaudithook(_audit)


@pytest.mark.parametrize("entry", ["../../etc/hostname", "../outside.tar", "/etc/hostname", "sub/shard-000000.tar",
                                   "shard-000000.tar/..", "shard-1.tar"])
def test_an_index_entry_that_is_not_a_bare_shard_name_is_refused(five_clips, tmp_path, entry):
    outside = tmp_path / "outside.tar"  # a real tar outside the shard directory, to prove it is never read
    outside.write_bytes((five_clips / shard_tar_name(1)).read_bytes())
    index_path = five_clips / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["shards"][0]["tar"] = entry
    index_path.write_text(json.dumps(index))

    _opened.clear()
    _watching[:] = [os.path.normpath(five_clips / entry), str(outside)]  # where a reader would go
    try:
        with pytest.raises(ValueError, match="not a bare shard name") as caught:
            shard_urls(five_clips)
        with pytest.raises(ValueError, match="not a bare shard name"):
            list(clip_dataset(five_clips, decode_video=False))
        with pytest.raises(ValueError, match="not a bare shard name"):
            TrainingWindows(five_clips, _stage1(), batch_size=1)
    finally:
        _watching.clear()
    assert str(index_path) in str(caught.value) and repr(entry) in str(caught.value)
    assert _opened == []  # refused before anything was opened
