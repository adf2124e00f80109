"""Stage: the picture-quality measures of the standardised clip (shot cuts and sharpness).

Every 512x512 frame is measured as standardise's own decode produces it (:class:`FrameQualityMeter` is handed
each frame with its landmarks from the face mesh, ``preprocess.video.standardise``; no decode of its own), and gives:

- its content score against the previous frame (``preprocess.video.shots``: PySceneDetect's ContentDetector figure
  on a frame shrunk to ``analysis_size``), for the shot cuts; every frame, so that a cut is placed on the exact
  frame (sampling every 2nd frame would leave a frame of the next shot in the piece half the time);
- at ``sharpness_fps`` (every 5th frame at 25 fps), when the face mesh found a face in it: the sharpness of the
  face, the variance of the Laplacian (OpenCV's 3x3 aperture) of the face crop in grey, resized to
  ``sharpness_crop_px`` square so that clips are comparable whatever the face's size in the crop. The crop is
  the square around the frame's landmarks (``landmarks.npy``, their x/y extent, the larger side, centred).
  Laplacian variance is the usual cheap focus measure (Pech-Pacheco et al. 2000); a blurred or heavily
  compressed face has little second-derivative energy. Its scale depends on content (skin, beard, lighting), so
  the threshold ``filters.min_sharpness`` is off by default: set it from the column's distribution.

Outputs (in the stage's cache folder): ``content_scores.npy`` (n_frames,) float32, 0 for frame 0, and
``sharpness.npy`` (n_frames,) float32, NaN on frames not sampled or without a face. The piece statistics take
medians over a piece's frames (``preprocess.video.filters.piece_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from preprocess.run.job import decode, rejected
from preprocess.run.media import FfmpegError, iter_rgb_frames
from preprocess.run.records import Rejection
from preprocess.run.settings import FrameQualitySettings, MediaTimeouts
from preprocess.run.stage import Stage
from preprocess.video.linked import linked_from_standardise
from preprocess.video.shots import CONTENT_WEIGHTS

CONTENT_SCORES_FILE = "content_scores.npy"
SHARPNESS_FILE = "sharpness.npy"


@dataclass(frozen=True)
class FrameQuality:
    content_scores: str  # file names inside the stage's output directory
    sharpness: str
    n_frames: int
    n_sharpness_frames: int  # frames whose face sharpness was measured


def face_sharpness(frame_rgb: np.ndarray, landmarks: np.ndarray, crop_px: int) -> float | None:
    """Laplacian variance of the grey face crop (square around the (n, 3) normalised landmarks, resized to
    ``crop_px``); None when the landmarks are missing or the box is empty."""
    if not np.isfinite(landmarks[:, :2]).all():
        return None
    height, width = frame_rgb.shape[:2]
    xs, ys = landmarks[:, 0] * width, landmarks[:, 1] * height
    side = max(xs.max() - xs.min(), ys.max() - ys.min())
    centre_x, centre_y = (xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2
    x0, x1 = int(max(0, round(centre_x - side / 2))), int(min(width, round(centre_x + side / 2)))
    y0, y1 = int(max(0, round(centre_y - side / 2))), int(min(height, round(centre_y + side / 2)))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    grey = cv2.cvtColor(np.ascontiguousarray(frame_rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    # area resampling for shrinking (no aliasing that would add fake detail), cubic for the rare enlargement
    interpolation = cv2.INTER_AREA if grey.shape[0] >= crop_px else cv2.INTER_CUBIC
    grey = cv2.resize(grey, (crop_px, crop_px), interpolation=interpolation)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


_WEIGHTS = np.asarray(CONTENT_WEIGHTS)


def _content_score(previous_hsv: np.ndarray, current_hsv: np.ndarray) -> float:
    """``preprocess.video.shots.content_score`` of two uint8 HSV frames (``shots.hsv_frame`` without its int16 copy), by
    OpenCV: |a - b| of uint8 needs no widening in ``cv2.absdiff``, and ``cv2.mean`` averages per channel. The same
    figure (a test compares them), about 30x faster than numpy's int16 path, which cost 1-2 ms a frame here: as
    much as the face mesh itself."""
    deltas = np.asarray(cv2.mean(cv2.absdiff(current_hsv, previous_hsv))[:3])
    return float((deltas * _WEIGHTS).sum() / np.abs(_WEIGHTS).sum())


class FrameQualityMeter:
    """The measures of one clip at ``fps``, fed its frames in order (:meth:`add`, with the frame's landmarks);
    :meth:`save` writes the two arrays."""

    def __init__(self, fps: int, settings: FrameQualitySettings) -> None:
        self._settings = settings
        self._step = max(1, int(round(fps / settings.sharpness_fps)))
        self._scores: list[float] = []
        self._sharpness: list[float] = []
        self._previous: np.ndarray | None = None

    def add(self, frame_rgb: np.ndarray, landmarks: np.ndarray | None) -> None:
        """``landmarks``: the frame's (n_landmarks, 3) normalised landmarks (NaN rows or None: no face)."""
        small = cv2.resize(frame_rgb, (self._settings.analysis_size,) * 2, interpolation=cv2.INTER_AREA)
        current = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        self._scores.append(0.0 if self._previous is None else _content_score(self._previous, current))
        self._previous = current
        value = None
        if len(self._sharpness) % self._step == 0 and landmarks is not None:
            value = face_sharpness(frame_rgb, landmarks, self._settings.sharpness_crop_px)
        self._sharpness.append(np.nan if value is None else value)

    def save(self, out_dir: Path) -> FrameQuality | Rejection:
        if not self._scores:
            return Rejection("frame_quality", "no_frames", "the standardised clip has no frames")
        np.save(out_dir / CONTENT_SCORES_FILE, np.asarray(self._scores, np.float32))
        np.save(out_dir / SHARPNESS_FILE, np.asarray(self._sharpness, np.float32))
        return FrameQuality(CONTENT_SCORES_FILE, SHARPNESS_FILE, len(self._scores),
                            int(np.isfinite(self._sharpness).sum()))


def measure_frame_quality(video: Path, size: int, fps: int, landmarks: np.ndarray, settings: FrameQualitySettings,
                          out_dir: Path, limits: MediaTimeouts | None = None) -> FrameQuality | Rejection:
    """Content scores and face sharpness of a finished clip ``video`` (``size`` square at ``fps``), decoded again,
    with its per-frame ``landmarks`` (n_frames, n_landmarks, 3) (the pipeline measures standardise's own frames
    instead; see the module docstring)."""
    meter = FrameQualityMeter(fps, settings)
    try:
        for index, frame in enumerate(iter_rgb_frames(video, width=size, height=size, limits=limits)):
            meter.add(frame, landmarks[index] if index < len(landmarks) else None)
    except FfmpegError as error:  # a verdict on the input only: a timeout or a full disk propagates
        return Rejection("frame_quality", "undecodable", str(error))
    return meter.save(out_dir)


# ---------------------------------------------------------------- the stage: measured on standardise's decode


def _frame_quality_finish(job, entry: dict, settings, workspace):
    result = decode(entry, FrameQuality)
    return rejected(job, result) if isinstance(result, Rejection) else job


STAGE = Stage(
    name="frame_quality", version=2, group="video", finish=_frame_quality_finish,
    key_parts=lambda job, settings, workspace: [job.standardise_key, job.faces_key,
                                                settings.filters.frame_quality.fingerprint()],
    run=lambda job, settings, workspace, out_dir: linked_from_standardise(
        workspace, job.standardise_key, "frame_quality", (CONTENT_SCORES_FILE, SHARPNESS_FILE), out_dir))
