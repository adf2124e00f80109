"""Stage: per-frame face landmarks and head pose on the standardised 512x512 clip.

Every frame goes through MediaPipe's face mesh in video mode (478 landmarks with irises); frames without a
face get NaN rows, so arrays always have one row per video frame. Pose comes from the landmarks
(``preprocess.video.head_pose``).

The mesh runs on the frames of standardise's own decode (:class:`FaceMeshTracker` is handed each 512x512 frame
as it goes to the encoder, ``preprocess.video.standardise``), not on a second decode of ``clip.mp4``: frame ``f`` of the
arrays is frame ``f`` of the clip, seen before x264's (CRF 18) compression. :func:`track_faces` runs the same
tracker over a decode of a finished clip (tests compare the two).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from preprocess.run.job import decode, rejected
from preprocess.run.media import FfmpegError, iter_rgb_frames
from preprocess.run.records import Rejection
from preprocess.run.settings import FaceSettings, MediaTimeouts
from preprocess.run.stage import Stage
from preprocess.video.face_models import mediapipe_version, mesh_landmarks, new_face_mesh
from preprocess.video.head_pose import head_pose_from_landmarks
from preprocess.video.linked import linked_from_standardise

LANDMARKS_FILE = "landmarks.npy"
POSE_FILE = "pose.npy"


@dataclass(frozen=True)
class FaceTrack:
    landmarks: str  # file names inside the stage's output directory
    pose: str
    n_frames: int
    n_landmarks: int


class FaceMeshTracker:
    """The face mesh of one clip, fed its frames in order: :meth:`add` gives each frame's (n_landmarks, 3)
    float32 normalised landmarks (NaN rows without a face), :meth:`save` writes the clip's arrays. One tracker
    per clip (video mode carries the face from frame to frame); :meth:`close` frees the MediaPipe graph."""

    def __init__(self, settings: FaceSettings) -> None:
        self.n_landmarks = 478 if settings.refine_landmarks else 468
        self._missing = np.full((self.n_landmarks, 3), np.nan, np.float32)
        self._rows: list[np.ndarray] = []
        self._face_mesh = new_face_mesh(
            video_mode=True, refine_landmarks=settings.refine_landmarks,
            min_detection_confidence=settings.min_detection_confidence,
            min_tracking_confidence=settings.min_tracking_confidence,
        )

    def add(self, frame_rgb: np.ndarray) -> np.ndarray:
        landmarks = mesh_landmarks(self._face_mesh, frame_rgb)
        row = landmarks if landmarks is not None else self._missing
        self._rows.append(row)
        return row

    @property
    def n_frames(self) -> int:
        return len(self._rows)

    def save(self, out_dir: Path) -> FaceTrack | Rejection:
        """``landmarks.npy`` (n_frames, n_landmarks, 3) float16 and ``pose.npy`` (n_frames, 3) float32."""
        if not self._rows:
            return Rejection("faces", "no_frames", "the standardised clip has no frames")
        landmarks = np.stack(self._rows)
        np.save(out_dir / LANDMARKS_FILE, landmarks.astype(np.float16))
        np.save(out_dir / POSE_FILE, head_pose_from_landmarks(landmarks).astype(np.float32))
        return FaceTrack(LANDMARKS_FILE, POSE_FILE, len(self._rows), self.n_landmarks)

    def close(self) -> None:
        self._face_mesh.close()


def track_frames(frames: Iterable[np.ndarray], settings: FaceSettings, out_dir: Path) -> FaceTrack | Rejection:
    """The face track of RGB ``frames`` (a clip's, in order), saved in ``out_dir``."""
    tracker = FaceMeshTracker(settings)
    try:
        for frame in frames:
            tracker.add(frame)
    finally:
        tracker.close()
    return tracker.save(out_dir)


def track_faces(
    video: Path, size: int, settings: FaceSettings, out_dir: Path, limits: MediaTimeouts | None = None
) -> FaceTrack | Rejection:
    """The face track of a finished ``size`` square clip, decoded again (the pipeline tracks standardise's own
    frames instead; see the module docstring)."""
    try:
        return track_frames(iter_rgb_frames(video, width=size, height=size, limits=limits), settings, out_dir)
    except FfmpegError as error:  # a verdict on the input only: a timeout, a kill or a full disk propagates
        return Rejection("faces", "undecodable", str(error))


# ---------------------------------------------------------------- the stage: the mesh ran on standardise's decode


def _faces_finish(job, entry: dict, settings, workspace):
    result = decode(entry, FaceTrack)
    return rejected(job, result) if isinstance(result, Rejection) else replace(job, faces=result,
                                                                                faces_key=entry["key"])


STAGE = Stage(
    name="faces", version=2, group="video", finish=_faces_finish,
    key_parts=lambda job, settings, workspace: [job.standardise_key, settings.faces.fingerprint(),
                                                settings.models.face_mesh, mediapipe_version()],
    # this entry is the arrays linked from standardise's entry
    run=lambda job, settings, workspace, out_dir: linked_from_standardise(
        workspace, job.standardise_key, "faces", (LANDMARKS_FILE, POSE_FILE), out_dir))
