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

Verified reads (``verify``): when a local shard ``shard-NNNNNN.tar`` is opened, its manifest
``shard-NNNNNN.json`` next to it is read first. With ``verify="sha256"`` (the default) the tar is hashed
before any of it is streamed (from the same open file, so what is hashed is what is read); a tar whose size or
hash is not the manifest's is skipped whole, with an error log line naming it and both hashes, and all its
manifest's samples are counted in ``skipped``. Whatever the hash, a shard that yields fewer samples than its
manifest lists (a broken tar header ends a tar early, silently) adds the shortfall to ``skipped``; with
``verify="count"`` only this count is checked (no hashing pass). Shards that have no manifest (remote and
``pipe:`` URLs, tars not written by ``shards.writer``) cannot be verified: they are read as they are, and the
log says so once per location. ``verify="off"`` reads everything unchecked. The hashing pass costs one extra
sequential read of each shard per visit, mostly from the page cache; see docs/benchmarks.md for the figures.

``index.json`` entries must be bare shard names (``shard-NNNNNN.tar``): anything else (``../x``, an absolute
path, a sub-directory) raises ``ValueError`` before any file is opened.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    ShardManifest,
    check_index_entry,
    field_name,
    file_sha256,
    shard_manifest_name,
    shard_tar_index,
)
from shards.tables import PUBLISHING_MARKER

