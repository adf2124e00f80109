"""Reading VFHQ's per-clip meta-info files into candidate clips, recording every anomaly instead of raising.

VFHQ (Xie et al., "VFHQ: A High-Quality Dataset and Benchmark for Video Face Super-Resolution", CVPRW 2022) ships
no videos: one text file per clip says which YouTube video it comes from, which frames, and where the face is.
Its layout, as the public reader parses it (``yunyu/vfhq-downloader`` ``vfhq_dl/parse_meta_info.py``,
``parse_clip_meta``, read at commit f68b006)::

    Clip+<video id>+P<person>+C<clip>+F<first frame>-<last frame>.txt
        Video ID: <video id>
        H: <frame height in pixels>
        W: <frame width in pixels>
        FPS: <frame rate of the source video>
        FRAME INDEX LANDMARKS5 ...             (header of the per-frame lines)
        <frame index> x1 y1 x2 y2 ... x5 y5    (one line per frame: the five face landmarks, in pixels)
        ...
        CROP BBOX ...: x0 y0 x1 y1             (the clip's face crop, corners in pixels)

The name has one ``F`` (``Clip+G0DGRma_p48+P0+C0+F11208-11383``, ``Clip+_5rNOD1nsDg+P0+C0+F575-769``); the public
reader drops every ``F`` of the range, so ``F<first>-F<last>`` (the form this reader once demanded) is read too.

Each file becomes one ``Candidate``: the source is ``<videos_dir>/<video id>.<container>`` (yt-dlp keeps YouTube's
container, as for HDTF); the time range is the public reader's, from the name with one frame trimmed at each end:
start ``(first + 1) / FPS``, end ``(last - 1) / FPS`` (its ``start_t``/``end_t``, which it cuts with ffmpeg
``-ss``/``-to``; here ``end_s`` is exclusive, as for every dataset), so ``F24-126`` at 25 fps is 1.00-5.00 s. The
annotated box is ``CROP BBOX`` at ``H`` pixels of frame height (``preprocess.video.crop`` scales it to the downloaded
file's real height). The per-frame landmarks stay in the file (``Candidate.annotation_file``) and are read back by
``read_frame_landmarks`` for a crop that follows the face.

Deviations from the public reader, and why: the per-frame lines are a cross-check of the name: when their first or
last index is more than one frame from the name's, the clip keeps the name's range (as the public reader does, so
that its times match the clips other VFHQ copies cut) and gets the note and issue ``frame_range_mismatch`` with
both ranges, to be looked at rather than silently trusted either way. It crashes on a malformed line; here each is
an ``AnnotationIssue`` and the line is skipped. Without a ``CROP BBOX`` the box is the median of per-frame landmark
boxes (``crop_box_from_landmarks``) rather than nothing.

Anomalies (issue kinds; ``*`` also rejects the candidate with that reason, the others are also candidate notes):
``bad_file_name*`` (the name is not ``Clip+<id>+P<n>+C<n>+F<a>-<b>.txt`` or ``...F<a>-F<b>.txt``), ``fps_missing*``
(no usable ``FPS``: frames cannot become seconds), ``bad_time_range*`` (three frames or fewer: nothing is left after
the trim), ``missing_source*`` (the video was never downloaded; or the reason of
``preprocess.datasets.discover.video_entry_problem``), ``unsafe_path*``/``bad_name*`` (a video id that is not a plain file
name), ``malformed_line``, ``no_frame_landmarks`` (an empty per-frame list), ``frame_range_mismatch``,
``video_id_mismatch`` (the header disagrees with the name; the name wins), ``resolution_missing``,
``crop_box_missing``, ``crop_box_invalid``, ``crop_box_from_landmarks``. A frame range beyond the downloaded video's
end is found by the probe stage (``clip_outside_source`` rejection, ``clip_end_beyond_source`` note), which is the
first place that knows the video's duration.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from preprocess.datasets.hdtf import _downloaded_video, name_problem
from preprocess.datasets.video_files import as_clip_id
from preprocess.run.records import AnnotationIssue, Candidate, CropBox

DATASET = "vfhq"
META_GLOB = "**/Clip+*.txt"
# The meta-info files are looked for here (relative to raw_dir) when no annotations_dir is given, then in raw_dir.
META_DIR = "meta_info"
# VFHQ's real names have one F (F11208-11383); the F<a>-F<b> form is read as the public reader reads it (it drops
# every F).
_NAME = re.compile(r"Clip\+(?P<video>.+)\+P(?P<person>\d+)\+C(?P<clip>\d+)\+F(?P<first>\d+)-F?(?P<last>\d+)")
# The public reader cuts (first + 1) / FPS to (last - 1) / FPS: one frame off each end of the name's range.
TRIM_FRAMES = 1
_N_LANDMARKS = 5
# Side of the fallback square box over the five landmarks' extent (eyes, nose tip, mouth corners span about a
# quarter of a head-and-shoulders crop like HDTF's boxes).
LANDMARK_BOX_SCALE = 4.0


def meta_info_dir(raw_dir: Path, annotations_dir: Path | None = None) -> Path:
    """Where VFHQ's meta-info files are read from: ``annotations_dir``, else ``raw_dir/meta_info``, else raw_dir."""
    if annotations_dir is not None:
        return Path(annotations_dir)
    inside = Path(raw_dir) / META_DIR
    return inside if inside.is_dir() else Path(raw_dir)


