"""Choosing the square crop of a clip, in the source video's displayed pixels.

An annotated box (HDTF ``crop_wh``) is given at the annotated resolution; it is scaled by the ratio of the
file's real height to the annotated height. Otherwise (no box, resolution 0, or ``prefer_landmark_box``)
the box is derived from the surveyed face: a square of side ``face_box_scale * crop_ratio * max(w, h)``
around the face's centre. Either box is made square around its centre (the output is square, and a
non-square box would be stretched) and shifted, or if need be shrunk, to lie inside the frame; each
adjustment is recorded as a note.
"""

from __future__ import annotations

from preprocess.locate import FaceSurvey
from preprocess.records import Candidate, CropBox, ProbeResult, Rejection
from preprocess.settings import LocateSettings

MIN_CROP_PX = 16


def choose_crop_box(
    candidate: Candidate, probe: ProbeResult, survey: FaceSurvey, settings: LocateSettings
) -> tuple[CropBox, str, tuple[str, ...]] | Rejection:
    """Return (square box, method, notes) where method is "annotated" or "landmarks"/"detector"."""
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
