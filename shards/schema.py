"""The on-disk shard format: the one module that the writer, the reader and the validator import.

A shard directory holds WebDataset tar files with one sample per kept clip::

    shard-000000.tar    samples, each stored as <clip_id>.<member> files
    shard-000000.json   the shard's manifest; written last, so its presence means "this shard is done"
    shard-000001.tar
    shard-000001.json
    index.json          the list of shards; written after every shard is done

A sample's members (``REQUIRED_MEMBERS`` must all be present; later stages add more, see
``OPTIONAL_MEMBERS``):

- ``mp4``: H.264 video, 512x512, 25 fps, no audio track. T = its number of frames.
- ``wav``: 16 kHz mono PCM16 audio, exactly T * 640 samples (16000 / 25 per frame).
- ``landmarks.npy``: float16 (T, 478, 3) MediaPipe face-mesh landmarks; x, y normalised to [0, 1] of the
  512x512 frame, z relative (MediaPipe's depth scale); rows of NaN where no face was found.
- ``pose.npy``: float32 (T, 3) head pose (yaw, pitch, roll) in degrees; NaN where no face was found.
- ``json``: metadata dict with at least ``REQUIRED_META_KEYS``, plus whatever else the pipeline records.

WebDataset splits a tar member name at the first dot into key and member name, so clip ids never contain
dots, and member names are lower case (the reader lower-cases them) and never start with ``_`` (TarWriter
treats such keys as private metadata and drops them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

SCHEMA_VERSION = 1

# Media layout shared by every member.
FPS = 25
FRAME_SIZE = 512  # width == height, pixels
SAMPLE_RATE = 16_000  # Hz
AUDIO_SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
VIDEO_CODEC = "h264"
AUDIO_SUBTYPE = "PCM_16"  # soundfile's name for 16-bit signed PCM
N_LANDMARKS = 478  # MediaPipe face mesh with iris refinement
LANDMARK_DIMS = 3  # x, y, z
POSE_DIMS = 3  # yaw, pitch, roll
LANDMARKS_DTYPE = "float16"  # numpy dtype names, so this module needs no numpy
POSE_DTYPE = "float32"

# Member names (the part of the tar member name after "<clip_id>.").
VIDEO_MEMBER = "mp4"
AUDIO_MEMBER = "wav"
LANDMARKS_MEMBER = "landmarks.npy"
POSE_MEMBER = "pose.npy"
META_MEMBER = "json"
REQUIRED_MEMBERS: tuple[str, ...] = (VIDEO_MEMBER, AUDIO_MEMBER, LANDMARKS_MEMBER, POSE_MEMBER, META_MEMBER)
# Members that later stages add. Not exhaustive: the writer accepts any valid member name; this list
# documents the known ones so that readers and validators agree on their meaning.
# float16 (T, K, H): K wav2vec 2.0 hidden states per frame, those the json lists in audio.wav2vec.layers (default:
# all L+1 of them)
WAV2VEC_MEMBER = "wav2vec.npy"
VOCALS_MEMBER = "vocals.wav"  # the speech stem after source separation, 16 kHz mono PCM16, T * 640 samples
# The emotion inputs of the paper's eq. 1 (E_t, E_ser, E_va): an uncompressed npz of float32 arrays named as
# EMOTION_ARRAYS (the fields of model.emotion_embedding.EmotionFeatures) plus a uint8 0/1 scalar per part in
# EMOTION_VALID_ARRAYS (0: no speech / no usable text, and the part's arrays are zeros). The json member's
# "emotion" entry names the classes, the va columns, window and hop.
EMOTION_MEMBER = "emotion.npz"
EMOTION_ARRAYS: tuple[str, ...] = (
    "text_probs",  # (7,) anger, disgust, fear, joy, neutral, sadness, surprise
    "text_embedding",  # (D_t,) 768 for the default model
    "speech_probs",  # (C,) in the SER model's label order (default neu, hap, ang, sad)
    "speech_embedding",  # (D_ser,) the SER classification head's input: 256 for the default model
    "va_values",  # (K, 3) valence, arousal, dominance per window (2 s, hop 1 s)
    "va_embedding",  # (K, D_va) 1024 for the default model
)
EMOTION_VALID_ARRAYS: tuple[str, ...] = ("text_valid", "speech_valid", "va_valid")
AUS_MEMBER = "aus.npy"  # float32 (T, N_AU) action-unit intensities per frame; the json's "action_units" names them
DESCRIPTION_MEMBER = "clip_text.npy"  # float16 (77, D) CLIP text last hidden state of the clip's description
CLIP_TEXT_TOKENS = 77  # SD 1.5's text context length
LATENTS_MEMBER = "latents.npy"  # float16 (T, 4, 64, 64) SD VAE posterior means times the json's scaling_factor
OPTIONAL_MEMBERS: tuple[str, ...] = (WAV2VEC_MEMBER, VOCALS_MEMBER, EMOTION_MEMBER, AUS_MEMBER, DESCRIPTION_MEMBER,
                                     LATENTS_MEMBER)

# The name each member gets in the dicts the reader yields. Members not listed here keep their name
# without the extension (``wav2vec.npy`` -> ``wav2vec``).
FIELD_NAMES: dict[str, str] = {
    VIDEO_MEMBER: "video",
    AUDIO_MEMBER: "audio",
    LANDMARKS_MEMBER: "landmarks",
    POSE_MEMBER: "pose",
    META_MEMBER: "meta",
}

REQUIRED_META_KEYS: tuple[str, ...] = (
    "clip_id",
    "source",
    "dataset",
    "n_frames",
    "fps",
    "duration_s",
    "width",
    "height",
    "sample_rate",
    "schema_version",
)

CLIP_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
MEMBER_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*")

# Files in a shard directory.
SHARD_TAR_FORMAT = "shard-{index:06d}.tar"
SHARD_MANIFEST_FORMAT = "shard-{index:06d}.json"
SHARD_TAR_GLOB = "shard-*.tar"
SHARD_MANIFEST_GLOB = "shard-*.json"
SHARD_NAME_PATTERN = re.compile(r"shard-(\d{6})\.(tar|json)")
INDEX_NAME = "index.json"
# Temp files are hidden (leading dot) so that no shard glob ever matches a partial file.
TEMP_NAME_FORMAT = ".{name}.tmp-{pid}"
TEMP_NAME_PATTERN = re.compile(r"\..+\.tmp-\d+")

# Fixed tar header fields, so that the same samples always give byte-identical shards.
TAR_MTIME = 0
TAR_USER = "shards"
TAR_GROUP = "shards"
TAR_MODE = 0o444


HASH_CHUNK = 1 << 20  # bytes read per hashing step: large enough that the hash, not the call, dominates


def shard_tar_name(index: int) -> str:
    return SHARD_TAR_FORMAT.format(index=index)


def shard_manifest_name(index: int) -> str:
    return SHARD_MANIFEST_FORMAT.format(index=index)


def temp_name(final_name: str, pid: int) -> str:
    return TEMP_NAME_FORMAT.format(name=final_name, pid=pid)


def shard_tar_index(name: str) -> int | None:
    """The index of a shard tar named ``shard-NNNNNN.tar`` (a bare name: no directory), else ``None``."""
    match = SHARD_NAME_PATTERN.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match and match.group(2) == "tar" else None


def check_index_entry(name: Any, index_path: Path) -> str:
    """Return ``name`` if it is a bare shard tar name (``shard-NNNNNN.tar``), else raise ``ValueError``.

    ``index.json`` lists shards by name, relative to its own directory; an entry with a path separator, ``..``
    or an absolute path would make a reader open a file outside the shard directory, so it is refused before
    anything is opened.
    """
    if shard_tar_index(name) is None:
        raise ValueError(
            f"{index_path}: shard entry {name!r} is not a bare shard name (expected 'shard-NNNNNN.tar', no "
            "directories, no '..'); the file was not opened. Rewrite the index with the writer (rerun the "
            "preprocess flow) or fix the entry by hand"
        )
    return name


def file_sha256(file: BinaryIO | Path | str) -> str:
    """The sha256 (hex) of a file given by path, or of an open binary file's bytes from its current position to
    the end (so that what is hashed is what the caller goes on to read)."""
    if isinstance(file, (Path, str)):
        with open(file, "rb") as opened:
            return file_sha256(opened)
    digest = hashlib.sha256()
    while chunk := file.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def check_clip_id(clip_id: str) -> None:
    """Raise ``ValueError`` unless ``clip_id`` can be a WebDataset key (letters, digits, ``_`` and ``-``)."""
    if not isinstance(clip_id, str) or not CLIP_ID_PATTERN.fullmatch(clip_id):
        raise ValueError(
            f"invalid clip_id {clip_id!r}: only letters, digits, '_' and '-' are allowed "
            "(WebDataset splits tar member names at the first dot, so a dot would split the sample)"
        )


def check_member_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a valid member name (lower case, dot-separated parts)."""
    if not isinstance(name, str) or not MEMBER_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid member name {name!r}: use lower-case letters, digits, '_' and '-' in dot-separated "
            "parts (e.g. 'wav2vec.npy'); WebDataset lower-cases member names and drops names starting "
            "with '_'"
        )


