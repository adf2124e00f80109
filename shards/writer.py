"""Write clips into WebDataset shards: deterministic, atomic and resumable.

- Deterministic: samples go into shards in the order given, greedily, so which clip lands in which shard
  depends only on the ordered samples (their member sizes) and the limits; tar headers carry fixed times,
  owners and modes, and each sample's members are written in sorted order, so the same samples give
  byte-identical tars.
- Atomic: every file is written under a hidden temp name in the same directory, fsynced and renamed into
  place, so no partial file ever has a final name. A shard's manifest is written after its tar and is the
  "shard is done" marker; ``index.json`` is written after every shard is done.
- Resumable: a shard whose manifest records the same content key, and whose tar has the recorded size and
  sha256, is kept as it is (reported with ``reused=True``). The tar is re-hashed before it is trusted: a shard
  corrupted in place (same size, other bytes) is rewritten, with a warning, never reused, so its stale hash never
  reaches ``index.json``. Re-hashing reads every finished shard once per run, at the disk's or sha256's speed
  (see docs/benchmarks.md), far less than re-encoding them.

One writer per shard directory at a time: a run removes the temp files that it finds there.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from shards.schema import (
    INDEX_NAME,
    META_MEMBER,
    REQUIRED_MEMBERS,
    SCHEMA_VERSION,
    SHARD_NAME_PATTERN,
    TAR_GROUP,
    TAR_MODE,
    TAR_MTIME,
    TAR_USER,
    TEMP_NAME_PATTERN,
    ShardManifest,
    ShardSample,
    check_clip_id,
    check_member_name,
    encode_json,
    file_sha256,
    index_json,
    missing_meta_keys,
    shard_content_key,
    shard_manifest_name,
    shard_tar_name,
    temp_name,
)

__all__ = ["ShardManifest", "ShardSample", "write_shards"]

log = logging.getLogger(__name__)

TAR_BLOCK = 512  # a tar header is one block; file data is padded to whole blocks


def write_shards(
    samples: Sequence[ShardSample],
    shard_dir: Path,
    *,
    max_samples_per_shard: int = 100,
    max_bytes_per_shard: int = 1 << 30,
) -> list[ShardManifest]:
    """Write ``samples`` (in the order given) as ``shard_dir/shard-NNNNNN.tar`` and return their manifests.

    A shard is closed when it holds ``max_samples_per_shard`` samples or when the next sample would take
    it past ``max_bytes_per_shard`` (counting tar headers and padding); a sample larger than the byte
    limit gets a shard of its own. Shards left by a previous run beyond the ones needed now, and leftover
    temp files, are removed.

    Raises ``ValueError`` before writing anything if a sample is invalid: a clip id that is not
    ``[A-Za-z0-9_-]+`` or is repeated, a bad member name, a missing required member, or a ``json`` member
    that does not hold the required metadata for that clip.
    """
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
    samples = list(samples)
    check_samples(samples)

    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(shard_dir)
    # Without index.json the directory reads as "being written" until this run has finished.
    (shard_dir / INDEX_NAME).unlink(missing_ok=True)

    manifests = []
    for index, shard_samples in enumerate(plan_shards(samples, max_samples_per_shard, max_bytes_per_shard)):
        content_key = shard_content_key(shard_samples)
        previous = reusable_manifest(shard_dir, index, content_key)
        if previous is not None:
            log.info("reusing %s (%d samples)", previous.tar_name, previous.n_samples)
            manifests.append(replace(previous, reused=True))
        else:
            manifests.append(write_shard(shard_dir, index, shard_samples, content_key))

    remove_stale_shards(shard_dir, n_shards=len(manifests))
    write_atomically(shard_dir / INDEX_NAME, encode_json(index_json(manifests)))
    return manifests


def check_samples(samples: list[ShardSample]) -> None:
    """Raise ``ValueError`` naming the first sample that breaks the schema (see ``write_shards``)."""
    seen: set[str] = set()
    for sample in samples:
        check_clip_id(sample.clip_id)
        if sample.clip_id in seen:
            raise ValueError(f"clip_id {sample.clip_id!r} appears more than once")
        seen.add(sample.clip_id)
        for name in sample.members:
            check_member_name(name)
        missing = [name for name in REQUIRED_MEMBERS if name not in sample.members]
        if missing:
            raise ValueError(f"clip {sample.clip_id!r} lacks required members {missing}")
        try:
            meta = json.loads(member_bytes(sample.members[META_MEMBER]))
        except (OSError, ValueError) as error:
            raise ValueError(f"clip {sample.clip_id!r}: unreadable json member: {error}") from error
        if not isinstance(meta, dict):
            # ValueError like every other bad sample, so callers need to catch one type.
            raise ValueError(f"clip {sample.clip_id!r}: the json member must hold an object")  # noqa: TRY004
        if missing_meta_keys(meta):
            raise ValueError(f"clip {sample.clip_id!r}: json lacks keys {missing_meta_keys(meta)}")
        if meta["clip_id"] != sample.clip_id:
            raise ValueError(f"clip {sample.clip_id!r}: json says clip_id {meta['clip_id']!r}")
        if meta["schema_version"] != SCHEMA_VERSION:
            raise ValueError(
                f"clip {sample.clip_id!r}: json schema_version {meta['schema_version']!r}, "
                f"this writer writes {SCHEMA_VERSION}"
            )


def plan_shards(
    samples: list[ShardSample], max_samples_per_shard: int, max_bytes_per_shard: int
) -> list[list[ShardSample]]:
    """Split the ordered samples into consecutive shards (greedy; see ``write_shards`` for the limits)."""
    shards: list[list[ShardSample]] = []
    current: list[ShardSample] = []
    current_bytes = 0
    for sample in samples:
        size = sample_tar_size(sample)
        if current and (len(current) >= max_samples_per_shard or current_bytes + size > max_bytes_per_shard):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def sample_tar_size(sample: ShardSample) -> int:
    """Bytes the sample takes in a tar: a header block per member plus data padded to whole blocks.

    Exact for names that fit a plain tar header (up to 100 characters); longer names add a PAX header.
    """
    total = 0
    for value in sample.members.values():
        size = len(value) if isinstance(value, bytes) else Path(value).stat().st_size
        total += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return total


def member_bytes(value: Path | bytes) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


def reusable_manifest(shard_dir: Path, index: int, content_key: str) -> ShardManifest | None:
    """The manifest of a finished shard with this content key whose tar has the recorded size and sha256,
    else ``None`` (the shard is then rewritten).

    The hash is checked, not just the size: a tar corrupted in place keeps its size, and reusing it would copy
    its manifest's (now false) sha256 into ``index.json``. A shard that should have been reusable but is not
    intact is logged as a warning, since it means that something damaged a finished file.
    """
    manifest_path = shard_dir / shard_manifest_name(index)
    tar_path = shard_dir / shard_tar_name(index)
    try:
        manifest = ShardManifest.load(manifest_path)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if manifest.index != index or manifest.content_key != content_key:
        return None  # the shard's content changed: an ordinary rewrite, nothing to warn about
    try:
        with open(tar_path, "rb") as file:
            tar_size = os.fstat(file.fileno()).st_size
            actual = file_sha256(file) if tar_size == manifest.n_bytes else None
    except OSError as error:
        log.warning("%s: cannot read the finished shard (%s); rewriting it", tar_path, error)
        return None
    if tar_size != manifest.n_bytes:
        log.warning("%s: %d bytes, its manifest says %d (damaged since it was written); rewriting it",
                    tar_path, tar_size, manifest.n_bytes)
        return None
    if actual != manifest.sha256:
        log.warning("%s: sha256 %s, its manifest says %s (same size, other bytes: damaged since it was "
                    "written); rewriting it", tar_path, actual, manifest.sha256)
        return None
    return manifest


class HashingWriter:
    """A write-only file wrapper that counts and hashes the bytes going through it."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.n_bytes += len(data)
        return self.file.write(data)


