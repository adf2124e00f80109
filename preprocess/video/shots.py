"""Shot cuts: an equivalent of PySceneDetect's ``ContentDetector`` (https://scenedetect.com, BSD-3).

The reference pipeline (LatentSync ``preprocess/``) splits every video into shots with PySceneDetect's content
detector before anything else. PySceneDetect cannot be installed here: ``scenedetect`` requires
``opencv-python``, whose ``cv2/`` would overwrite the ``opencv-contrib-python`` one that MediaPipe depends on. So
this module computes the same figure with the cv2 we have:

- the *content score* of frame i is the mean absolute difference between frames i-1 and i in HSV (OpenCV's
  8-bit HSV: hue 0-179, saturation and value 0-255), per channel, averaged with PySceneDetect's default weights
  (hue 1, saturation 1, luma/value 1, edges 0: the edge term is off by default there too);
- frames are first shrunk to ``analysis_size`` pixels square (area resampling): PySceneDetect's automatic
  downscaling brings frames to about 256 px wide before scoring, and a mean of absolute differences barely
  depends on the resolution;
- a cut is declared at frame i (the first frame of the new shot) when its score is at or above ``threshold``
  (PySceneDetect's default 27) and at least ``min_shot_frames`` frames (its ``min_scene_len``, default 15)
  have passed since the previous cut; the first cut may come at any frame, as in PySceneDetect.

Deviations: PySceneDetect's newer flash filter may *merge* cuts closer than ``min_scene_len`` instead of
dropping the later one; here the later one is dropped (its 0.6.0 behaviour). Like the content detector, this
finds hard cuts only: slow fades and dissolves change each frame too little (PySceneDetect has other detectors
for those).

The score is computed on the standardised 512x512 clip, not on the source: a cut replaces the whole picture,
so the face-centred square crop changes just as much as the full frame does (a change confined to the
background outside the crop is, for the training clip, no cut at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import cv2
import numpy as np

# PySceneDetect's default ContentDetector weights: (hue, saturation, value); the edge weight is 0.
CONTENT_WEIGHTS = (1.0, 1.0, 1.0)


def hsv_frame(frame_rgb: np.ndarray, analysis_size: int) -> np.ndarray:
    """(analysis_size, analysis_size, 3) int16 HSV of an RGB uint8 frame (OpenCV ranges: H 0-179, S, V 0-255);
    int16 so that differences do not wrap around."""
    small = cv2.resize(frame_rgb, (analysis_size, analysis_size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.int16)


def content_score(previous_hsv: np.ndarray, current_hsv: np.ndarray) -> float:
    """PySceneDetect's content value between two HSV frames: weighted mean of per-channel mean |difference|."""
    deltas = np.abs(current_hsv - previous_hsv).reshape(-1, 3).mean(axis=0)
    weights = np.asarray(CONTENT_WEIGHTS)
    return float((deltas * weights).sum() / np.abs(weights).sum())


def find_cuts(scores: np.ndarray, threshold: float, min_shot_frames: int) -> list[int]:
    """Frames at which a new shot starts, ascending, from per-frame content scores (n_frames,) where
    ``scores[i]`` compares frame i with frame i-1 (``scores[0]`` is 0 or NaN: no previous frame)."""
    cuts: list[int] = []
    for index in np.flatnonzero(np.nan_to_num(np.asarray(scores, np.float64), nan=0.0) >= threshold):
        index = int(index)
        if index == 0:
            continue
        if not cuts or index - cuts[-1] >= min_shot_frames:
            cuts.append(index)
    return cuts


def shot_ranges(n_frames: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """The shots [start, end) between cuts (cuts outside (0, n_frames) are ignored)."""
    bounds = [0, *sorted({int(cut) for cut in cuts if 0 < cut < n_frames}), n_frames]
    return [(start, end) for start, end in pairwise(bounds) if end > start]
