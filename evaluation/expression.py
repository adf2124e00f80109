"""E-FID's expression coefficients (paper section 4, "Evaluation Metrics": E-FID, following EchoMimic [1] and
[28], which take 3DMM expression parameters from Deep3DFaceRecon [4]).

That face-reconstruction model is not available here, so the default extractor, ``MeshExpression``, defines
expression coefficients from the MediaPipe face mesh the project already runs (``preprocess.video.face_models``),
exactly as follows, per frame t of a clip:

1. pose removed: the 478 landmarks are rotated into the face's own frame and centred on their mean
   (``preprocess.video.head_pose.frontalise``: x across the eyes, y chin to forehead, z out of the face);
2. scale removed: divided by that frame's inter-ocular distance (outer eye corners 33 and 263), then x100, so
   a coefficient is in percent of the eye span;
3. identity normalised: the clip's per-landmark median shape (over its frames with a face) is subtracted, so
   what is left is the deviation from this person's typical face in this clip. A clip-long constant
   expression (a smile held throughout) is absorbed into identity, as a 3DMM fit cannot separate it either
   from one clip without a neutral frame;
4. the x, y, z of 39 expression-bearing landmarks (``EXPRESSION_LANDMARKS``: outer and inner lips, eyelids and
   eye corners, brows, cheeks, chin) are the coefficients: ``(T, 117)``.

E-FID is then the Frechet distance (``evaluation.metrics.frechet_distance``) between the coefficients of all
generated frames and of all ground-truth frames. These numbers are comparable between runs of this tool, NOT
with the paper's E-FID (other coefficients, other units). A 3DMM-based extractor plugs in through
``ExpressionExtractor`` (e.g. one that runs Deep3DFaceRecon on the frames and returns its 64 expression
parameters); the evaluation records ``name`` with every number.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from preprocess.video.head_pose import LEFT_EYE_OUTER, RIGHT_EYE_OUTER, frontalise

# MediaPipe face-mesh indices (subject's right / left)
EXPRESSION_LANDMARKS = (
    61, 291, 0, 17, 37, 267, 84, 314, 40, 270, 91, 321,  # outer lips: corners, midlines, arcs
    13, 14, 78, 308, 82, 312, 87, 317,  # inner lips
    159, 145, 33, 133, 386, 374, 263, 362,  # eyelids and eye corners
    70, 105, 107, 300, 334, 336,  # brows: outer, middle, inner
    50, 280,  # cheeks (AU06-like raise)
    152, 148, 377,  # chin and jaw
)


class ExpressionExtractor(Protocol):
    """Per-frame expression coefficients of a clip."""

    name: str  # recorded with every E-FID number
    dim: int
    needs_frames: bool

    def coefficients(self, landmarks: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """landmarks ``(T, N, 3)`` normalised MediaPipe coordinates (NaN rows: no face), frames ``(T, H, W, 3)``
        uint8 or None -> ``(T, dim)`` float64, NaN rows where no face was found."""
        ...


class MeshExpression:
    """The face-mesh expression coefficients of the module docstring."""

    name = "facemesh-expression-v1 (frontalised, eye-span scaled, clip-median identity removed; 39 landmarks x3)"
    dim = 3 * len(EXPRESSION_LANDMARKS)
    needs_frames = False

    def coefficients(self, landmarks: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if landmarks.ndim != 3 or landmarks.shape[1] <= max(EXPRESSION_LANDMARKS):
            raise ValueError(f"expected face-mesh landmarks (T, 468 or 478, 3), got {landmarks.shape}")
        points = frontalise(landmarks)
        eye_span = np.linalg.norm(points[:, LEFT_EYE_OUTER] - points[:, RIGHT_EYE_OUTER], axis=-1)
        points = 100.0 * points / eye_span[:, None, None]
        face = ~np.isnan(points).any(axis=(1, 2))
        out = np.full((len(points), self.dim), np.nan)
        if face.any():
            identity = np.median(points[face], axis=0)
            out[face] = (points[face] - identity)[:, EXPRESSION_LANDMARKS].reshape(int(face.sum()), -1)
        return out