def write_shard(shard_dir: Path, index: int, samples: list[ShardSample], content_key: str) -> ShardManifest:
    """Write one shard's tar, then its manifest (both atomically), and return the manifest."""
    tar_path = shard_dir / shard_tar_name(index)
    manifest_path = shard_dir / shard_manifest_name(index)
    # The manifest marks the shard as done: drop the old one before the tar changes, so that a crash in
    # between leaves a tar without a manifest (not done) rather than a manifest describing other bytes.
    manifest_path.unlink(missing_ok=True)

    temp_path = shard_dir / temp_name(tar_path.name, os.getpid())
    try:
        with open(temp_path, "wb") as file:
            hashing = HashingWriter(file)
            # encoder=False: members are already bytes. TarWriter sorts each sample's members by name.
            with wds.TarWriter(
                hashing, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE
            ) as tar:
                for sample in samples:
                    members = {name: member_bytes(value) for name, value in sample.members.items()}
                    tar.write({"__key__": sample.clip_id, **members})
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, tar_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_path(shard_dir)

    manifest = ShardManifest(
        index=index,
        n_samples=len(samples),
        n_bytes=hashing.n_bytes,
        sha256=hashing.sha256.hexdigest(),
        clip_ids=tuple(sample.clip_id for sample in samples),
        content_key=content_key,
    )
    write_atomically(manifest_path, encode_json(manifest.to_json()))
    log.info("wrote %s (%d samples, %d bytes)", tar_path.name, manifest.n_samples, manifest.n_bytes)
    return manifest


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync and rename."""
    temp_path = path.with_name(temp_name(path.name, os.getpid()))
    try:
        with open(temp_path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory so that the renames in it are durable (a rename lives in the directory, not in
    the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(shard_dir: Path) -> list[Path]:
    """Remove temp files left by interrupted runs; returns what was removed."""
    removed = [path for path in shard_dir.iterdir() if TEMP_NAME_PATTERN.fullmatch(path.name)]
    for path in removed:
        log.warning("removing leftover temp file %s", path)
        path.unlink(missing_ok=True)
    return removed


def remove_stale_shards(shard_dir: Path, n_shards: int) -> list[Path]:
    """Remove shard files with an index >= ``n_shards`` (left by an earlier, larger run)."""
    stale = []
    for path in shard_dir.iterdir():
        match = SHARD_NAME_PATTERN.fullmatch(path.name)
        if match and int(match.group(1)) >= n_shards:
            stale.append(path)
    # Manifests first, so that an interrupted clean-up never leaves a "done" marker without its tar.
    stale.sort(key=lambda path: (path.suffix != ".json", path.name))
    for path in stale:
        log.info("removing stale %s", path.name)
        path.unlink(missing_ok=True)
    return stale


def publish_shards(parts: Sequence[tuple[Path, Sequence[ShardManifest]]], shard_dir: Path, *,
                   hard_links: bool = False) -> list[ShardManifest]:
    """Publish shards written elsewhere (each partition's own ``shards/``) as one numbered set in ``shard_dir``.

    Each part's shards keep their order and are renumbered consecutively after the previous part's. A tar is
    copied (a reflink where the file system has them: no bytes duplicated until one side changes), or hard-linked
    with ``hard_links``, through a temp name and a rename, so a published name never holds a partial file. A
    published tar is kept only when it holds exactly its manifest's bytes (size and sha256); one that differs (a
    shard damaged in place) is rebuilt from its source, with a warning. Every source is checked the same way
    before anything in ``shard_dir`` changes (``PublishSourceError`` otherwise). Manifests are written after their
    tars, index.json last; stale shards and leftover temp files are removed."""
    shard_dir = Path(shard_dir)
    check_publish_sources(parts, shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(shard_dir)
    (shard_dir / INDEX_NAME).unlink(missing_ok=True)
    manifests: list[ShardManifest] = []
    for part_dir, part_manifests in parts:
        for local in part_manifests:
            manifest = replace(local, index=len(manifests), reused=False)
            source, target = Path(part_dir) / local.tar_name, shard_dir / manifest.tar_name
            manifest_path = shard_dir / manifest.manifest_name
            if not _already_published(source, target, manifest, hard_links):
                manifest_path.unlink(missing_ok=True)  # the "done" marker goes before its tar changes
                _copy_or_link(source, target, hard_links)
            if not (manifest_path.is_file() and manifest_path.read_bytes() == encode_json(manifest.to_json())):
                write_atomically(manifest_path, encode_json(manifest.to_json()))
            manifests.append(manifest)
    remove_stale_shards(shard_dir, n_shards=len(manifests))
    fsync_path(shard_dir)
    write_atomically(shard_dir / INDEX_NAME, encode_json(index_json(manifests)))
    return manifests


class PublishSourceError(RuntimeError):
    """A shard to publish is missing or is not what its manifest records; nothing was published."""


def check_publish_sources(parts: Sequence[tuple[Path, Sequence[ShardManifest]]], shard_dir: Path) -> None:
    """Raise ``PublishSourceError`` naming the first source shard that is missing or changed."""
    for part_dir, part_manifests in parts:
        for local in part_manifests:
            problem = shard_file_problem(Path(part_dir) / local.tar_name, local)
            if problem is not None:
                raise PublishSourceError(f"cannot publish: {problem}; nothing in {shard_dir} was changed")


def shard_file_problem(tar: Path, manifest: ShardManifest) -> str | None:
    """Why ``tar`` is not the shard ``manifest`` describes (missing, another size, another sha256), or None."""
    if not tar.is_file():
        return f"{tar} is missing"
    size = tar.stat().st_size
    if size != manifest.n_bytes:
        return f"{tar} has {size} bytes, its manifest says {manifest.n_bytes}"
    if file_sha256(tar) != manifest.sha256:
        return f"{tar} does not have its manifest's sha256"
    return None


def _already_published(source: Path, target: Path, manifest: ShardManifest, hard_links: bool) -> bool:
    """Whether ``target`` already holds the shard, in the form asked for (a link to ``source``, or its own copy)."""
    if not target.exists():
        return False
    if os.path.samefile(source, target) != hard_links:
        return False
    if hard_links:
        return True  # the same file as the source, which was just verified
    problem = shard_file_problem(target, manifest)
    if problem is not None:
        log.warning("published shard %s differs from its manifest (%s): rebuilt from its partition", target, problem)
    return problem is None


def _copy_or_link(source: Path, target: Path, hard_link: bool) -> None:
    """``target`` becomes ``source``'s content, atomically: a copy (a reflink where possible) or a hard link under a
    temp name, then a rename over ``target``."""
    temp_path = target.with_name(temp_name(target.name, os.getpid()))
    temp_path.unlink(missing_ok=True)
    try:
        if hard_link:
            try:
                os.link(source, temp_path)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                hard_link = False
        if not hard_link:
            _copy_file(source, temp_path)
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


_FICLONE = 0x40049409  # Linux: share the source's blocks copy-on-write (btrfs, XFS); EOPNOTSUPP elsewhere


def _copy_file(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        try:
            fcntl.ioctl(writer.fileno(), _FICLONE, reader.fileno())
        except OSError:
            shutil.copyfileobj(reader, writer, 1 << 20)
        writer.flush()
        os.fsync(writer.fileno())
