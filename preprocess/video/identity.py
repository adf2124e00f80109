"""Identity change within a piece: is the tracked face the same person throughout?

Issue 14 item 4: a piece where the face mesh follows one person, then another (a cut to another speaker that
the shot detector missed, two people shown alternately in one shot, HDTF windows that are not single shots)
teaches lip sync from the wrong face. The reference pipeline (LatentSync ``preprocess/``) has no such check; it
relies on shot detection alone. Here each piece gets a score, ``identity_change``, recorded in the clips table; it
rejects over ``filters.max_identity_change`` only with ``filters.reject_identity_change`` (off by default: see
below).

The signature is behind a small interface, :class:`IdentityModel` (per-frame signatures, pairwise distances),
so that a face-embedding model (ArcFace-style, fed the face crops that ``preprocess.video.frame_quality`` decodes
anyway) can replace the default without touching the filter. The default, :class:`LandmarkGeometry`, needs
no model: from the stored MediaPipe mesh (``landmarks.npy``, (n_frames, 478, 3), x/y normalised to the 512 px
frame, z on the same scale) it measures 3D distances between points that expressions barely move (eye
corners, nose bridge, nose tip and base, nose wings, cheek contour, forehead; no mouth, jaw or brow points),
divides each by the outer eye-corner span (scale) and takes logs. 3D distances do not change when the head
turns (a rigid motion), so the ratios are pose-normalised as far as MediaPipe's depth estimate is right; two
people differ in these proportions by several percent to tens of percent.

The score of a piece: its face frames are grouped into windows of ``window_frames`` consecutive frames, each
window's signature is the per-ratio median of its frames (smooths mesh jitter and blinks), and the score is the
``percentile``-th percentile of the pairwise distances between window signatures. Distance for the landmark
signature: root mean square of the log-ratio differences, i.e. roughly the typical relative difference of the
facial proportions (0.05 = 5%). With the 80th percentile a second face that fills at least ~11% of the windows
raises the score to the full distance between the two faces (2p(1-p) of the pairs are mixed ones), while a
single bad window (a mesh glitch) does not. Deviation: the threshold (``max_identity_change``) was set on
generated clips (a still photo: score ~0.01; the same face stretched 1.3x in one axis against it: ~0.15);
calibrate it on real footage, where talking, blinking and turning add noise, with the stored column (its
distribution over kept pieces; docs/pipeline.md), before turning rejection on: until then it records only.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

# (name, landmark a, landmark b) in MediaPipe face-mesh numbering; the first pair is the scale.
STABLE_DISTANCES = (
    ("eye_span", 33, 263),  # outer eye corners
    ("inner_eye_gap", 133, 362),
    ("right_eye_width", 33, 133),
    ("left_eye_width", 362, 263),
    ("nose_bridge_to_tip", 168, 1),
    ("nose_bridge_to_base", 168, 2),
    ("nose_width", 98, 327),
    ("face_width", 234, 454),  # cheek contour at eye level
    ("forehead_height", 10, 168),
    ("right_eye_to_nose_tip", 33, 1),
    ("left_eye_to_nose_tip", 263, 1),
)


class IdentityModel(Protocol):
    """What the identity-change filter needs from a face-identity model."""

    name: str

    def signatures(self, landmarks: np.ndarray) -> np.ndarray:
        """(n_frames, d) signatures from (n_frames, n_landmarks, 3) landmarks; NaN rows where there is no face."""

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) distances between signatures; 0 for the same face."""


class LandmarkGeometry:
    """Log-ratios of stable 3D facial distances to the outer eye-corner span (see the module docstring)."""

    name = "landmark_geometry"

    def signatures(self, landmarks: np.ndarray) -> np.ndarray:
        points = np.asarray(landmarks, np.float64)
        lengths = np.stack([np.linalg.norm(points[:, a] - points[:, b], axis=-1) for _, a, b in STABLE_DISTANCES],
                           axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(lengths[:, 1:] / lengths[:, :1])

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.mean((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))


IDENTITY_MODELS: dict[str, type] = {LandmarkGeometry.name: LandmarkGeometry}


def identity_model(name: str) -> IdentityModel:
    if name not in IDENTITY_MODELS:
        raise ValueError(f"unknown identity model {name!r} (filters.identity.model); choose one of "
                         f"{sorted(IDENTITY_MODELS)}")
    return IDENTITY_MODELS[name]()


def window_signatures(signatures: np.ndarray, window_frames: int) -> np.ndarray:
    """(n_windows, d) median signature of each window of ``window_frames`` consecutive frames that has a face
    in at least half of its frames (windows without enough face frames are left out)."""
    rows = []
    for start in range(0, len(signatures), window_frames):
        window = signatures[start:start + window_frames]
        valid = window[np.isfinite(window).all(axis=1)]
        if len(valid) and len(valid) * 2 >= len(window):
            rows.append(np.median(valid, axis=0))
    return np.asarray(rows).reshape(len(rows), signatures.shape[1])


def identity_change(model: IdentityModel, landmarks: np.ndarray, window_frames: int, percentile: float,
                    min_windows: int) -> float | None:
    """The piece's identity-change score (the ``percentile``-th percentile of pairwise window distances) from its
    (n_frames, n_landmarks, 3) landmarks; None when fewer than ``min_windows`` windows have a face."""
    windows = window_signatures(model.signatures(landmarks), window_frames)
    if len(windows) < max(2, min_windows):
        return None
    pairwise = model.distances(windows, windows)[np.triu_indices(len(windows), k=1)]
    return round(float(np.percentile(pairwise, percentile)), 4)
