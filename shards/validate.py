"""Check a shard directory, or a whole preprocess out_dir, reporting problems as values rather than raising.

``validate_shards`` reads every tar once (hash, then members), so it costs about one pass over the data:
run it after writing and before training, not in the training loop. ``validate_output`` adds what makes an
out_dir one consistent dataset: no interrupted publish (``publishing.json``), a ``summary.json`` that committed
exactly the shards and table rows now there, the clips table's ``shard`` column agreeing with the shards' clip
ids, and no temp files in ``tables/``. Index entries that are not bare shard names (``../../etc/hostname``) are
reported and never opened.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from shards.leftovers import find_leftovers
from shards.output_lock import live_holder
from shards.schema import (
    AUDIO_MEMBER,
    AUDIO_SAMPLES_PER_FRAME,
    AUDIO_SUBTYPE,
    AUS_MEMBER,
    CLIP_ID_PATTERN,
    CLIP_TEXT_TOKENS,
    DESCRIPTION_MEMBER,
    FPS,
    FRAME_SIZE,
    INDEX_NAME,
    LANDMARK_DIMS,
    LANDMARKS_DTYPE,
    LANDMARKS_MEMBER,
    LATENTS_MEMBER,
    META_MEMBER,
    N_LANDMARKS,
    POSE_DIMS,
    POSE_DTYPE,
    POSE_MEMBER,
    REQUIRED_MEMBERS,
    SAMPLE_RATE,
    SCHEMA_VERSION,
    SHARD_NAME_PATTERN,
    TEMP_NAME_PATTERN,
    VIDEO_CODEC,
    VIDEO_MEMBER,
    VOCALS_MEMBER,
    WAV2VEC_MEMBER,
    ShardManifest,
    file_sha256,
    index_json,
    missing_meta_keys,
    shard_manifest_name,
    shard_tar_index,
    shard_tar_name,
)
from shards.tables import (
    CLIPS_TABLE,
    KEPT,
    PUBLISHING_MARKER,
    SHARDS_DIR,
    SUMMARY_FILE,
    TABLES_DIR,
    committed_state,
)

__all__ = ["validate_output", "validate_sample", "validate_shards"]

MAX_LISTED = 20  # per kind of table/shard disagreement; the rest are counted, so one bad run stays readable


def validate_shards(shard_dir: Path) -> list[str]:
    """Every way ``shard_dir`` departs from the schema, one message per problem; empty means valid.

    Checks: no temp files; a manifest for every tar and a tar for every manifest; shard indices
    contiguous from 0; tar size, sha256, sample count and clip ids match the manifest; every sample has
    the required members and consistent contents (``validate_sample``); clip ids unique across shards;
    ``index.json`` agrees with the manifests.
    """
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        return [f"{shard_dir}: not a directory"]
    problems: list[str] = []
    names = sorted(path.name for path in shard_dir.iterdir())
    problems += [f"{name}: leftover temp file" for name in names if TEMP_NAME_PATTERN.fullmatch(name)]

    tar_indices = shard_indices(names, "tar")
    manifest_indices = shard_indices(names, "json")
    problems += [f"{shard_tar_name(i)}: no manifest" for i in sorted(tar_indices - manifest_indices)]
    problems += [f"{shard_manifest_name(i)}: no tar" for i in sorted(manifest_indices - tar_indices)]
    all_indices = tar_indices | manifest_indices
    if all_indices and sorted(all_indices) != list(range(max(all_indices) + 1)):
        problems.append(f"shard indices are not contiguous from 0: {sorted(all_indices)}")

    manifests: list[ShardManifest] = []
    first_shard_of_clip: dict[str, str] = {}
    for index in sorted(tar_indices & manifest_indices):
        manifest, shard_problems = validate_shard(shard_dir, index)
        problems += shard_problems
        if manifest is None:
            continue
        manifests.append(manifest)
        for clip_id in manifest.clip_ids:
            if clip_id in first_shard_of_clip:
                problems.append(f"{manifest.tar_name}: clip {clip_id} also in {first_shard_of_clip[clip_id]}")
            first_shard_of_clip.setdefault(clip_id, manifest.tar_name)

    problems += validate_index(shard_dir, manifests, complete=len(manifests) == len(all_indices))
    return problems


def shard_indices(names: list[str], kind: str) -> set[int]:
    indices = set()
    for name in names:
        match = SHARD_NAME_PATTERN.fullmatch(name)
        if match and match.group(2) == kind:
            indices.add(int(match.group(1)))
    return indices


def validate_shard(shard_dir: Path, index: int) -> tuple[ShardManifest | None, list[str]]:
    """Check one shard against its manifest and the schema; returns the manifest (if it parses)."""
    tar_name = shard_tar_name(index)
    tar_path = shard_dir / tar_name
    try:
        manifest = ShardManifest.load(shard_dir / shard_manifest_name(index))
    except (OSError, KeyError, TypeError, ValueError) as error:
        return None, [f"{shard_manifest_name(index)}: unreadable manifest: {error!r}"]

    problems = []
    if manifest.index != index:
        problems.append(f"{manifest.manifest_name}: says index {manifest.index}")
    if manifest.schema_version != SCHEMA_VERSION:
        problems.append(
            f"{manifest.manifest_name}: schema_version {manifest.schema_version}, expected {SCHEMA_VERSION}"
        )
    if manifest.n_samples != len(manifest.clip_ids):
        problems.append(
            f"{manifest.manifest_name}: n_samples {manifest.n_samples} but {len(manifest.clip_ids)} clip ids"
        )
    size = tar_path.stat().st_size
    if size != manifest.n_bytes:
        problems.append(f"{tar_name}: {size} bytes, manifest says {manifest.n_bytes}")
    if file_sha256(tar_path) != manifest.sha256:
        problems.append(f"{tar_name}: sha256 differs from the manifest")

    clip_ids = []
    try:
        for clip_id, members in tar_samples(tar_path):
            clip_ids.append(clip_id)
            problems += [f"{tar_name}: {clip_id}: {problem}" for problem in validate_sample(clip_id, members)]
    except (OSError, tarfile.TarError, EOFError) as error:
        problems.append(f"{tar_name}: unreadable tar after {len(clip_ids)} samples: {error!r}")
    if len(clip_ids) != manifest.n_samples:
        problems.append(f"{tar_name}: {len(clip_ids)} samples, manifest says {manifest.n_samples}")
    elif tuple(clip_ids) != manifest.clip_ids:
        problems.append(f"{tar_name}: clip ids differ from the manifest")
    return manifest, problems


def tar_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(clip_id, {member: bytes}) for each run of consecutive tar members sharing a key, as WebDataset
    groups them (key = name up to the first dot). A key that reappears later comes out again."""
    clip_id: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _, member = info.name.partition(".")
            if key != clip_id:
                if clip_id is not None:
                    yield clip_id, members
                clip_id, members = key, {}
            members[member] = tar.extractfile(info).read()
    if clip_id is not None:
        yield clip_id, members


