"""Choosing the square crop of a clip, in the source video's displayed pixels: a fixed box or a face track.

Fixed box. An annotated box (HDTF ``crop_wh``) is given at the annotated resolution; it is scaled by the ratio of
the file's real height to the annotated height. Otherwise (no box, resolution 0, or ``prefer_landmark_box``) the
box is derived from the surveyed face: a square of side ``face_box_scale * crop_ratio * max(w, h)`` around the
face's median centre. Either box is made square around its centre (the output is square, and a non-square box
would be stretched) and shifted, or if need be shrunk, to lie inside the frame; each adjustment is a note.

Face track (``crop_method`` "track", ``locate.follow_face``, the default for every clip without a usable annotated
box): one median box over a whole candidate leaves a moving head or a panning camera half-cropped or out of the
picture. Instead the square keeps that side but its centre follows the main face, frame by frame:

1. the survey's main-face box centres (2 samples per second) are interpolated linearly to every output frame at
   25 fps (frames before the first or after the last face sample hold the nearest one; gaps are bridged);
2. averaged over ``track_smoothing_s`` (1 s; the ends are padded by odd reflection, so a steady drift passes
   unchanged and only jitter is removed);
3. its speed bounded to ``max_crop_speed`` crop sides per second (a rate limiter run forwards and backwards and
   averaged, so it neither lags nor leads: a detection jump becomes a short symmetric glide);
4. clamped inside the frame and rounded to whole pixels.

The side is constant per candidate (the output is 512x512 and ffmpeg's crop size is fixed), so the scale is also
constant within every piece. The issue asks for "pieces planned from the survey first, then a box per piece":
a track over the whole candidate, cut into pieces afterwards, gives every piece a crop that follows the face with
the same stage graph; so that is what is built. ``standardise`` applies the track in its single encode (ffmpeg's
``sendcmd`` moves the crop's x/y per frame). An annotated box (HDTF) stays the fixed crop unless a sampled face
box leaves it by more than ``annotated_box_face_margin`` of the face's side (note ``face_left_annotated_box``);
then the track takes over.

The reference, LatentSync (``preprocess/affine_transform.py``), warps every frame to that frame's own landmarks
(an affine alignment, no temporal smoothing); this crop only translates, so the head's motion in the picture is
the source's, smoothed of detector jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocess.run.records import Candidate, CropBox, ProbeResult, Rejection
from preprocess.run.settings import LocateSettings
from preprocess.video.locate import FaceSurvey

MIN_CROP_PX = 16


@dataclass(frozen=True)
class CropTrack:
    """A square crop of constant ``side`` (source pixels) whose top-left corner is (``xs[f]``, ``ys[f]``) on output
    frame ``f`` (``fps`` frames per second from the clip's start); ``max_speed`` is its fastest move in crop sides
    per second."""

    side: int
    fps: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    max_speed: float


@dataclass(frozen=True)
class CropChoice:
    """The crop of one candidate: ``box`` is the fixed crop, or for a track the box at its median position (the
    ``crop_x``/``crop_y``/``crop_size`` columns); ``track`` is None for a fixed crop."""

    box: CropBox
    method: str  # "annotated", "landmarks", "detector" (fixed) or "track"
    notes: tuple[str, ...]
    track: CropTrack | None = None


def choose_crop(
    candidate: Candidate, probe: ProbeResult, survey: FaceSurvey, settings: LocateSettings, fps: int,
    n_frames: int,
) -> CropChoice | Rejection:
    """The crop for ``n_frames`` output frames at ``fps``: the fixed box of :func:`choose_crop_box`, or a face
    track when ``settings.follow_face`` and either no annotated box is used or the face leaves it."""
    fixed = choose_crop_box(candidate, probe, survey, settings)
    if isinstance(fixed, Rejection) or not settings.follow_face or not any(survey.face_boxes):
        return fixed if isinstance(fixed, Rejection) else CropChoice(*fixed)
    box, method, notes = fixed
    if method == "annotated":
        if _face_stays_inside(box, survey, settings.annotated_box_face_margin):
            return CropChoice(box, method, notes)
        # the face walks out of the dataset's box: the track takes the face-derived side, like an unannotated clip
        face_choice = choose_crop_box(candidate, probe, survey, settings.model_copy(update={"prefer_landmark_box": True}))
        if isinstance(face_choice, Rejection):
            return CropChoice(box, method, notes + ("face_left_annotated_box",))
        box, notes = face_choice[0], notes + ("face_left_annotated_box",) + face_choice[2]
    track = face_track(survey, int(box.w), probe.width, probe.height, fps, n_frames, settings)
    median_box = CropBox(float(np.median(track.xs)), float(np.median(track.ys)), box.w, box.h)
    return CropChoice(median_box, "track", notes + _outside_notes(track, survey, fps), track)


def face_track(
    survey: FaceSurvey, side: int, width: int, height: int, fps: int, n_frames: int, settings: LocateSettings
) -> CropTrack:
    """The crop track of side ``side`` in a ``width`` x ``height`` frame (see the module docstring)."""
    sampled = [(time, box) for time, box in zip(survey.sample_times_s, survey.face_boxes, strict=True)
               if box is not None]
    times = np.array([time for time, _ in sampled], np.float64)
    centres = np.array([(box[0] + box[2] / 2, box[1] + box[3] / 2) for _, box in sampled], np.float64)
    frame_times = np.arange(n_frames) / fps
    path = np.stack([np.interp(frame_times, times, centres[:, axis]) for axis in (0, 1)], axis=1)
    window = max(1, int(round(settings.track_smoothing_s * fps)) // 2 * 2 + 1)  # odd: centred
    path = _moving_average(path, window)
    max_step = settings.max_crop_speed * side / fps
    path = (_rate_limited(path, max_step) + _rate_limited(path[::-1], max_step)[::-1]) / 2
    corners = np.stack([np.clip(path[:, 0] - side / 2, 0, width - side),
                        np.clip(path[:, 1] - side / 2, 0, height - side)], axis=1)
    # measured before rounding to whole pixels, whose 1 px steps would read as speed
    steps = np.hypot(*np.diff(corners, axis=0).T)
    max_speed = float(steps.max()) * fps / side if len(steps) else 0.0
    xs, ys = np.round(corners).astype(int).T
    return CropTrack(side, fps, tuple(int(x) for x in xs), tuple(int(y) for y in ys), round(max_speed, 4))


def _moving_average(path: np.ndarray, window: int) -> np.ndarray:
    """(n, 2) centred moving average; odd reflection at the ends keeps a linear trend exact there."""
    if window <= 1 or len(path) < 2:
        return path
    half = window // 2
    padded = np.pad(path, ((half, half), (0, 0)), mode="reflect", reflect_type="odd")
    kernel = np.ones(window) / window
    return np.stack([np.convolve(padded[:, axis], kernel, mode="valid") for axis in (0, 1)], axis=1)


def _rate_limited(path: np.ndarray, max_step: float) -> np.ndarray:
    """(n, 2) path whose every frame-to-frame move is at most ``max_step`` long, chasing ``path``."""
    limited = np.empty_like(path)
    limited[0] = path[0]
    for index in range(1, len(path)):
        step = path[index] - limited[index - 1]
        length = float(np.hypot(*step))
        limited[index] = limited[index - 1] + (step * (max_step / length) if length > max_step else step)
    return limited


def _face_stays_inside(box: CropBox, survey: FaceSurvey, margin: float) -> bool:
    for face in survey.face_boxes:
        if face is None:
            continue
        x, y, w, h = face
        slack = margin * max(w, h)
        if x < box.x - slack or y < box.y - slack or x + w > box.x + box.w + slack or y + h > box.y + box.h + slack:
            return False
    return True


def _outside_notes(track: CropTrack, survey: FaceSurvey, fps: int) -> tuple[str, ...]:
    """``face_outside_crop:<n>`` when n sampled face boxes are not wholly inside the track's crop (a face moving
    faster than ``max_crop_speed``, or bigger than the crop)."""
    outside = 0
    for time, face in zip(survey.sample_times_s, survey.face_boxes, strict=True):
        if face is None:
            continue
        frame = min(int(round(time * fps)), len(track.xs) - 1)
        x, y, w, h = face
        left, top = track.xs[frame], track.ys[frame]
        if x < left or y < top or x + w > left + track.side or y + h > top + track.side:
            outside += 1
    return (f"face_outside_crop:{outside}",) if outside else ()


def choose_crop_box(
    candidate: Candidate, probe: ProbeResult, survey: FaceSurvey, settings: LocateSettings
) -> tuple[CropBox, str, tuple[str, ...]] | Rejection:
    """Return the fixed (square box, method, notes) where method is "annotated" or "landmarks"/"detector"."""
    notes: list[str] = []
    if candidate.annotated_box is not None and not settings.prefer_landmark_box:
        if candidate.annotated_height:
            scale = probe.height / candidate.annotated_height
            box = CropBox(*(value * scale for value in (candidate.annotated_box.x, candidate.annotated_box.y,
                                                        candidate.annotated_box.w, candidate.annotated_box.h)))
            fitted = _square_inside_frame(box, probe.width, probe.height, notes)
            if fitted is not None:
                return fitted, "annotated", tuple(notes)
            notes.append("annotated_box_unusable")
        else:
            notes.append("annotated_box_without_resolution")
    if survey.face_box is None:
        return Rejection("crop", "no_face", "no face found on the sampled source frames to derive a crop box")
    ratio = candidate.crop_ratio or settings.default_crop_ratio
    side = settings.face_box_scale * ratio * max(survey.face_box.w, survey.face_box.h)
    centre_x = survey.face_box.x + survey.face_box.w / 2
    centre_y = survey.face_box.y + survey.face_box.h / 2
    box = CropBox(centre_x - side / 2, centre_y - side / 2, side, side)
    fitted = _square_inside_frame(box, probe.width, probe.height, notes)
    if fitted is None:
        return Rejection("crop", "face_too_small", f"derived crop box {box} is smaller than {MIN_CROP_PX} px")
    return fitted, survey.face_box_from, tuple(notes)


def _square_inside_frame(box: CropBox, width: int, height: int, notes: list[str]) -> CropBox | None:
    side = max(box.w, box.h)
    if box.w != box.h:
        notes.append("crop_box_made_square")
    if side > min(width, height):
        side = float(min(width, height))
        notes.append("crop_box_shrunk_to_frame")
    side = float(int(side) // 2 * 2)  # even sizes keep chroma subsampling exact
    if side < MIN_CROP_PX:
        return None
    x = box.x + box.w / 2 - side / 2
    y = box.y + box.h / 2 - side / 2
    clamped_x = min(max(x, 0.0), width - side)
    clamped_y = min(max(y, 0.0), height - side)
    if (round(clamped_x), round(clamped_y)) != (round(x), round(y)):
        notes.append("crop_box_moved_inside_frame")
    return CropBox(float(round(clamped_x)), float(round(clamped_y)), side, side)
