"""Read clip shards back as a WebDataset pipeline of decoded torch tensors.

Each sample comes out as a dict::

    clip_id    str
    video      uint8 (T, 3, 512, 512), RGB, 25 fps        (only with decode_video and "mp4" requested)
    audio      float32 (T * 640,) in [-1, 1], 16 kHz mono  ("wav")
    landmarks  float32 (T, 478, 3), NaN rows where no face ("landmarks.npy")
    pose       float32 (T, 3) yaw, pitch, roll in degrees  ("pose.npy")
    meta       dict, the json member (always read: it is tiny and carries n_frames)
    __key__    the clip id again (WebDataset's map stage always sets it)

plus any other requested member, named as ``shards.schema.field_name`` says (``.npy`` -> float tensor,
``.wav`` -> float32 tensor, anything else -> raw bytes). With ``decode_video=False`` and "mp4" requested,
``video`` holds the mp4 bytes, e.g. to decode on the GPU later.

Clips differ in length, so batch either with ``DataLoader(dataset, batch_size=None)`` (one clip at a time)
or with ``collate_clips``, which pads to the longest clip in the batch.

A sample that fails to decode is skipped, logged and counted in ``dataset.skipped`` (shared with
DataLoader workers), never fatal.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile
import torch
import webdataset as wds

from shards.schema import (
    AUDIO_MEMBER,
    INDEX_NAME,
    LANDMARK_DIMS,
    META_MEMBER,
    N_LANDMARKS,
    POSE_DIMS,
    REQUIRED_MEMBERS,
    SAMPLE_RATE,
    SHARD_TAR_GLOB,
    VIDEO_MEMBER,
    field_name,
)

__all__ = ["ClipDecodeError", "SkipCounter", "clip_dataset", "collate_clips", "decode_clip", "shard_urls"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SHUFFLE = 100  # shards held in the shard-order shuffle buffer when shuffling is on


class ClipDecodeError(ValueError):
    """A sample could not be decoded, or its members disagree with the schema."""


class SkipCounter:
    """A WebDataset exception handler that logs, counts and continues.

    The count lives in shared memory, so skips in DataLoader worker processes show up in the parent's
    ``count``. It counts errors: usually one per skipped sample; a truncated tar counts once and loses the
    rest of that shard.
    """

    def __init__(self) -> None:
        # A spawn-context lock can be pickled into spawn/forkserver workers as well as inherited by forked
        # ones; a default (fork) one fails with DataLoader(multiprocessing_context="spawn").
        self._count = multiprocessing.get_context("spawn").Value("q", 0)

    def __call__(self, error: Exception) -> bool:
        with self._count.get_lock():
            self._count.value += 1
        log.warning("skipping: %s", error)
        return True  # the WebDataset handler protocol: True means "continue"

    @property
    def count(self) -> int:
        return self._count.value


def shard_urls(urls: str | Path | Sequence[str | Path]) -> str | list[str]:
    """Expand local shard directories into their tar files; pass every other URL spec through.

    A directory expands to the shards listed in its ``index.json``, or, while it has none, to its
    ``shard-*.tar`` files in name order. Brace specs (``shard-{000000..000009}.tar``), ``pipe:`` commands
    and remote URLs are left for WebDataset to expand.
    """
    if isinstance(urls, (str, Path)):
        expanded = expand_local_directory(urls)
        return expanded if expanded is not None else str(urls)
    result: list[str] = []
    for url in urls:
        expanded = expand_local_directory(url)
        result.extend(expanded if expanded is not None else wds.shardlists.expand_urls(str(url)))
    return result


def expand_local_directory(url: str | Path) -> list[str] | None:
    """The shard files of a local directory, or ``None`` if ``url`` is not one."""
    if isinstance(url, str) and ("://" in url or url.startswith("pipe:")):
        return None
    directory = Path(url)
    if not directory.is_dir():
        return None
    index_path = directory / INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text())
        tars = [str(directory / shard["tar"]) for shard in index["shards"]]
    else:
        tars = [str(path) for path in sorted(directory.glob(SHARD_TAR_GLOB))]
    if not tars:
        raise FileNotFoundError(f"no shards in {directory}")
    return tars


def clip_dataset(
    urls: str | Path | list[str],
    *,
    shuffle_buffer: int = 0,
    members: Sequence[str] | None = None,
    decode_video: bool = True,
    resampled: bool = False,
) -> wds.WebDataset:
    """A WebDataset pipeline over clip shards, yielding decoded clips (see the module docstring).

    ``urls``: a local shard directory, a tar path, a WebDataset URL spec (braces, ``pipe:``), or a list of
    these. Shards are split across distributed ranks, then across DataLoader workers; a rank or worker
    with no shard yields nothing rather than failing, so check that there are at least as many shards as
    ranks x workers. ``shuffle_buffer > 0`` shuffles the shard order and then samples within a buffer of
    that many clips. ``resampled=True`` draws shards with replacement, forever (for step-based training).
    ``members`` picks what to read (default: ``REQUIRED_MEMBERS``); other tar members are not read from
    the stream into samples nor decoded. The ``json`` member is always read.

    The returned pipeline has a ``skipped`` attribute, a ``SkipCounter`` of samples that failed.
    """
    wanted = tuple(dict.fromkeys([*(REQUIRED_MEMBERS if members is None else members), META_MEMBER]))
    skipped = SkipCounter()
    dataset = wds.WebDataset(
        shard_urls(urls),
        handler=skipped,
        resampled=resampled,
        shardshuffle=False if resampled or shuffle_buffer <= 0 else DEFAULT_SHARD_SHUFFLE,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        select_files=functools.partial(is_wanted_file, wanted=frozenset(wanted)),
        # More workers than shards is legitimate (some workers get nothing); the default check would
        # raise in those workers.
        empty_check=False,
    )
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer)
    dataset = dataset.map(
        functools.partial(decode_clip, members=wanted, decode_video=decode_video), handler=skipped
    )
    dataset.skipped = skipped
    return dataset


def is_wanted_file(file_name: str, *, wanted: frozenset[str]) -> bool:
    """Whether the tar member ``<clip_id>.<member>`` is one of the ``wanted`` members."""
    _, _, member = os.path.basename(file_name).partition(".")
    return member.lower() in wanted


def decode_clip(sample: dict[str, Any], *, members: Sequence[str], decode_video: bool) -> dict[str, Any]:
    """Decode a raw WebDataset sample (member name -> bytes) into the clip dict of the module docstring.

    Raises ``ClipDecodeError`` naming the clip when a member is missing, undecodable, or disagrees with
    the clip's ``n_frames``.
    """
    clip_id = sample["__key__"]
    try:
        missing = [member for member in members if member not in sample]
        if missing:
            raise ClipDecodeError(f"missing members {missing}")
        meta = json.loads(sample[META_MEMBER])
        n_frames = int(meta["n_frames"])
        clip: dict[str, Any] = {"clip_id": clip_id, "meta": meta}
        for member in members:
            if member == META_MEMBER:
                continue
            data = sample[member]
            if member == VIDEO_MEMBER:
                clip[field_name(member)] = decode_video_bytes(data) if decode_video else data
            elif member == AUDIO_MEMBER or member.endswith(".wav"):
                clip[field_name(member)] = decode_wav(data)
            elif member.endswith(".npy"):
                clip[field_name(member)] = torch.from_numpy(load_npy(data).astype(np.float32))
            else:
                clip[field_name(member)] = data
        check_lengths(clip, n_frames)
    except Exception as error:
        raise ClipDecodeError(f"clip {clip_id!r} in {sample.get('__url__')}: {error}") from error
    return clip


def check_lengths(clip: dict[str, Any], n_frames: int) -> None:
    """Raise if a decoded member's length disagrees with ``n_frames`` (T)."""
    expected_shapes = {
        "landmarks": (n_frames, N_LANDMARKS, LANDMARK_DIMS),
        "pose": (n_frames, POSE_DIMS),
    }
    for name, shape in expected_shapes.items():
        if name in clip and tuple(clip[name].shape) != shape:
            raise ClipDecodeError(f"{name} has shape {tuple(clip[name].shape)}, expected {shape}")
    video = clip.get("video")
    if isinstance(video, torch.Tensor) and video.shape[0] != n_frames:
        raise ClipDecodeError(f"video has {video.shape[0]} frames, json says n_frames={n_frames}")


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_wav(data: bytes) -> torch.Tensor:
    """Mono 16 kHz wav bytes -> float32 (N,) in [-1, 1]."""
    audio, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if sample_rate != SAMPLE_RATE or audio.shape[1] != 1:
        raise ClipDecodeError(
            f"wav is {sample_rate} Hz x {audio.shape[1]} channels, expected {SAMPLE_RATE} Hz mono"
        )
    return torch.from_numpy(np.ascontiguousarray(audio[:, 0]))


def decode_video_bytes(data: bytes) -> torch.Tensor:
    """mp4 bytes -> uint8 (T, 3, H, W) RGB frames, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads; a clip decodes several times faster
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ClipDecodeError("mp4 has no video frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def collate_clips(clips: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch clips of different lengths by padding along time to the longest clip.

    Adds ``n_frames`` (B,) int64 with each clip's real T. ``video`` and ``audio`` are zero-padded,
    ``landmarks`` and ``pose`` NaN-padded (the schema's "no face"); ``clip_id`` and ``meta`` become lists;
    other tensors are padded with zeros along their first axis and other values are listed.
    """
    batch: dict[str, Any] = {
        "clip_id": [clip["clip_id"] for clip in clips],
        "n_frames": torch.tensor([int(clip["meta"]["n_frames"]) for clip in clips], dtype=torch.int64),
    }
    for name in clips[0]:
        if name in ("clip_id", "__key__"):
            continue
        values = [clip[name] for clip in clips]
        if all(isinstance(value, torch.Tensor) for value in values):
            padding = float("nan") if name in ("landmarks", "pose") else 0.0
            batch[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=padding)
        else:
            batch[name] = values
    return batch