def validate_sample(clip_id: str, members: dict[str, bytes]) -> list[str]:
    """Problems with one sample's members: required members present, json metadata complete and
    consistent with the clip id, and every array, the audio and the video T frames long."""
    problems = []
    if not CLIP_ID_PATTERN.fullmatch(clip_id):
        problems.append("clip id is not [A-Za-z0-9_-]+")
    missing = [member for member in REQUIRED_MEMBERS if member not in members]
    if missing:
        problems.append(f"missing members {missing}")
    if META_MEMBER not in members:
        return problems
    try:
        meta = json.loads(members[META_MEMBER])
    except ValueError as error:
        return [*problems, f"json does not parse: {error}"]
    if not isinstance(meta, dict):
        return [*problems, "json is not an object"]
    if missing_meta_keys(meta):
        return [*problems, f"json lacks keys {missing_meta_keys(meta)}"]
    if meta["schema_version"] != SCHEMA_VERSION:
        problems.append(f"json schema_version {meta['schema_version']!r}, expected {SCHEMA_VERSION}")
    if meta["clip_id"] != clip_id:
        problems.append(f"json clip_id {meta['clip_id']!r} differs from the key")
    expected_layout = {"fps": FPS, "width": FRAME_SIZE, "height": FRAME_SIZE, "sample_rate": SAMPLE_RATE}
    problems += [
        f"json {key}={meta[key]!r}, expected {value}"
        for key, value in expected_layout.items()
        if meta[key] != value
    ]
    n_frames = meta["n_frames"]
    if not isinstance(n_frames, int) or n_frames < 1:
        return [*problems, f"json n_frames={n_frames!r} is not a positive integer"]

    checks = {
        LANDMARKS_MEMBER: lambda data: check_array(
            data, (n_frames, N_LANDMARKS, LANDMARK_DIMS), LANDMARKS_DTYPE
        ),
        POSE_MEMBER: lambda data: check_array(data, (n_frames, POSE_DIMS), POSE_DTYPE),
        AUDIO_MEMBER: lambda data: check_wav(data, n_frames),
        VIDEO_MEMBER: lambda data: check_video(data, n_frames),
        # the feature stages' members, when present: one entry per frame, in their documented dtype
        VOCALS_MEMBER: lambda data: check_wav(data, n_frames),
        WAV2VEC_MEMBER: lambda data: check_per_frame_array(data, n_frames, "float16", ndim=3),
        AUS_MEMBER: lambda data: check_per_frame_array(data, n_frames, "float32", ndim=2),
        LATENTS_MEMBER: lambda data: check_per_frame_array(data, n_frames, "float16", ndim=4),
        DESCRIPTION_MEMBER: lambda data: check_text_embedding(data),
    }
    for member, check in checks.items():
        if member in members:
            try:
                problems += [f"{member}: {problem}" for problem in check(members[member])]
            # numpy, soundfile and PyAV each raise their own errors; any of them is a problem to report.
            except Exception as error:  # noqa: BLE001
                problems.append(f"{member}: does not decode: {error!r}")
    return problems


