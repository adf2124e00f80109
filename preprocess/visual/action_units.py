"""Facial action units (AUs) per frame, for SynchroRaMa's AU loss (paper 3.7).

The default estimator, ``GeometricAUs``, reads AUs off the MediaPipe face mesh the pipeline already has:
landmarks are rotated into the face's own frame (``head_pose.frontalise``), so head pose does not change the
measures, and every distance is divided by the inter-ocular distance (outer eye corners), so image scale and
face size do not either. Each AU is a geometric proxy, unitless, larger meaning more of the action:

| column | FACS action | measure |
| --- | --- | --- |
| AU01 | inner brow raiser | height of the inner brow ends above the inner eye corners |
| AU02 | outer brow raiser | height of the outer brow ends above the outer eye corners |
| AU04 | brow lowerer | 1 - gap between the inner brow ends (brows drawn together and down) |
| AU12 | lip corner puller | height of the mouth corners relative to the upper lip's inner edge |
| AU20 | lip stretcher | mouth width |
| AU25 | lips part | gap between the inner lips |
| AU26 | jaw drop | nose tip to chin distance |
| AU43 | eyes closed | 1 - eye aspect ratio / 0.3 (0.3 is a typical open eye) |

Limits: these are not FACS intensities (0-5) and have no per-person neutral baseline, so compare them
within a clip or a person, not across people (face shape shifts every measure); actions the mesh cannot
see (cheek raiser AU06, nose wrinkler AU09, dimpler AU14) are absent; accuracy falls with |yaw| beyond
~45 degrees, where half of the face is hidden. A learned detector plugs in through ``AUBackend``:
``ExportedAUs`` runs a user-supplied ``torch.export`` program (.pt2) on face crops and fills the same table
(an ONNX detector can be run the same way through onnxruntime by a backend of the same shape).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

import numpy as np

from preprocess.run.cache import file_fingerprint
from preprocess.run.media import iter_rgb_frames
from preprocess.run.stage import Stage
from preprocess.video.faces import LANDMARKS_FILE
from preprocess.video.head_pose import frontalise
from preprocess.video.standardise import VIDEO_FILE

GEOMETRIC_AU_NAMES = ("AU01", "AU02", "AU04", "AU12", "AU20", "AU25", "AU26", "AU43")

# MediaPipe face-mesh indices; "right"/"left" are the subject's.
RIGHT_EYE_OUTER, RIGHT_EYE_INNER, LEFT_EYE_OUTER, LEFT_EYE_INNER = 33, 133, 263, 362
RIGHT_BROW_INNER, RIGHT_BROW_OUTER, LEFT_BROW_INNER, LEFT_BROW_OUTER = 107, 70, 336, 300
RIGHT_EYE_UPPER, RIGHT_EYE_LOWER, LEFT_EYE_UPPER, LEFT_EYE_LOWER = 159, 145, 386, 374
MOUTH_RIGHT, MOUTH_LEFT, LIP_UPPER_INNER, LIP_LOWER_INNER = 61, 291, 13, 14
NOSE_TIP, CHIN = 1, 152
OPEN_EYE_ASPECT_RATIO = 0.3


class AUBackend(Protocol):
    """Anything that turns a clip's landmarks (and, if it needs them, its frames) into per-frame AUs."""

    name: str  # model reference recorded with every row
    au_names: tuple[str, ...]
    needs_frames: bool

    def estimate(self, landmarks: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """landmarks (T, N, 3) normalised, frames (T, H, W, 3) uint8 or None -> (T, len(au_names)) float32;
        NaN rows where no face was found."""
        ...


class GeometricAUs:
    name = "geometric-facemesh-v1"
    au_names = GEOMETRIC_AU_NAMES
    needs_frames = False

    def estimate(self, landmarks: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        points = frontalise(landmarks)  # (T, N, 3): x across, y up, z out of the face

        def distance(a: int, b: int) -> np.ndarray:
            return np.linalg.norm(points[:, a] - points[:, b], axis=-1)

        def height(a: int, b: int) -> np.ndarray:  # how far a is above b, along the face's up axis
            return points[:, a, 1] - points[:, b, 1]

        eye_span = distance(RIGHT_EYE_OUTER, LEFT_EYE_OUTER)
        inner_brow = (height(RIGHT_BROW_INNER, RIGHT_EYE_INNER) + height(LEFT_BROW_INNER, LEFT_EYE_INNER)) / 2
        outer_brow = (height(RIGHT_BROW_OUTER, RIGHT_EYE_OUTER) + height(LEFT_BROW_OUTER, LEFT_EYE_OUTER)) / 2
        brow_gap = distance(RIGHT_BROW_INNER, LEFT_BROW_INNER)
        # relative to the upper lip, which stays put when the jaw drops (the lower lip does not)
        corner_height = (points[:, MOUTH_RIGHT, 1] + points[:, MOUTH_LEFT, 1]) / 2 - points[:, LIP_UPPER_INNER, 1]
        eye_aspect = (distance(RIGHT_EYE_UPPER, RIGHT_EYE_LOWER) / distance(RIGHT_EYE_OUTER, RIGHT_EYE_INNER)
                      + distance(LEFT_EYE_UPPER, LEFT_EYE_LOWER) / distance(LEFT_EYE_OUTER, LEFT_EYE_INNER)) / 2
        values = np.stack([
            inner_brow / eye_span,
            outer_brow / eye_span,
            1.0 - brow_gap / eye_span,
            corner_height / eye_span,
            distance(MOUTH_RIGHT, MOUTH_LEFT) / eye_span,
            distance(LIP_UPPER_INNER, LIP_LOWER_INNER) / eye_span,
            distance(NOSE_TIP, CHIN) / eye_span,
            1.0 - eye_aspect / OPEN_EYE_ASPECT_RATIO,
        ], axis=-1)
        return values.astype(np.float32)


class ExportedAUs:
    """A learned AU detector supplied by the user as a ``torch.export`` program (``torch.export.save``, .pt2,
    with a dynamic batch dimension): it takes a float batch (B, 3, size, size) of face crops in [0, 1] and
    returns (B, len(au_names)) intensities."""

    needs_frames = True

    def __init__(self, path: Path, au_names: tuple[str, ...], input_size: int = 224, margin: float = 0.25):
        import torch

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"AU model {path} not found: export your detector with torch.export.save")
        self.model = torch.export.load(str(path)).module()
        self.name, self.au_names, self.input_size, self.margin = f"torch.export:{path.name}", au_names, input_size, margin

    def estimate(self, landmarks: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        import cv2
        import torch

        out = np.full((len(landmarks), len(self.au_names)), np.nan, np.float32)
        crops, rows = [], []
        for index, (points, frame) in enumerate(zip(landmarks, frames, strict=True)):
            if np.isnan(points).any():
                continue
            height, width = frame.shape[:2]
            x0, y0 = points[:, 0].min() * width, points[:, 1].min() * height
            x1, y1 = points[:, 0].max() * width, points[:, 1].max() * height
            pad = self.margin * max(x1 - x0, y1 - y0)
            box = [int(max(x0 - pad, 0)), int(max(y0 - pad, 0)), int(min(x1 + pad, width)), int(min(y1 + pad, height))]
            crop = cv2.resize(frame[box[1]:box[3], box[0]:box[2]], (self.input_size, self.input_size))
            crops.append(crop)
            rows.append(index)
        if crops:
            batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                out[rows] = self.model(batch).float().numpy()
        return out


# ---------------------------------------------------------------- the stage: on each kept piece's landmarks (and frames)

AUS_FILE = "aus.npy"


def au_backend(settings) -> AUBackend:
    """The configured AU estimator (a learned one loads once per process, like the other models)."""
    chosen = settings.visual.action_units
    if chosen.backend == "geometric":
        return GeometricAUs()
    if not chosen.exported_model or not chosen.exported_au_names:
        raise ValueError("visual.action_units.backend 'torch_export' needs exported_model and exported_au_names")
    return _exported_aus(chosen.exported_model, chosen.exported_au_names, chosen.exported_input_size)


@functools.lru_cache(maxsize=4)
def _exported_aus(path: str, au_names: tuple[str, ...], input_size: int) -> ExportedAUs:
    return ExportedAUs(Path(path), au_names, input_size)


def _au_key_parts(piece, settings, workspace) -> list:
    chosen = settings.visual.action_units
    if chosen.backend == "geometric":
        return [piece.content_key, chosen.fingerprint(), GeometricAUs.name]
    model = Path(chosen.exported_model or "")
    return [piece.content_key, chosen.fingerprint(), file_fingerprint(model) if model.is_file() else str(model)]


def _au_run(piece, settings, workspace, out_dir: Path) -> dict:
    backend = au_backend(settings)
    landmarks = np.load(Path(piece.files_dir) / LANDMARKS_FILE).astype(np.float32)
    frames = None
    if backend.needs_frames:
        size = settings.standardise.size
        frames = np.stack(list(iter_rgb_frames(Path(piece.files_dir) / VIDEO_FILE, width=size, height=size)))
    values = backend.estimate(landmarks, frames).astype(np.float32)
    np.save(out_dir / AUS_FILE, values)
    return {"file": AUS_FILE, "au_names": list(backend.au_names), "model": backend.name,
            "n_frames": len(values), "n_face_frames": int((~np.isnan(values).any(axis=1)).sum())}


def _preload_au_backend(settings) -> str:
    try:
        return au_backend(settings).name
    except Exception as error:
        raise RuntimeError(f"action-unit model ({settings.visual.action_units.backend}, "
                           f"{settings.visual.action_units.exported_model}) failed to load: "
                           f"{type(error).__name__}: {error}") from error


STAGE = Stage(name="action_units", version=1, group="visual", key_parts=_au_key_parts, run=_au_run,
              preload=_preload_au_backend)