def field_name(member: str) -> str:
    """The key under which the reader yields ``member`` (``landmarks.npy`` -> ``landmarks``)."""
    return FIELD_NAMES.get(member, member.rsplit(".", 1)[0])


def clip_metadata(*, clip_id: str, source: str, dataset: str, n_frames: int, **extra: Any) -> dict[str, Any]:
    """The ``json`` member of a clip: the required keys derived from the schema, plus ``extra``."""
    check_clip_id(clip_id)
    return {
        **extra,
        "clip_id": clip_id,
        "source": source,
        "dataset": dataset,
        "n_frames": int(n_frames),
        "fps": FPS,
        "duration_s": n_frames / FPS,
        "width": FRAME_SIZE,
        "height": FRAME_SIZE,
        "sample_rate": SAMPLE_RATE,
        "schema_version": SCHEMA_VERSION,
    }


def encode_json(value: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed indentation, a final newline).

    NaN and infinity are refused: they are not JSON, and other readers reject them.
    """
    return (json.dumps(value, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=False) + "\n").encode()


def missing_meta_keys(meta: dict[str, Any]) -> list[str]:
    return [key for key in REQUIRED_META_KEYS if key not in meta]


@dataclass(frozen=True)
class ShardSample:
    """One clip to write. ``members`` maps member names to a file or to the member's bytes.

    ``content_key`` is a hash that the caller computes from everything that went into the sample (inputs,
    settings, code versions); it must change whenever the sample's bytes would. The writer compares it,
    not the bytes, to decide whether a shard from a previous run can be reused.
    """

    clip_id: str
    members: dict[str, Path | bytes]
    content_key: str


@dataclass(frozen=True)
class ShardManifest:
    """What ``shard-NNNNNN.json`` records about ``shard-NNNNNN.tar``.

    ``content_key`` hashes the content keys of the shard's samples (see ``shard_content_key``).
    ``reused`` is not stored: it says whether the last ``write_shards`` call kept the shard as it was.
    """

    index: int
    n_samples: int
    n_bytes: int
    sha256: str
    clip_ids: tuple[str, ...]
    content_key: str
    schema_version: int = SCHEMA_VERSION
    reused: bool = field(default=False, compare=False)

    @property
    def tar_name(self) -> str:
        return shard_tar_name(self.index)

    @property
    def manifest_name(self) -> str:
        return shard_manifest_name(self.index)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tar": self.tar_name,
            "n_samples": self.n_samples,
            "n_bytes": self.n_bytes,
            "sha256": self.sha256,
            "clip_ids": list(self.clip_ids),
            "content_key": self.content_key,
            "schema_version": self.schema_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardManifest:
        """Parse a manifest; raises ``KeyError``/``TypeError``/``ValueError`` when it is malformed."""
        return cls(
            index=int(data["index"]),
            n_samples=int(data["n_samples"]),
            n_bytes=int(data["n_bytes"]),
            sha256=str(data["sha256"]),
            clip_ids=tuple(str(clip_id) for clip_id in data["clip_ids"]),
            content_key=str(data["content_key"]),
            schema_version=int(data["schema_version"]),
        )

    @classmethod
    def load(cls, path: Path) -> ShardManifest:
        return cls.from_json(json.loads(path.read_text()))


def shard_content_key(samples: list[ShardSample]) -> str:
    """Hash of the shard's schema version, clip ids and sample content keys, in order."""
    payload = [SCHEMA_VERSION, [[sample.clip_id, sample.content_key] for sample in samples]]
    return hashlib.sha256(encode_json(payload)).hexdigest()


def index_json(manifests: list[ShardManifest]) -> dict[str, Any]:
    """The content of ``index.json`` for these shards (in index order)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "n_samples": sum(manifest.n_samples for manifest in manifests),
        "n_shards": len(manifests),
        "shards": [
            {
                "tar": manifest.tar_name,
                "n_samples": manifest.n_samples,
                "n_bytes": manifest.n_bytes,
                "sha256": manifest.sha256,
                "content_key": manifest.content_key,
            }
            for manifest in manifests
        ],
    }