def check_array(data: bytes, shape: tuple[int, ...], dtype: str) -> list[str]:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    problems = []
    if array.shape != shape:
        problems.append(f"shape {array.shape}, expected {shape} (T = json n_frames)")
    if array.dtype != np.dtype(dtype):
        problems.append(f"dtype {array.dtype}, expected {dtype}")
    return problems


def check_per_frame_array(data: bytes, n_frames: int, dtype: str, ndim: int) -> list[str]:
    """An array with one entry per video frame: (T, ...) with ``ndim`` dimensions."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    problems = []
    if array.ndim != ndim or array.shape[0] != n_frames:
        problems.append(f"shape {array.shape}, expected {ndim} dimensions with T = {n_frames} first")
    if array.dtype != np.dtype(dtype):
        problems.append(f"dtype {array.dtype}, expected {dtype}")
    return problems


def check_text_embedding(data: bytes) -> list[str]:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    problems = []
    if array.ndim != 2 or array.shape[0] != CLIP_TEXT_TOKENS:
        problems.append(f"shape {array.shape}, expected ({CLIP_TEXT_TOKENS}, D)")
    if array.dtype != np.float16:
        problems.append(f"dtype {array.dtype}, expected float16")
    return problems


def check_wav(data: bytes, n_frames: int) -> list[str]:
    info = soundfile.info(io.BytesIO(data))
    problems = []
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.subtype != AUDIO_SUBTYPE:
        problems.append(
            f"{info.samplerate} Hz, {info.channels} channels, {info.subtype}; "
            f"expected {SAMPLE_RATE} Hz mono {AUDIO_SUBTYPE}"
        )
    expected = n_frames * AUDIO_SAMPLES_PER_FRAME
    if info.frames != expected:
        problems.append(f"{info.frames} samples, expected {expected} (n_frames * {AUDIO_SAMPLES_PER_FRAME})")
    return problems


def check_video(data: bytes, n_frames: int) -> list[str]:
    """Codec, size, frame rate and frame count; counts packets (one per frame for H.264) without decoding."""
    problems = []
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            return ["no video stream"]
        if container.streams.audio:
            problems.append("has an audio track (audio belongs in the wav member)")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec.name != VIDEO_CODEC:
            problems.append(f"codec {codec.name}, expected {VIDEO_CODEC}")
        if (codec.width, codec.height) != (FRAME_SIZE, FRAME_SIZE):
            problems.append(f"{codec.width}x{codec.height}, expected {FRAME_SIZE}x{FRAME_SIZE}")
        if stream.average_rate is None or Fraction(stream.average_rate) != FPS:
            problems.append(f"{stream.average_rate} fps, expected {FPS}")
        n_packets = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if n_packets != n_frames:
        problems.append(f"{n_packets} frames, json says n_frames={n_frames}")
    return problems


def validate_index(shard_dir: Path, manifests: list[ShardManifest], *, complete: bool) -> list[str]:
    """Compare ``index.json`` with what the manifests say it should hold."""
    index_path = shard_dir / INDEX_NAME
    if not index_path.exists():
        return [f"{INDEX_NAME}: missing"]
    try:
        index: Any = json.loads(index_path.read_text())
    except ValueError as error:
        return [f"{INDEX_NAME}: does not parse: {error}"]
    if not isinstance(index, dict) or index.get("schema_version") != SCHEMA_VERSION:
        return [f"{INDEX_NAME}: schema_version is not {SCHEMA_VERSION}"]
    entries = index.get("shards")
    if not isinstance(entries, list):
        return [f"{INDEX_NAME}: 'shards' is not a list"]
    problems = [f"{INDEX_NAME}: entry {entry.get('tar') if isinstance(entry, dict) else entry!r} is not a bare "
                f"shard name (shard-NNNNNN.tar in this directory); refused, not opened"
                for entry in entries if bare_shard_index(entry) is None]
    if not complete:
        return problems  # the shard problems are already reported; a comparison would only repeat them
    expected = index_json(manifests)
    return problems + [
        f"{INDEX_NAME}: {key} differs from the manifests"
        for key in expected
        if index.get(key) != expected[key]
    ]


def bare_shard_index(entry: Any) -> int | None:
    """The shard index of an ``index.json`` entry whose ``tar`` is a bare ``shard-NNNNNN.tar`` name, else None.

    Anything else (a path, ``../..``, an absolute name) is never joined to a directory and opened."""
    return shard_tar_index(entry.get("tar")) if isinstance(entry, dict) else None


def _listed(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return [*problems[:MAX_LISTED], f"... and {len(problems) - MAX_LISTED} more like these"]


def _index_clips(shard_dir: Path) -> dict[str, str] | None:
    """clip id -> shard tar, from the manifests of the shards ``index.json`` lists (bare names only); None when
    the index cannot be read (already reported by ``validate_shards``)."""
    try:
        entries = json.loads((shard_dir / INDEX_NAME).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    shard_of: dict[str, str] = {}
    for entry in entries if isinstance(entries, list) else []:
        index = bare_shard_index(entry)
        if index is None:
            continue
        try:
            manifest = ShardManifest.load(shard_dir / shard_manifest_name(index))
        except (OSError, KeyError, TypeError, ValueError):
            continue  # reported by validate_shards
        for clip_id in manifest.clip_ids:
            shard_of.setdefault(clip_id, manifest.tar_name)
    return shard_of


def validate_output(out_dir: Path) -> list[str]:
    """Every way a preprocess ``out_dir`` is not one complete, consistent dataset; empty means valid.

    Checks ``validate_shards`` on ``shards/`` plus: no ``publishing.json`` (an interrupted publish, or one running
    now); a ``summary.json`` with status complete whose committed index.json sha256, shard list and table row
    counts are those on disk now; every kept row of ``clips.parquet`` names exactly the shard whose manifest holds
    it, no shard clip without a kept row, no rejected row with a shard; no temp file or folder left anywhere in it
    while no run holds it (``shards.leftovers``; shards/ has its own check)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return [f"{out_dir}: not a directory"]
    problems: list[str] = []
    marker = out_dir / PUBLISHING_MARKER
    if marker.exists():
        try:
            holder = json.loads(marker.read_text())
            who = f"run {holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}, " \
                  f"started {holder.get('started_at')}"
        except (OSError, ValueError, AttributeError):
            who = "a run that left no description"
        live = live_holder(out_dir)
        if live is not None:
            problems.append(f"{PUBLISHING_MARKER}: a run is publishing now ({live}): shards, tables and summary.json "
                            "are being replaced; validate again when it has finished")
        else:
            problems.append(f"{PUBLISHING_MARKER}: a publish was interrupted ({who}): shards, tables and "
                            "summary.json may disagree; rerun preprocess on this out_dir to complete it")
    shard_dir = out_dir / SHARDS_DIR
    problems += [f"{SHARDS_DIR}/{problem}" for problem in validate_shards(shard_dir)]
    if live_holder(out_dir) is None:  # a live run's temps are work in progress
        problems += [f"{path.relative_to(out_dir)}: leftover temp {'folder' if path.is_dir() else 'file'} of an "
                     f"interrupted write (the next run on this out_dir removes it)"
                     for path in find_leftovers(out_dir) if not path.is_relative_to(out_dir / SHARDS_DIR)]
    problems += _check_summary(out_dir)
    shard_of = _index_clips(shard_dir) if shard_dir.is_dir() else None
    if shard_of is not None:
        problems += _check_clips_table(out_dir, shard_of)
    return problems


