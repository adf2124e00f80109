"""Stage: survey the faces of a candidate clip on its *source* frames, before any cropping.

Two things need the uncropped picture: counting faces (a second speaker beside the first would be cut away by
a face-centred crop, and the paper excludes multi-speaker videos), and finding the face when the dataset
gives no crop box. Frames are sampled at ``sample_fps`` and downscaled to ``analysis_width``; boxes are
reported in source pixels.

Per sample the survey keeps the main face's box (``face_boxes``), from which ``preprocess.video.crop`` builds a crop
that follows the face. The reference, LatentSync's ``preprocess/affine_transform.py``, warps every frame to its
own landmarks; here the crop only translates along a smoothed track (no per-frame jitter, the head's own motion
stays in the training clip).

Speakers by size: ``face_counts`` counts only *speaker-size* faces, those at least
``min_speaker_face_fraction`` (0.5) of the main (largest) face's height and at least ``min_face_px`` source pixels
high; every detection is kept in ``detected_counts``. A portrait on the wall, a TV behind the presenter or people in
the audience are much smaller than the speaker and no longer make the clip ``multi_speaker``; a second person of
comparable size still does. (The reference calls its affine transform with ``allow_multi_faces=False``: a second
face of any size fails the video.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from preprocess.run.job import decode, encode, rejected
from preprocess.run.media import FfmpegError, iter_rgb_frames
from preprocess.run.records import CropBox, ProbeResult, Rejection
from preprocess.run.settings import LocateSettings, MediaTimeouts
from preprocess.run.stage import Stage
from preprocess.video.face_models import detect_faces, mediapipe_version, mesh_landmarks, new_face_mesh

Box = tuple[float, float, float, float]  # x, y, w, h in source pixels


@dataclass(frozen=True)
class FaceSurvey:
    """Faces seen on sampled source frames of one candidate clip.

    ``sample_times_s`` are seconds from the clip start; ``face_counts`` (speaker-size faces, see the module
    docstring) and ``face_heights_px`` (height of the largest detected face, source pixels, 0 when none) are per
    sample. ``face_box`` is the median tight box around the main face (mesh landmarks when found, else the
    detector's box), in source pixels. ``face_boxes`` is the main face's box per sample (None: no face; the mesh
    box when the mesh found the largest detected face, else that detection's box), ``detected_counts`` every
    detection per sample. The last two are empty for surveys made without them (then the crop cannot follow the
    face and falls back to ``face_box``).
    """

    sample_times_s: tuple[float, ...]
    face_counts: tuple[int, ...]
    face_heights_px: tuple[float, ...]
    face_box: CropBox | None
    face_box_from: str  # "landmarks", "detector" or "none"
    face_boxes: tuple[Box | None, ...] = ()
    detected_counts: tuple[int, ...] = ()


def count_speakers(heights_px: list[float], min_fraction: float, min_face_px: float = 0.0) -> int:
    """How many of one frame's detected faces (their heights) are speaker-size: at least ``min_fraction`` of the
    largest face's height and at least ``min_face_px``."""
    if not heights_px:
        return 0
    floor = max(min_fraction * max(heights_px), min_face_px)
    return sum(1 for height in heights_px if height >= floor)


def survey_faces(
    source: str, probe: ProbeResult, start_s: float, duration_s: float, settings: LocateSettings,
    limits: MediaTimeouts | None = None, min_face_px: float = 0.0,
) -> FaceSurvey | Rejection:
    """``min_face_px`` (source pixels; the pipeline passes ``filters.min_face_px``): smaller faces never count as
    speakers."""
    analysis_width = min(settings.analysis_width, probe.width)
    analysis_height = max(2, int(round(probe.height * analysis_width / probe.width / 2)) * 2)
    to_source = probe.width / analysis_width
    face_mesh = new_face_mesh(video_mode=False, refine_landmarks=False)
    times, counts, detected, heights, mesh_boxes, detector_boxes, main_boxes = [], [], [], [], [], [], []
    try:
        frames = iter_rgb_frames(
            source, width=analysis_width, height=analysis_height,
            start_s=start_s, duration_s=duration_s, fps=settings.sample_fps, limits=limits,
        )
        for index, frame in enumerate(frames):
            times.append(round(index / settings.sample_fps, 3))
            faces = detect_faces(frame, settings.min_detection_confidence)
            detected.append(len(faces))
            counts.append(count_speakers([face[3] * to_source for face in faces],
                                         settings.min_speaker_face_fraction, min_face_px))
            largest = max(faces, key=lambda face: face[2] * face[3], default=None)
            heights.append(round(largest[3] * to_source, 1) if largest else 0.0)
            if largest:
                detector_boxes.append(largest[:4])
            landmarks = mesh_landmarks(face_mesh, frame)
            mesh_box = None
            if landmarks is not None:
                xs, ys = landmarks[:, 0] * analysis_width, landmarks[:, 1] * analysis_height
                mesh_box = (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())
                mesh_boxes.append(mesh_box)
            main_boxes.append(_main_box(largest, mesh_box, to_source))
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
    return FaceSurvey(tuple(times), tuple(counts), tuple(heights), face_box, face_box_from,
                      tuple(main_boxes), tuple(detected))


def _main_box(largest: tuple | None, mesh_box: tuple | None, to_source: float) -> Box | None:
    """The main face's box in source pixels: the mesh's (tight, the same kind ``face_box`` is made of) when its
    centre lies inside the largest detection, since the mesh (one face) may have picked another face; else the
    detection's."""
    box = None
    if mesh_box is not None:
        centre_x, centre_y = mesh_box[0] + mesh_box[2] / 2, mesh_box[1] + mesh_box[3] / 2
        if largest is None or (largest[0] <= centre_x <= largest[0] + largest[2]
                               and largest[1] <= centre_y <= largest[1] + largest[3]):
            box = mesh_box
    if box is None and largest is not None:
        box = largest[:4]
    return None if box is None else tuple(round(float(value) * to_source, 1) for value in box)


def _median_box(boxes: list[tuple[float, float, float, float]], scale: float) -> CropBox:
    x, y, w, h = (float(v) * scale for v in np.median(np.asarray(boxes, dtype=np.float64), axis=0))
    return CropBox(round(x, 1), round(y, 1), round(w, 1), round(h, 1))


# ---------------------------------------------------------------- the stage


def _too_short(job, settings, workspace):
    """A clip too short whatever happens next skips the expensive stages."""
    if job.duration_s < settings.filters.min_clip_s:
        return Rejection("filters", "too_short", f"{job.duration_s:.2f}s < {settings.filters.min_clip_s}s")
    return job


def _locate_key_parts(job, settings, workspace) -> list:
    # faces under filters.min_face_px never count as speakers (face_counts), so that threshold is an input too
    return [job.source_sha256, job.candidate.start_s, job.duration_s, settings.locate.fingerprint(),
            mediapipe_version(), settings.filters.min_face_px]


def _locate_run(job, settings, workspace, out_dir: Path) -> dict:
    return encode(survey_faces(job.candidate.source, job.probe, job.candidate.start_s, job.duration_s,
                               settings.locate, limits=settings.media, min_face_px=settings.filters.min_face_px))


def _locate_finish(job, entry: dict, settings, workspace):
    result = decode(entry, FaceSurvey)
    return rejected(job, result) if isinstance(result, Rejection) else replace(job, survey=result)


STAGE = Stage(name="locate", version=2, group="video", prepare=_too_short, key_parts=_locate_key_parts,
              run=_locate_run, finish=_locate_finish)