__all__ = ["LOST", "VERIFY_MODES", "ClipDecodeError", "SkipCounter", "clip_dataset", "collate_clips", "decode_clip",
           "shard_urls", "verified_samples"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SHUFFLE = 100  # shards held in the shard-order shuffle buffer when shuffling is on

# What to check when a shard is opened (see the module docstring).
VERIFY_MODES = ("sha256", "count", "off")
# The key of a placeholder sample standing for a sample that a shard should have delivered and did not. It
# takes the lost sample's place in the stream, so that a consumer splitting the stream by sample position (the
# training loader) counts each loss once, in the split it belonged to. Its value says why it was lost.
LOST = "__lost__"


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
        self.add(1)
        log.warning("skipping: %s", error)
        return True  # the WebDataset handler protocol: True means "continue"

    def add(self, n: int) -> None:
        """Count ``n`` skipped samples without a log line (the caller logged the reason once for all)."""
        with self._count.get_lock():
            self._count.value += n

    @property
    def count(self) -> int:
        return self._count.value


def shard_urls(urls: str | Path | Sequence[str | Path]) -> str | list[str]:
    """Expand local shard directories into their tar files; pass every other URL spec through.

    A directory expands to the shards listed in its ``index.json`` (``expand_local_directory``: a folder that is
    not a whole published set is refused). Brace specs (``shard-{000000..000009}.tar``), ``pipe:`` commands
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


class UnpublishedShardsError(RuntimeError):
    """A local shard folder that is not a whole published set: its publish is running or was interrupted, it has
    no index, or its index disagrees with the files; the message names the fix."""


def expand_local_directory(url: str | Path) -> list[str] | None:
    """The shard files of a local directory, as its ``index.json`` lists them, or ``None`` if ``url`` is not one.

    Refused (``UnpublishedShardsError``): a folder whose out_dir is being published or whose publish was interrupted
    (``publishing.json`` beside it), a folder without ``index.json``, an index that lists a shard twice, and an index
    that disagrees with the shard files there (listed but missing, or there but not listed). A reader must never
    train on a part of a dataset without saying so."""
    if isinstance(url, str) and ("://" in url or url.startswith("pipe:")):
        return None
    directory = Path(url)
    if not directory.is_dir():
        return None
    marker = directory.parent / PUBLISHING_MARKER
    if marker.exists():
        raise UnpublishedShardsError(
            f"{directory.parent} is being published, or its publish was interrupted ({marker} exists): its shards "
            f"may be part of one run and part of another. Wait for the run to finish, or rerun the preprocess flow "
            f"on it to finish the publish; `synchrorama validate {directory.parent}` says which")
    index_path = directory / INDEX_NAME
    if not index_path.exists():
        raise UnpublishedShardsError(
            f"{directory} has no {INDEX_NAME}: it is not a finished shard set (a publish or a write was "
            f"interrupted). Rerun the preprocess flow on its out_dir to finish it, or name the shards explicitly "
            f"(a brace spec such as {directory}/shard-{{000000..000009}}.tar)")
    index = json.loads(index_path.read_text())
    # Checked before joining: a name like "../../etc/hostname" must never reach open().
    names = [check_index_entry(shard.get("tar") if isinstance(shard, dict) else shard, index_path)
             for shard in index["shards"]]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UnpublishedShardsError(f"{index_path} lists {', '.join(twice)} more than once: every sample would be "
                                     "read twice. Rewrite the index by rerunning the preprocess flow")
    on_disk = {path.name for path in directory.glob(SHARD_TAR_GLOB)}
    missing, unlisted = sorted(set(names) - on_disk), sorted(on_disk - set(names))
    if missing or unlisted:
        raise UnpublishedShardsError(
            f"{index_path} disagrees with the shard files: listed but missing {missing or 'none'}, there but not "
            f"listed {unlisted or 'none'}. Rerun the preprocess flow on its out_dir (or `synchrorama validate`)")
    if not names:
        raise FileNotFoundError(f"no shards in {directory}")
    return [str(directory / name) for name in names]


def is_local(url: str | Path) -> bool:
    """Whether ``url`` names a local file (no ``scheme://``, no ``pipe:``), the rule ``shard_urls`` uses."""
    return not (isinstance(url, str) and ("://" in url or url.startswith("pipe:")))


# Locations (directory or URL prefix) already reported as unverifiable, so the log says it once per process.
_said_unverifiable: set[str] = set()


def say_unverifiable(url: str, why: str) -> None:
    location = url.rsplit("/", 1)[0] if "/" in url else url
    if location not in _said_unverifiable:
        _said_unverifiable.add(location)
        log.warning("cannot verify the shards in %s: %s; reading them unverified (said once per location)",
                    location, why)


def shard_manifest(url: str) -> tuple[ShardManifest | None, str | None]:
    """The manifest of the local shard ``url``: (manifest, None); (None, why) when there is none to check
    against; raises ``ValueError`` when the manifest exists but cannot be read or describes another tar."""
    if not is_local(url):
        return None, "remote or pipe: URL (no manifest to check against)"
    path = Path(url)
    index = shard_tar_index(path.name)
    if index is None:
        return None, f"{path.name} is not named shard-NNNNNN.tar (not written by shards.writer)"
    manifest_path = path.with_name(shard_manifest_name(index))
    if not manifest_path.exists():
        return None, f"no manifest {manifest_path.name} next to {path.name}"
    try:
        manifest = ShardManifest.load(manifest_path)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{manifest_path}: unreadable manifest ({error})") from error
    if manifest.index != index or manifest.n_samples != len(manifest.clip_ids):
        raise ValueError(f"{manifest_path}: describes shard {manifest.index} with {manifest.n_samples} samples and "
                         f"{len(manifest.clip_ids)} clip ids, not {path.name}")
    return manifest, None


def lost_samples(url: str, clip_ids: Iterable[str], reason: str) -> Iterator[dict[str, Any]]:
    """Placeholders (``LOST``) for the samples of ``url`` that were not delivered."""
    for clip_id in clip_ids:
        yield {"__key__": clip_id, "__url__": url, LOST: reason}


def verified_samples(
    shards: Iterable[dict[str, Any]],
    *,
    select_files: Callable[[str], bool] | None = None,
    verify: str = "sha256",
) -> Iterator[dict[str, Any]]:
    """Raw samples (member name -> bytes) of each shard ``{"url": ...}``, checked against its manifest.

    A WebDataset pipeline stage in place of ``tarfile_samples``. Every sample a verified shard should have held
    and did not deliver comes out as a ``LOST`` placeholder (see the module docstring), so the consumer counts
    losses; the reason is logged here once per shard. For shards without a manifest, each tar error (today's
    WebDataset behaviour) gives one placeholder, since the number of samples lost is unknown.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES}")
    for shard in shards:
        yield from read_shard(str(shard["url"]), select_files=select_files, verify=verify)


def read_shard(url: str, *, select_files: Callable[[str], bool] | None, verify: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard (see ``verified_samples``)."""
    manifest = None
    if verify != "off":
        try:
            manifest, why = shard_manifest(url)
        except ValueError as error:
            log.error("%s: skipping the shard, its manifest cannot be trusted: %s", url, error)
            yield from lost_samples(url, [f"{Path(url).name}#unknown"], str(error))  # count unknown: one
            return
        if manifest is None:
            say_unverifiable(url, why)
    try:
        stream = open(url, "rb") if is_local(url) else wds.gopen(url)  # closed below
    except Exception as error:  # like WebDataset's opener: a shard that cannot be opened is skipped, not fatal
        log.error("%s: cannot open the shard (%s); skipping it", url, error)
        yield from lost_samples(url, manifest.clip_ids if manifest else [f"{Path(url).name}#unknown"], str(error))
        return
    try:
        if manifest is not None and verify == "sha256":
            problem = tar_mismatch(stream, manifest)
            if problem:
                log.error("%s: %s; skipping its %d samples. The shard was damaged after it was written: "
                          "`synchrorama validate` lists every damaged shard; rerun the preprocess flow to "
                          "rewrite it", url, problem, manifest.n_samples)
                yield from lost_samples(url, manifest.clip_ids, problem)
                return
            stream.seek(0)  # stream exactly the bytes just hashed, from the same open file
        errors: list[Exception] = []

        def on_error(error: Exception) -> bool:
            errors.append(error)
            log.warning("%s: tar error, the rest of this shard may be lost: %s", url, error)
            return True

        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=on_error,
                                                   select_files=select_files)
        delivered: list[str] = []
        for sample in wds.tariterators.group_by_keys(files, handler=on_error):
            delivered.append(sample["__key__"])
            yield sample
    finally:
        stream.close()
    if manifest is None:
        yield from lost_samples(url, [f"{Path(url).name}#error{i}" for i in range(len(errors))], "tar error")
    elif len(delivered) < manifest.n_samples:
        seen = set(delivered)
        missing = [clip_id for clip_id in manifest.clip_ids if clip_id not in seen]
        missing = (missing + [f"{Path(url).name}#{i}" for i in range(manifest.n_samples)])[
            : manifest.n_samples - len(delivered)]
        log.error("%s: delivered %d of the %d samples its manifest lists (lost: %s); counting %d as skipped. "
                  "Check it with `synchrorama validate`", url, len(delivered), manifest.n_samples,
                  ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""), len(missing))
        yield from lost_samples(url, missing, "not delivered")