def _check_summary(out_dir: Path) -> list[str]:
    """summary.json against what is on disk now (``shards.tables.committed_state``)."""
    path = out_dir / SUMMARY_FILE
    if not path.exists():
        return [f"{SUMMARY_FILE}: missing: no run committed this out_dir (or the first one was interrupted); "
                f"rerun preprocess"]
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return [f"{SUMMARY_FILE}: does not parse ({error}); rerun preprocess"]
    committed = summary.get("committed") if isinstance(summary, dict) else None
    if not isinstance(committed, dict) or summary.get("status") != "complete":
        return [f"{SUMMARY_FILE}: not a run-level commit (no status 'complete' with a 'committed' entry: written "
                f"by an older version or interrupted); rerun preprocess"]
    now = committed_state(out_dir)
    problems = []
    if committed.get("index_sha256") != now["index_sha256"]:
        before = {entry.get("tar"): entry for entry in committed.get("shards") or [] if isinstance(entry, dict)}
        after = {entry["tar"]: entry for entry in now["shards"]}
        changed = sorted(str(name) for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        problems.append(f"{SUMMARY_FILE}: stale: it committed {SHARDS_DIR}/{INDEX_NAME} with sha256 "
                        f"{str(committed.get('index_sha256'))[:12]}..., which is now "
                        f"{str(now['index_sha256'])[:12]}...; shards that differ: {', '.join(changed) or 'none'} "
                        f"(the shards changed after the last commit; rerun preprocess)")
    before_tables, after_tables = committed.get("tables") or {}, now["tables"]
    for name in sorted(before_tables.keys() | after_tables.keys()):
        if before_tables.get(name) != after_tables.get(name):
            problems.append(f"{TABLES_DIR}/{name}: {_rows(after_tables.get(name))} now, {SUMMARY_FILE} committed "
                            f"{_rows(before_tables.get(name))}")
    return problems


def _rows(count: int | None) -> str:
    return "absent" if count is None else f"{count} rows"


def _check_clips_table(out_dir: Path, shard_of: dict[str, str]) -> list[str]:
    """The clips table's ``shard`` column against the clip ids of the shards index.json lists."""
    path = out_dir / TABLES_DIR / CLIPS_TABLE
    if not path.exists():
        return [f"{TABLES_DIR}/{CLIPS_TABLE}: missing, so the shards' {len(shard_of)} clips have no rows"]
    try:
        rows = pq.read_table(path, columns=["clip_id", "status", "shard"]).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as error:
        return [f"{TABLES_DIR}/{CLIPS_TABLE}: unreadable: {error}"]
    where = f"{TABLES_DIR}/{CLIPS_TABLE}"
    wrong, rejected_with_shard, kept_ids = [], [], Counter()
    for row in rows:
        clip_id, shard = row["clip_id"], row["shard"]
        if row["status"] == KEPT:
            kept_ids[clip_id] += 1
            if shard != shard_of.get(clip_id):
                said = f"says shard {shard}" if shard else "names no shard"
                wrong.append(f"{where}: kept clip {clip_id} {said}, but the indexed shards hold it in "
                             f"{shard_of.get(clip_id) or 'none'}")
        elif shard is not None:
            rejected_with_shard.append(f"{where}: rejected clip {clip_id} names shard {shard}")
    repeated = [f"{where}: kept clip {clip_id} has {count} rows" for clip_id, count in kept_ids.items() if count > 1]
    rowless = [f"{SHARDS_DIR}/{shard}: clip {clip_id} has no kept row in {where}"
               for clip_id, shard in sorted(shard_of.items()) if clip_id not in kept_ids]
    return _listed(wrong) + _listed(rejected_with_shard) + _listed(repeated) + _listed(rowless)
