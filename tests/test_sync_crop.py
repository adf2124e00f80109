"""The sync expert's framing (issue 22 b): ``model.syncnet.sync_crops`` and the filter's ``sync_frames`` cut each
frame as joonson/syncnet_python's ``run_pipeline.py`` ``crop_video`` does, from the face mesh's box.

``_reference_crops`` below is a line-by-line transcription of ``crop_video`` (commit 1fbfc08) minus its file
handling: ``dets`` from the track's boxes, ``signal.medfilt(kernel_size=13)``, ``cs = crop_scale = 0.4``,
``bsi = int(bs * (1 + 2 cs))`` of padding at 110, the slice, ``cv2.resize(face, (224, 224))``. The project's
code must give the same pixels, on synthetic boxes and on a real face's mesh box.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import signal

from model.syncnet import landmark_boxes, sync_crop_track, sync_crops
from preprocess.audio import sync_check

ROOT = Path(__file__).resolve().parents[1]
REAL_TALKING = next((path for path in (ROOT.parent / "shared" / "datasets" / "real_talking",
                                       Path("/work/shared/datasets/real_talking")) if path.is_dir()), None)


def _reference_crops(frames: np.ndarray, bboxes: np.ndarray, crop_scale: float = 0.4) -> np.ndarray:
    """syncnet_python ``crop_video``: ``track['bbox']`` rows are ``x1, y1, x2, y2``; returns the 224 crops."""
    dets = {"x": [], "y": [], "s": []}
    for det in bboxes:
        dets["s"].append(max((det[3] - det[1]), (det[2] - det[0])) / 2)
        dets["y"].append((det[1] + det[3]) / 2)
        dets["x"].append((det[0] + det[2]) / 2)
    dets["s"] = signal.medfilt(dets["s"], kernel_size=13)
    dets["x"] = signal.medfilt(dets["x"], kernel_size=13)
    dets["y"] = signal.medfilt(dets["y"], kernel_size=13)
    out = []
    for fidx, image in enumerate(frames):
        cs = crop_scale
        bs = dets["s"][fidx]
        bsi = int(bs * (1 + 2 * cs))
        frame = np.pad(image, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=(110, 110))
        my = dets["y"][fidx] + bsi
        mx = dets["x"][fidx] + bsi
        face = frame[int(my - bs):int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
        out.append(cv2.resize(face, (224, 224)))
    return np.stack(out)


def _landmarks_with_extent(boxes: np.ndarray, width: int, height: int, rng) -> np.ndarray:
    """``(T, 478, 3)`` normalised points whose x / y extent is each box exactly (two corners, the rest inside)."""
    t = len(boxes)
    u = rng.uniform(size=(t, 478, 2))
    points = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
    points[:, 0], points[:, 1] = boxes[:, :2], boxes[:, 2:]
    return np.concatenate([points / (width, height), rng.uniform(-0.1, 0.1, (t, 478, 1))], axis=2)


def _drifting_boxes(t: int, rng) -> np.ndarray:
    """A face box ``x1, y1, x2, y2`` on a 512 clip that drifts and jitters, with one wild frame."""
    cx = 256 + np.cumsum(rng.normal(0, 2, t))
    cy = 230 + np.cumsum(rng.normal(0, 2, t))
    w = 250 + rng.normal(0, 6, t)
    h = 290 + rng.normal(0, 6, t)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    boxes[t // 2] += (60, -40, 90, 10)  # one bad frame: the median filter removes it
    return boxes


def test_sync_crops_match_crop_video_on_synthetic_boxes():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (40, 512, 512, 3), dtype=np.uint8)
    boxes = _drifting_boxes(40, rng)
    landmarks = _landmarks_with_extent(boxes, 512, 512, rng).astype(np.float32)
    np.testing.assert_allclose(landmark_boxes(landmarks, 512, 512), boxes, atol=1e-3)
    track = sync_crop_track(boxes)
    assert abs(track.x[20] - (boxes[20, 0] + boxes[20, 2]) / 2) > 0  # smoothed, not raw
    np.testing.assert_array_equal(sync_crops(frames, None, 224)[0], cv2.resize(frames[0], (224, 224)))
    ours = sync_crops(frames, landmarks.astype(np.float64), 224)
    np.testing.assert_array_equal(ours, _reference_crops(frames, boxes))


def test_frames_without_a_face_are_filled_as_track_shot_interpolates():
    rng = np.random.default_rng(1)
    boxes = _drifting_boxes(30, rng)
    holes = boxes.copy()
    holes[[0, 1, 10, 11, 12, 29]] = np.nan
    filled = boxes.copy()
    for k in range(4):  # interp1d between detections, the nearest box held at the ends
        known = ~np.isnan(holes[:, k])
        filled[:, k] = np.interp(np.arange(30), np.flatnonzero(known), holes[known, k])
    track = sync_crop_track(holes)
    reference = sync_crop_track(filled)
    for name in ("s", "x", "y"):
        np.testing.assert_allclose(getattr(track, name), getattr(reference, name))
    assert sync_crop_track(np.full((5, 4), np.nan)) is None


def test_the_filter_feeds_the_expert_syncnet_python_crops(tmp_path, monkeypatch):
    """``sync_frames`` (what ``check_sync`` feeds the expert) with the piece's ``landmarks.npy``."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (20, 512, 512, 3), dtype=np.uint8)
    boxes = _drifting_boxes(20, rng)
    np.save(tmp_path / "landmarks.npy", _landmarks_with_extent(boxes, 512, 512, rng).astype(np.float16))
    monkeypatch.setattr(sync_check, "iter_rgb_frames", lambda *args, **kwargs: iter(frames))
    fed = sync_check.sync_frames(tmp_path / "clip.mp4", 512, 224, None, tmp_path / "landmarks.npy")
    reference = _reference_crops(frames, landmark_boxes(np.load(tmp_path / "landmarks.npy"), 512, 512))
    np.testing.assert_array_equal(fed, reference)
    no_file = sync_check.sync_frames(tmp_path / "clip.mp4", 512, 224, None, tmp_path / "missing.npy")
    np.testing.assert_array_equal(no_file[3], cv2.resize(frames[3], (224, 224)))  # no landmarks: the whole frame