def looked_for(raw_dir: Path, annotations_dir: Path | None = None) -> str:
    """What discovery looked for, for the error of a run with no candidates."""
    return (f"VFHQ meta-info files {META_GLOB} under {meta_info_dir(raw_dir, annotations_dir)} (annotations_dir, "
            f"else raw_dir/{META_DIR}, else raw_dir) naming <video id>.mp4 videos in {raw_dir}")


def _lines(path: Path, issues: list[AnnotationIssue]) -> list[tuple[int, str]]:
    """(1-based number, text) of the non-blank lines; undecodable bytes and a BOM are recorded, not fatal."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        text = data.decode("utf-8", errors="replace")
        issues.append(AnnotationIssue(path.name, 0, "not_utf8", "", f"invalid UTF-8 ({error}); bytes replaced"))
    text = text.removeprefix("\ufeff")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse(path: Path, issues: list[AnnotationIssue], subject: str) -> dict:
    """The header values, the per-frame lines and the crop line of one meta-info file (malformed lines skipped)."""
    header: dict[str, str] = {}
    frames: list[tuple[int, np.ndarray]] = []
    crop: tuple[int, list[float]] | None = None
    malformed = 0

    def bad(number: int, detail: str) -> None:
        nonlocal malformed
        malformed += 1
        issues.append(AnnotationIssue(path.name, number, "malformed_line", subject, detail))

    for number, line in _lines(path, issues):
        fields = line.split()
        if fields[0].isdigit():  # a frame line: index then five (x, y) landmarks
            values = [_number(field) for field in fields[1:]]
            if len(values) != 2 * _N_LANDMARKS or any(value is None for value in values):
                bad(number, f"frame line {line[:80]!r}: expected a frame index and {2 * _N_LANDMARKS} numbers "
                            f"(five x y landmarks), got {len(fields) - 1} fields; line skipped")
                continue
            frames.append((int(fields[0]), np.array(values, np.float32).reshape(_N_LANDMARKS, 2)))
        elif line.upper().startswith("CROP"):
            values = [_number(field) for field in fields[-4:]]
            if len(fields) < 5 or any(value is None for value in values):
                bad(number, f"crop line {line[:80]!r}: expected four numbers x0 y0 x1 y1 at its end; ignored")
                continue
            crop = (number, values)
        elif ":" in line and not line.upper().startswith("FRAME"):
            key, _, value = line.partition(":")
            header[key.strip().upper()] = value.strip()
        elif not line.upper().startswith("FRAME"):  # "FRAME INDEX LANDMARKS5 ..." heads the frame lines
            bad(number, f"line {line[:80]!r} is neither a header (Key: value), a frame line nor the crop line")
    return {"header": header, "frames": frames, "crop": crop, "malformed": malformed}


def _median_landmark_box(frames: list[tuple[int, np.ndarray]]) -> CropBox:
    """A square around the median per-frame landmark centre, LANDMARK_BOX_SCALE x the median landmark extent."""
    points = np.stack([landmarks for _, landmarks in frames])  # (n_frames, 5, 2)
    centres = (points.min(axis=1) + points.max(axis=1)) / 2
    extents = (points.max(axis=1) - points.min(axis=1)).max(axis=1)
    (cx, cy), side = np.median(centres, axis=0), float(np.median(extents)) * LANDMARK_BOX_SCALE
    return CropBox(float(cx - side / 2), float(cy - side / 2), side, side)


def read_frame_landmarks(meta_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The per-frame annotation of a clip: source frame indices (n,) int64 and five landmarks (n, 5, 2) float32
    in pixels of the annotated ``H`` x ``W`` frame, sorted by frame; malformed lines are skipped."""
    parsed = _parse(Path(meta_file), [], "")
    frames = sorted(parsed["frames"], key=lambda item: item[0])
    if not frames:
        return np.zeros(0, np.int64), np.zeros((0, _N_LANDMARKS, 2), np.float32)
    return np.array([index for index, _ in frames], np.int64), np.stack([points for _, points in frames])


