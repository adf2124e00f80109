"""Stage: per-frame face landmarks and head pose on the standardised 512x512 clip.

Every frame goes through MediaPipe's face mesh in video mode (478 landmarks with irises); frames without a
face get NaN rows, so arrays always have one row per video frame. Pose comes from the landmarks
(``preprocess.head_pose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.face_models import mesh_landmarks, new_face_mesh
from preprocess.head_pose import head_pose_from_landmarks
from preprocess.media import FfmpegError, iter_rgb_frames
from preprocess.records import Rejection
from preprocess.settings import FaceSettings, MediaTimeouts

LANDMARKS_FILE = "landmarks.npy"
POSE_FILE = "pose.npy"


@dataclass(frozen=True)
class FaceTrack:
    landmarks: str  # file names inside the stage's output directory
    pose: str
    n_frames: int
    n_landmarks: int


def track_faces(
    video: Path, size: int, settings: FaceSettings, out_dir: Path, limits: MediaTimeouts | None = None
) -> FaceTrack | Rejection:
    n_landmarks = 478 if settings.refine_landmarks else 468
    rows = []
    face_mesh = new_face_mesh(
        video_mode=True, refine_landmarks=settings.refine_landmarks,
        min_detection_confidence=settings.min_detection_confidence,
        min_tracking_confidence=settings.min_tracking_confidence,
    )
    try:
        for frame in iter_rgb_frames(video, width=size, height=size, limits=limits):
            landmarks = mesh_landmarks(face_mesh, frame)
            rows.append(landmarks if landmarks is not None else np.full((n_landmarks, 3), np.nan, np.float32))
    except FfmpegError as error:  # a verdict on the input only: a timeout, a kill or a full disk propagates
        return Rejection("faces", "undecodable", str(error))
    finally:
        face_mesh.close()
    if not rows:
        return Rejection("faces", "no_frames", "the standardised clip has no frames")
    landmarks = np.stack(rows)
    pose = head_pose_from_landmarks(landmarks)
    np.save(out_dir / LANDMARKS_FILE, landmarks.astype(np.float16))
    np.save(out_dir / POSE_FILE, pose.astype(np.float32))
    return FaceTrack(LANDMARKS_FILE, POSE_FILE, len(rows), n_landmarks)
