"""What travels between the stages: a candidate clip's ``ClipJob`` through the video stages, then one
``PieceOutcome`` per piece through the audio and visual stages, and the ``Workspace`` (the run's cache).

Once a job or piece is rejected, later stages pass it through untouched (``preprocess.run.executor``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from preprocess.run.cache import StageCache, file_fingerprint
from preprocess.run.records import Candidate, CropBox, ProbeResult, Rejection

if TYPE_CHECKING:  # the stages' own result types, for reading only: the stage modules import this one
    from preprocess.video.crop import CropTrack
    from preprocess.video.faces import FaceTrack
    from preprocess.video.filters import PieceStats
    from preprocess.video.locate import FaceSurvey
    from preprocess.video.standardise import StandardisedClip


@dataclass(frozen=True)
class StageTiming:
    stage: str
    seconds: float  # wall time of the run that computed the output (also when re-used from the cache)
    cached: bool


@dataclass(frozen=True)
class ClipJob:
    """One candidate clip through the video stages."""

    candidate: Candidate
    source_sha256: str | None = None
    probe: ProbeResult | None = None
    duration_s: float | None = None  # of the candidate clip in the source, after clamping to the file
    survey: FaceSurvey | None = None
    crop_box: CropBox | None = None
    crop_method: str | None = None
    crop_max_speed: float | None = None  # a face track's fastest move, crop sides per second; None: a fixed crop
    crop_track: CropTrack | None = None  # the moving crop's path (standardise applies it); None: a fixed crop
    standardised: StandardisedClip | None = None
    standardise_key: str | None = None
    faces: FaceTrack | None = None
    faces_key: str | None = None
    rejection: Rejection | None = None
    notes: tuple[str, ...] = ()
    timings: tuple[StageTiming, ...] = ()
    # clip-level stage results that later video stages read (speech activity, frame quality): stored JSON + key + dir
    entries: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class PieceOutcome:
    """The fate of one clip (a piece of a candidate, or the whole candidate if it never got that far)."""

    clip_id: str
    job: ClipJob
    piece_index: int = 0
    n_pieces: int = 0
    frames: tuple[int, int] | None = None
    stats: PieceStats | None = None
    rejection: Rejection | None = None
    files_dir: str | None = None  # directory holding clip.mp4, clip.wav, landmarks.npy, pose.npy
    content_key: str | None = None
    timings: tuple[StageTiming, ...] = field(default=())
    features: dict[str, dict] = field(default_factory=dict)  # per-piece model stage -> its stored result + "key" + "dir"

    @property
    def kept(self) -> bool:
        return self.rejection is None and self.files_dir is not None


class Workspace:
    """Where a run keeps its cache (``out_dir/work``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.cache = StageCache(self.out_dir / "work")

    def fingerprint(self, path: Path) -> str:
        return file_fingerprint(path, self.out_dir / "work" / "fingerprints")


def rejected(item, rejection: Rejection):
    """A job or piece with its rejection set."""
    return replace(item, rejection=rejection)


def with_timing(item, stage: str, seconds: float, cached: bool):
    return replace(item, timings=item.timings + (StageTiming(stage, seconds, cached),))


def as_entry(stored: dict, key: str, directory: Path) -> dict:
    """A stage's stored result as later stages see it: its JSON, made as the cache writes result.json (a fresh
    result looks exactly like a cached one: tuples become lists), plus its cache ``key`` and ``dir``."""
    return {**json.loads(json.dumps(stored, default=str)), "key": key, "dir": str(directory)}


def encode(result) -> dict:
    """JSON form of a stage result (a dataclass) or a Rejection, for the cache."""
    kind = "rejection" if isinstance(result, Rejection) else "ok"
    return {"kind": kind, "value": asdict(result)}


def decode(stored: dict, cls):
    """The dataclass (or Rejection) that ``encode`` stored."""
    value = stored["value"]
    if stored["kind"] == "rejection":
        return Rejection(**value)
    fields = {}
    for name, item in value.items():
        if isinstance(item, list):
            item = tuple(item)
        if name in ("face_box",) and item is not None:
            item = CropBox(**item)
        fields[name] = item
    return cls(**fields)
