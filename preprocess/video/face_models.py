"""MediaPipe models (the legacy ``mp.solutions``, whose .tflite files ship inside the wheel, so they run offline).

The face detector is stateless and is created once per worker thread. The face mesh is created once per
clip, because in video mode it tracks the face from frame to frame and that state must not leak between
clips; building one costs about 25 ms.
"""

from __future__ import annotations

import os
import threading

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging is noisy at INFO

import mediapipe as mp  # noqa: E402

_thread_local = threading.local()


def face_detector(min_confidence: float):
    """The thread's full-range BlazeFace detector (finds several, smaller faces; ``model_selection=1``)."""
    detectors = getattr(_thread_local, "detectors", None)
    if detectors is None:
        detectors = _thread_local.detectors = {}
    if min_confidence not in detectors:
        detectors[min_confidence] = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence
        )
    return detectors[min_confidence]


def detect_faces(frame_rgb: np.ndarray, min_confidence: float) -> list[tuple[float, float, float, float, float]]:
    """Faces in one RGB frame as (x, y, w, h, score), box in pixels."""
    height, width = frame_rgb.shape[:2]
    result = face_detector(min_confidence).process(np.ascontiguousarray(frame_rgb))
    faces = []
    for detection in result.detections or []:
        box = detection.location_data.relative_bounding_box
        faces.append((box.xmin * width, box.ymin * height, box.width * width, box.height * height,
                      float(detection.score[0])))
    return faces


def new_face_mesh(*, video_mode: bool, refine_landmarks: bool, min_detection_confidence: float = 0.5,
                  min_tracking_confidence: float = 0.5):
    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=not video_mode,
        max_num_faces=1,
        refine_landmarks=refine_landmarks,
        min_detection_confidence=min_detection_confidence,
        min_tracking_confidence=min_tracking_confidence,
    )


def mesh_landmarks(face_mesh, frame_rgb: np.ndarray) -> np.ndarray | None:
    """(N, 3) normalised landmarks of the first face, or None when no face is found."""
    result = face_mesh.process(np.ascontiguousarray(frame_rgb))
    if not result.multi_face_landmarks:
        return None
    return np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], dtype=np.float32)


def mediapipe_version() -> str:
    return mp.__version__
