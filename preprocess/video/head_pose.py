"""Head pose (yaw, pitch, roll in degrees) from MediaPipe face-mesh landmarks.

Instead of solvePnP against a generic 3-D head (which needs guessed camera intrinsics), the face's own axes
are read off the mesh: x from the right to the left outer eye corner, y from chin to forehead, z their cross
product. MediaPipe's z has the same scale as x, so on a square frame the three axes are comparable. Angles
follow the camera convention (x right, y up, z towards the viewer): yaw turns about y (positive: the face
turns towards the image's right side), pitch about x (positive: the face looks down), roll about z.
"""

from __future__ import annotations

import numpy as np

RIGHT_EYE_OUTER = 33
LEFT_EYE_OUTER = 263
FOREHEAD_TOP = 10
CHIN = 152


def face_frame(landmarks: np.ndarray, aspect: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks in camera axes (T, N, 3) and each frame's face rotation (T, 3, 3), columns = face axes.

    ``aspect`` is frame width / height, used to put normalised x and y on the same scale.
    """
    points = np.asarray(landmarks, dtype=np.float64).copy()
    points[..., 1] /= aspect  # normalised y is relative to height; bring it to width units
    # image axes (x right, y down, z away from camera) -> camera axes (x right, y up, z towards viewer)
    points[..., 1] *= -1
    points[..., 2] *= -1
    across = points[:, LEFT_EYE_OUTER] - points[:, RIGHT_EYE_OUTER]
    upward = points[:, FOREHEAD_TOP] - points[:, CHIN]
    x_axis = across / np.linalg.norm(across, axis=-1, keepdims=True)
    upward = upward - np.sum(upward * x_axis, axis=-1, keepdims=True) * x_axis
    y_axis = upward / np.linalg.norm(upward, axis=-1, keepdims=True)
    z_axis = np.cross(x_axis, y_axis)
    return points, np.stack([x_axis, y_axis, z_axis], axis=-1)


def head_pose_from_landmarks(landmarks: np.ndarray, aspect: float = 1.0) -> np.ndarray:
    """Yaw, pitch, roll in degrees for landmarks of shape (T, N>=468, 3) -> (T, 3); NaN rows stay NaN."""
    _, rotation = face_frame(landmarks, aspect)
    # R = Ry(yaw) @ Rx(pitch) @ Rz(roll)
    yaw = np.arctan2(rotation[:, 0, 2], rotation[:, 2, 2])
    pitch = np.arcsin(np.clip(-rotation[:, 1, 2], -1.0, 1.0))
    roll = np.arctan2(rotation[:, 1, 0], rotation[:, 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1)).astype(np.float32)


def frontalise(landmarks: np.ndarray, aspect: float = 1.0) -> np.ndarray:
    """Landmarks rotated into the face's own frame (x across to the face's left, y up, z out of the face),
    centred on the face: pose no longer changes the geometry, only expression does. (T, N, 3)."""
    points, rotation = face_frame(landmarks, aspect)
    centred = points - points.mean(axis=1, keepdims=True)  # NaN frames stay NaN
    return np.einsum("tnk,tkj->tnj", centred, rotation)


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Ry(yaw) @ Rx(pitch) @ Rz(roll) in the camera convention above (used to test the estimator)."""
    yaw, pitch, roll = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    rz = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    return ry @ rx @ rz