@pytest.mark.skipif(REAL_TALKING is None, reason="needs the shared real_talking clips beside the checkout")
def test_on_a_real_face_the_crop_is_crop_videos_and_frames_the_mouth_as_it_does():
    from preprocess.run.media import iter_rgb_frames
    from preprocess.video.face_models import mesh_landmarks, new_face_mesh

    frames = []
    for frame in iter_rgb_frames(REAL_TALKING / "speaker_1.mp4", width=700, height=700):
        frames.append(frame)
        if len(frames) == 16:
            break
    frames = np.stack(frames)
    mesh = new_face_mesh(video_mode=True, refine_landmarks=True)
    try:
        landmarks = np.stack([mesh_landmarks(mesh, frame) for frame in frames])
    finally:
        mesh.close()
    boxes = landmark_boxes(landmarks, 700, 700)
    ours = sync_crops(frames, landmarks, 224)
    np.testing.assert_array_equal(ours, _reference_crops(frames, boxes))
    # the crop's frame: the box centre at 1/2.8 of the height, the mouth (landmark 13) in the lower half, centred
    track = sync_crop_track(boxes)
    s, x, y = track.s[8], track.x[8], track.y[8]
    mouth = landmarks[8, 13, :2] * 700
    mouth_row = (mouth[1] - (y - s)) / (2.8 * s)
    mouth_col = (mouth[0] - (x - 1.4 * s)) / (2.8 * s)
    print(f"box half-size {s:.1f} px, mouth at {mouth_row:.2f} of the crop's height, {mouth_col:.2f} of its width")
    assert 0.45 < mouth_row < 0.75 and 0.4 < mouth_col < 0.6
    assert not np.array_equal(ours[8], cv2.resize(frames[8], (224, 224)))