def read_meta_info(path: Path, videos_dir: Path, issues: list[AnnotationIssue]) -> Candidate:
    """One meta-info file -> one candidate (rejected, with its reason, when it cannot be processed)."""
    path = Path(path)
    match = _NAME.fullmatch(path.stem)
    if match is None:
        detail = (f"{path.name} is not named Clip+<video id>+P<n>+C<n>+F<first>-<last>.txt (VFHQ's meta-info "
                  "names, e.g. Clip+G0DGRma_p48+P0+C0+F11208-11383.txt), so its video and frame range are unknown")
        issues.append(AnnotationIssue(path.name, 0, "bad_file_name", path.stem, detail))
        return Candidate(candidate_id=as_clip_id(path.stem), source=str(path), dataset=DATASET,
                         annotation_file=str(path), reject_reason="bad_file_name", reject_detail=detail)
    video = match["video"]
    clip_id = as_clip_id(f"{video}_P{int(match['person'])}_C{int(match['clip'])}")
    parsed = _parse(path, issues, clip_id)
    header, frames, notes = parsed["header"], sorted(parsed["frames"], key=lambda item: item[0]), []
    if parsed["malformed"]:
        notes.append("malformed_line")

    def issue(kind: str, detail: str, line: int = 0, note: bool = True) -> None:
        issues.append(AnnotationIssue(path.name, line, kind, clip_id, detail))
        if note and kind not in notes:
            notes.append(kind)

    if header.get("VIDEO ID") not in (None, video):
        issue("video_id_mismatch", f"header Video ID {header['VIDEO ID']!r} differs from the file name's {video!r}; "
                                   "the name is used")
    fps = _number(header.get("FPS", "").split()[-1]) if header.get("FPS") else None
    height = _number(header.get("H", "").split()[-1]) if header.get("H") else None
    first, last = int(match["first"]), int(match["last"])
    if frames:
        lines_first, lines_last = frames[0][0], frames[-1][0]
        if abs(lines_first - first) > 1 or abs(lines_last - last) > 1:
            issue("frame_range_mismatch", f"frame lines cover {lines_first}-{lines_last}, the name says "
                                          f"{first}-{last}; the name's range is used (as the public VFHQ reader)")
    else:
        issue("no_frame_landmarks", f"no per-frame landmark lines; the name's frames {first}-{last} are used")
    box: CropBox | None = None
    if parsed["crop"] is not None:
        line, (x0, y0, x1, y1) = parsed["crop"]
        if x1 > x0 and y1 > y0:
            box = CropBox(x0, y0, x1 - x0, y1 - y0)
        else:
            issue("crop_box_invalid", f"crop box {x0:g} {y0:g} {x1:g} {y1:g} has no positive area", line)
    elif frames:
        box = _median_landmark_box(frames)
        issue("crop_box_from_landmarks", "no CROP BBOX line: the median of the per-frame landmark boxes is used")
    else:
        issue("crop_box_missing", "no CROP BBOX line and no landmarks: a box from the face survey is used")
    if box is not None and not height:
        issue("resolution_missing", "no usable H: the annotated box cannot be scaled to the video; a box from the "
                                    "face survey is used")
    candidate = Candidate(
        candidate_id=clip_id, source=str(Path(videos_dir) / f"{video}.mp4"), dataset=DATASET,
        annotated_box=box, annotated_height=int(height) if height else None, annotation_file=str(path))
    reject: tuple[str, str] | None = None
    if not fps or fps <= 0:
        reject = ("fps_missing", f"{path.name} has no usable FPS line ({header.get('FPS')!r}): its frame range "
                                 "cannot be turned into seconds; add 'FPS: <rate>'")
        issue("fps_missing", reject[1], note=False)
    elif last - first <= 2 * TRIM_FRAMES:
        reject = ("bad_time_range", f"frames {first}-{last} of {path.name} leave nothing once one frame is trimmed "
                                    "at each end")
        issue("bad_time_range", reject[1], note=False)
    else:
        candidate = replace(candidate, start_s=round((first + TRIM_FRAMES) / fps, 3),
                            end_s=round((last - TRIM_FRAMES) / fps, 3))
    if reject is None:
        reject = name_problem(video)
    if reject is None:
        found, problem = _downloaded_video(Path(videos_dir), video)
        if found is not None:
            candidate = replace(candidate, source=str(found))
        reject = problem or (None if found else (
            "missing_source", f"video {video} of {path.name} not found in {videos_dir} as {video}.mp4 (or another "
                              "video container); download it (https://www.youtube.com/watch?v=" + video + ")"))
    return replace(candidate, notes=tuple(notes), reject_reason=reject[0] if reject else None,
                   reject_detail=reject[1] if reject else "")


def vfhq_candidates(raw_dir: Path, annotations_dir: Path | None = None) -> tuple[list[Candidate], list[AnnotationIssue]]:
    """One candidate per meta-info file under ``meta_info_dir`` (sorted by id), videos looked up in ``raw_dir``;
    never raises on bad content. Ids are ``<video id>_P<person>_C<clip>``, settled by ``discover_candidates``."""
    issues: list[AnnotationIssue] = []
    folder = meta_info_dir(raw_dir, annotations_dir)
    files = sorted(folder.glob(META_GLOB)) if folder.is_dir() else []
    candidates = [read_meta_info(path, Path(raw_dir), issues) for path in files]
    return sorted(candidates, key=lambda c: c.candidate_id), issues
