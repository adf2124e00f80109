"""Stage: survey the faces of a candidate clip on its *source* frames, before any cropping.

Two things need the uncropped picture: counting faces (a second speaker beside the first would be cut away by
a face-centred crop, and the paper excludes multi-speaker videos), and finding the face when the dataset
gives no crop box. Frames are sampled at ``sample_fps`` and downscaled to ``analysis_width``; boxes are
reported in source pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocess.face_models import detect_faces, mesh_landmarks, new_face_mesh
from preprocess.media import FfmpegError, iter_rgb_frames
from preprocess.records import CropBox, ProbeResult, Rejection
from preprocess.settings import LocateSettings, MediaTimeouts


@dataclass(frozen=True)
class FaceSurvey:
    """Faces seen on sampled source frames of one candidate clip.

    ``sample_times_s`` are seconds from the clip start; ``face_counts`` and ``face_heights_px`` (height of
    the largest detected face, source pixels, 0 when none) are per sample. ``face_box`` is the median
    tight box around the main face (mesh landmarks when found, else the detector's box), in source pixels.
    """

    sample_times_s: tuple[float, ...]
    face_counts: tuple[int, ...]
    face_heights_px: tuple[float, ...]
    face_box: CropBox | None
    face_box_from: str  # "landmarks", "detector" or "none"


def survey_faces(
    source: str, probe: ProbeResult, start_s: float, duration_s: float, settings: LocateSettings,
    limits: MediaTimeouts | None = None,
) -> FaceSurvey | Rejection:
    analysis_width = min(settings.analysis_width, probe.width)
    analysis_height = max(2, int(round(probe.height * analysis_width / probe.width / 2)) * 2)
    to_source = probe.width / analysis_width
    face_mesh = new_face_mesh(video_mode=False, refine_landmarks=False)
    times, counts, heights, mesh_boxes, detector_boxes = [], [], [], [], []
    try:
        frames = iter_rgb_frames(
            source, width=analysis_width, height=analysis_height,
            start_s=start_s, duration_s=duration_s, fps=settings.sample_fps, limits=limits,
        )
        for index, frame in enumerate(frames):
            times.append(round(index / settings.sample_fps, 3))
            faces = detect_faces(frame, settings.min_detection_confidence)
            counts.append(len(faces))
            largest = max(faces, key=lambda face: face[2] * face[3], default=None)
            heights.append(round(largest[3] * to_source, 1) if largest else 0.0)
            if largest:
                detector_boxes.append(largest[:4])
            landmarks = mesh_landmarks(face_mesh, frame)
            if landmarks is not None:
                xs, ys = landmarks[:, 0] * analysis_width, landmarks[:, 1] * analysis_height
                mesh_boxes.append((xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()))
    except FfmpegError as error:  # a verdict on the input only: a timeout, a kill or a full disk propagates
        return Rejection("locate", "undecodable", str(error))
    finally:
        face_mesh.close()
    if not times:
        return Rejection("locate", "no_frames", f"no frames decoded between {start_s:.2f}s and +{duration_s:.2f}s")

    face_box, face_box_from = None, "none"
    # Prefer the mesh when it saw the face in at least half the samples where the detector did.
    if mesh_boxes and len(mesh_boxes) * 2 >= len(detector_boxes):
        face_box, face_box_from = _median_box(mesh_boxes, to_source), "landmarks"
    elif detector_boxes:
        face_box, face_box_from = _median_box(detector_boxes, to_source), "detector"
    return FaceSurvey(tuple(times), tuple(counts), tuple(heights), face_box, face_box_from)


def _median_box(boxes: list[tuple[float, float, float, float]], scale: float) -> CropBox:
    x, y, w, h = (float(v) * scale for v in np.median(np.asarray(boxes, dtype=np.float64), axis=0))
    return CropBox(round(x, 1), round(y, 1), round(w, 1), round(h, 1))