def tar_mismatch(stream: Any, manifest: ShardManifest) -> str | None:
    """Why an open shard's bytes are not the ones its manifest describes, or ``None`` when they are."""
    size = os.fstat(stream.fileno()).st_size
    if size != manifest.n_bytes:
        return f"{size} bytes, its manifest {manifest.manifest_name} says {manifest.n_bytes}"
    actual = file_sha256(stream)
    if actual != manifest.sha256:
        return f"sha256 {actual}, its manifest {manifest.manifest_name} expects {manifest.sha256}"
    return None


def count_lost(samples: Iterable[dict[str, Any]], *, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    """Drop ``LOST`` placeholders, counting each in ``skipped`` (their shard's log line gave the reason)."""
    for sample in samples:
        if LOST in sample:
            skipped.add(1)
        else:
            yield sample


def clip_dataset(
    urls: str | Path | list[str],
    *,
    shuffle_buffer: int = 0,
    members: Sequence[str] | None = None,
    decode_video: bool = True,
    resampled: bool = False,
    verify: str = "sha256",
) -> wds.DataPipeline:
    """A WebDataset pipeline over clip shards, yielding decoded clips (see the module docstring).

    ``urls``: a local shard directory, a tar path, a WebDataset URL spec (braces, ``pipe:``), or a list of
    these. Shards are split across distributed ranks, then across DataLoader workers; a rank or worker
    with no shard yields nothing rather than failing, so check that there are at least as many shards as
    ranks x workers. ``shuffle_buffer > 0`` shuffles the shard order and then samples within a buffer of
    that many clips. ``resampled=True`` draws shards with replacement, forever (for step-based training).
    ``members`` picks what to read (default: ``REQUIRED_MEMBERS``); other tar members are not read from
    the stream into samples nor decoded. The ``json`` member is always read. ``verify``: what to check
    against each local shard's manifest when it is opened, ``"sha256"``, ``"count"`` or ``"off"`` (see the
    module docstring).

    The returned pipeline has a ``skipped`` attribute, a ``SkipCounter`` of samples that failed to decode
    or that their shard did not deliver (failed verification, came up short).
    """
    wanted = tuple(dict.fromkeys([*(REQUIRED_MEMBERS if members is None else members), META_MEMBER]))
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES}")
    skipped = SkipCounter()
    expanded = shard_urls(urls)
    # WebDataset's own stages, but with verified_samples in place of its opener + tar expander + grouper.
    # No empty check: more workers than shards is legitimate (some workers get nothing).
    stages: list[Any] = [
        wds.ResampledShards(expanded) if resampled else wds.SimpleShardList(expanded),
        wds.split_by_node,
        wds.split_by_worker,
    ]
    if not resampled and shuffle_buffer > 0:
        stages.append(wds.shuffle(DEFAULT_SHARD_SHUFFLE))
    stages += [
        functools.partial(verified_samples, select_files=functools.partial(is_wanted_file, wanted=frozenset(wanted)),
                          verify=verify),
        functools.partial(count_lost, skipped=skipped),
    ]
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer))
    stages.append(wds.map(functools.partial(decode_clip, members=wanted, decode_video=decode_video), handler=skipped))
    dataset = wds.DataPipeline(*stages)
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
