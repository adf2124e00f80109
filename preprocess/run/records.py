"""Records that travel between stages.

Every stage is a plain function: a record in, a record or a ``Rejection`` out. Errors are values, not
exceptions, so one bad video never stops a run, and every candidate clip ends with exactly one row in the
clips table. Records are frozen dataclasses of plain values so that they pickle, hash and print cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixels: top-left corner (x, y), width w and height h."""

    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Candidate:
    """One candidate clip: a time range of one source video, before any processing.

    ``start_s``/``end_s`` are seconds in the source video (``end_s=None``: until the end of the video).
    ``annotated_box`` is a crop box given by the dataset (HDTF ``crop_wh``) at ``annotated_height``
    pixels of frame height; it is scaled to the file's real size once the file is probed. ``crop_ratio``
    zooms the landmark-derived box used when no annotated box exists. ``notes`` lists annotation
    anomalies that did not prevent processing (e.g. ``crop_box_missing``); ``reject_reason`` is set when the
    candidate cannot be processed at all (e.g. ``missing_source``).

    Dataset-layout fields (``preprocess/datasets/vfhq.py``, ``preprocess/datasets/mead.py``; None for the other datasets):
    ``audio_source`` is a separate audio file to take the clip's audio from instead of the video's own track
    (MEAD's microphone recording), cut over the same ``start_s``/``end_s``; ``annotation_file`` is the dataset file
    the candidate was read from (VFHQ's per-clip meta-info, which also holds the per-frame landmarks:
    ``preprocess.datasets.vfhq.read_frame_landmarks``); ``subject``, ``emotion`` and ``emotion_level`` are the recorded
    speaker, acted emotion and its intensity (MEAD: ``M003``, ``angry``, 1-3), copied into the clips table.
    """

    candidate_id: str
    source: str
    dataset: str
    start_s: float = 0.0
    end_s: float | None = None
    annotated_box: CropBox | None = None
    annotated_height: int | None = None
    crop_ratio: float | None = None
    notes: tuple[str, ...] = ()
    reject_reason: str | None = None
    reject_detail: str = ""
    audio_source: str | None = None
    annotation_file: str | None = None
    subject: str | None = None
    emotion: str | None = None
    emotion_level: int | None = None


@dataclass(frozen=True)
class AnnotationIssue:
    """One anomaly found while reading dataset annotation files (kept in ``annotation_issues.parquet``)."""

    file: str
    line: int  # 1-based line number, 0 when the issue concerns the whole file
    kind: str  # machine-readable, e.g. "bom", "trailing_space", "resolution_zero"
    subject: str  # the video or clip name it concerns, "" if none
    detail: str = ""


@dataclass(frozen=True)
class Rejection:
    """Why a candidate or clip was not kept. ``reason`` is a short stable code; ``detail`` is for humans."""

    stage: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """Facts about a source video. Sizes are the *displayed* size (rotation metadata applied)."""

    path: str
    width: int
    height: int
    rotation: int  # degrees, as stored in the display matrix / rotate tag (0, 90, 180, 270)
    fps: float  # average frame rate
    variable_frame_rate: bool
    duration_s: float
    pix_fmt: str
    bit_depth: int
    video_codec: str
    audio_codec: str
    audio_sample_rate: int
    audio_channels: int
    n_video_streams: int
    n_audio_streams: int
    size_bytes: int
    notes: tuple[str, ...] = field(default=())
