"""The landmark-based AU estimator responds in the right direction and ignores scale and pose; a learned
detector (a torch.export program) plugs into the same interface."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from preprocess.video.face_models import mesh_landmarks, new_face_mesh
from preprocess.video.head_pose import rotation_matrix
from preprocess.visual.action_units import GEOMETRIC_AU_NAMES, ExportedAUs, GeometricAUs

AU = dict(zip(GEOMETRIC_AU_NAMES, range(len(GEOMETRIC_AU_NAMES)), strict=True))


@pytest.fixture(scope="module")
def face():
    return cv2.resize(np.ascontiguousarray(data.astronaut()[0:300, 80:380]), (512, 512))


@pytest.fixture(scope="module")
def measure():
    mesh = new_face_mesh(video_mode=False, refine_landmarks=True)
    estimator = GeometricAUs()

    def aus(image):
        landmarks = mesh_landmarks(mesh, np.ascontiguousarray(image))
        assert landmarks is not None
        return estimator.estimate(landmarks[None])[0], landmarks

    return aus


def _warp_vertically(image, shift):
    """Move pixels by ``shift`` (H, W) pixels downwards (negative: upwards)."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return cv2.remap(image, xs, ys - shift.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def test_opened_mouth_raises_jaw_drop_and_lips_part(face, measure):
    base, landmarks = measure(face)
    height, width = face.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    lip_y, mouth_x = landmarks[14, 1] * height, (landmarks[61, 0] + landmarks[291, 0]) / 2 * width
    # everything below the lips moves 25 px down, fading out sideways: the jaw opens
    shift = np.clip((ys - lip_y) / 15, 0, 1) * 25 * np.exp(-(((xs - mouth_x) / 90) ** 2))
    opened, _ = measure(_warp_vertically(face, shift))
    print("opened mouth AU change:", dict(zip(GEOMETRIC_AU_NAMES, (opened - base).round(3), strict=True)))
    assert opened[AU["AU26"]] > base[AU["AU26"]] + 0.05
    assert opened[AU["AU25"]] > base[AU["AU25"]] + 0.05
    assert abs(opened[AU["AU01"]] - base[AU["AU01"]]) < 0.02  # brows untouched


def test_raised_brows_raise_brow_raisers(face, measure):
    base, landmarks = measure(face)
    height = face.shape[0]
    ys = np.mgrid[0:height, 0:face.shape[1]][0]
    eye_y, brow_y = landmarks[159, 1] * height, landmarks[105, 1] * height
    # the band from the brows to the eyes' upper lids moves 12 px up: brows raise, eyes stay
    shift = -np.clip((eye_y - 8 - ys) / 15, 0, 1) * 12 * np.clip((ys - (brow_y - 60)) / 30, 0, 1)
    raised, _ = measure(_warp_vertically(face, shift))
    print("raised brow AU change:", dict(zip(GEOMETRIC_AU_NAMES, (raised - base).round(3), strict=True)))
    assert raised[AU["AU01"]] > base[AU["AU01"]] + 0.02
    assert raised[AU["AU02"]] > base[AU["AU02"]] + 0.02
    assert abs(raised[AU["AU25"]] - base[AU["AU25"]]) < 0.02  # mouth untouched


def test_values_do_not_depend_on_image_scale(face, measure):
    base, _ = measure(face)
    smaller = np.zeros_like(face)
    smaller[128:384, 128:384] = cv2.resize(face, (256, 256))  # the face at half size in the frame
    half, _ = measure(smaller)
    np.testing.assert_allclose(half, base, atol=0.04)


def test_values_do_not_depend_on_head_pose(face, measure):
    base, landmarks = measure(face)
    points = landmarks.astype(np.float64) * [1, -1, -1]  # camera axes
    centre = points.mean(axis=0)
    turned = (points - centre) @ rotation_matrix(25, -10, 8).T + centre
    rotated = GeometricAUs().estimate((turned * [1, -1, -1])[None])[0]
    np.testing.assert_allclose(rotated, base, atol=1e-4)


def test_no_face_rows_stay_nan():
    assert np.isnan(GeometricAUs().estimate(np.full((3, 478, 3), np.nan))).all()


def test_exported_model_backend_fills_the_same_table(face, measure, tmp_path):
    class TinyAUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 4)

        def forward(self, crops: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(crops.mean(dim=(2, 3))))

    path = tmp_path / "au.pt2"
    example = torch.rand(2, 3, 64, 64)
    program = torch.export.export(TinyAUNet(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    backend = ExportedAUs(path, au_names=("AU01", "AU06", "AU12", "AU25"), input_size=64)
    _, landmarks = measure(face)
    frames = np.stack([face, face])
    values = backend.estimate(np.stack([landmarks, np.full_like(landmarks, np.nan)]), frames)
    assert values.shape == (2, 4) and np.isfinite(values[0]).all() and np.isnan(values[1]).all()
    with pytest.raises(FileNotFoundError, match="torch.export.save"):
        ExportedAUs(tmp_path / "missing.pt2", au_names=("AU01",))
