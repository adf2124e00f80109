"""Reading the HDTF annotation files into candidate clips, recording every anomaly instead of dropping it.

HDTF ships five space-separated files per subset (RD, WDA, WRA; see ``data/hdtf_annotations/README.md``):
``Name URL`` (video_url), ``Name.mp4 H`` (resolution), ``Name.mp4 MM:SS-MM:SS ...`` (annotion_time; clip i
is ``Name_i``), ``Name_i.mp4 x w y h`` (crop_wh; note the x, w, y, h order) and ``Name_i.mp4 r``
(crop_ratio). The published files contain traps (a BOM, trailing spaces, missing final newlines, a
resolution of 0, a video without time annotation, clips without crop box, boxes outside the frame, row
counts that disagree). The clip list must be complete and auditable, so every trap becomes an
``AnnotationIssue`` (kept in ``annotation_issues.parquet``), and anomalies that affect a clip are also
copied into its ``Candidate.notes`` or, when it cannot be processed, its ``reject_reason``.

Reading happens in two passes: each file is read on its own (lexical problems, malformed or duplicate
rows and single-row value problems such as a resolution of 0 or an end time before the start), then the
files of a subset are joined (missing rows, rows without a clip, boxes outside the annotated frame).

Video names are text from the annotation files, so they are checked before any path is built from them: a name
that is not a plain file name (a ``/`` or ``\\``, ``.``, ``..``) rejects its clips ``unsafe_path``, one with
control characters ``bad_name``, and neither is ever looked up on disk; a found file must be a readable regular
file inside the videos folder (a symlink resolving outside it is ``link_outside_raw_dir``). A name that is a
safe file name but not a valid clip id (e.g. with a ``.``, which would split a WebDataset key) is kept, and its
clips are renamed by ``preprocess.datasets.discover.settle_candidates`` (issue ``id_renamed``).

``python -m preprocess.datasets.hdtf DIR [--videos VIDEOS_DIR]`` prints the issue counts and the candidate count.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from preprocess.datasets.video_files import VIDEO_EXTENSIONS, as_clip_id, video_entry_problem
from preprocess.run.records import AnnotationIssue, Candidate, CropBox
from shards.schema import CLIP_ID_PATTERN

DATASET = "hdtf"

# File kind -> file name suffix after "<subset>_". "annotion" is the dataset's own spelling.
FILE_SUFFIXES: dict[str, str] = {
    "url": "video_url.txt",
    "resolution": "resolution.txt",
    "time": "annotion_time.txt",
    "crop_wh": "crop_wh.txt",
    "crop_ratio": "crop_ratio.txt",
}

_TIMESTAMP = re.compile(r"(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)")
_CLIP_NAME = re.compile(r"(.+)_(\d+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(video: str) -> tuple[str, str] | None:
    """Why the annotated video name ``video`` must not become a path, as ``(reason, detail)``, or None."""
    if "/" in video or "\\" in video or video in (".", ".."):
        return "unsafe_path", (f"video name {video!r} is not a plain file name (a path separator or '..' could "
                               "read outside raw_dir); not looked up. Fix the name in the annotation files")
    if _CONTROL.search(video):
        return "bad_name", (f"video name {video!r} contains control characters; not looked up. Fix the name in "
                            "the annotation files")
    return None


@dataclass(frozen=True)
class HdtfClip:
    """One annotated clip (or, when a video's clips cannot be made, one entry for the whole video).

    ``clip_id`` is ``Name_i``, or ``Name`` for a video without usable time annotation (then
    ``reject_reason`` says why). ``annotated_height`` is None when the resolution is 0 or missing.
    """

    clip_id: str
    video: str
    subset: str
    start_s: float = 0.0
    end_s: float | None = None
    box: CropBox | None = None
    annotated_height: int | None = None
    crop_ratio: float | None = None
    url: str | None = None
    notes: tuple[str, ...] = ()
    reject_reason: str | None = None
    reject_detail: str = ""


@dataclass(frozen=True)
class HdtfAnnotations:
    """All subsets joined: the complete clip list (sorted by ``clip_id``) and each video's URL."""

    clips: tuple[HdtfClip, ...]
    urls: Mapping[str, str]
    subsets: tuple[str, ...]


@dataclass
class _Row:
    """A parsed row plus where it came from; later rows with the same key are counted as duplicates."""

    line: int
    value: Any
    duplicate_lines: list[int] = field(default_factory=list)


@dataclass
class _Table:
    """One annotation file: parsed rows by key, malformed rows whose key was readable, non-blank row count."""

    file: str
    present: bool
    rows: dict[str, _Row] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    n_rows: int = 0


class _Malformed(ValueError):
    """A row that cannot be parsed; ``key`` is set when at least the row's name was readable."""

    def __init__(self, detail: str, key: str | None = None):
        super().__init__(detail)
        self.key = key


# --------------------------------------------------------------------------------------------- reading


def _issue(issues: list[AnnotationIssue], file: str, line: int, kind: str, subject: str = "",
           detail: str = "") -> None:
    issues.append(AnnotationIssue(file=file, line=line, kind=kind, subject=subject, detail=detail))


def _read_lines(path: Path, issues: list[AnnotationIssue]) -> Iterable[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) of the non-blank lines, recording every lexical anomaly."""
    name = path.name
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        text = data.decode("utf-8", errors="replace")
        _issue(issues, name, 0, "not_utf8", "", f"invalid UTF-8 ({error}); undecodable bytes replaced")
    if text.startswith("\ufeff"):
        text = text[1:]
        _issue(issues, name, 1, "bom", "", "file starts with a UTF-8 byte order mark; stripped")
    if not text:
        _issue(issues, name, 0, "empty_file", "", "file has no content")
        return
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    else:
        _issue(issues, name, len(lines), "no_final_newline", "", "last line is not terminated by a newline")
    for number, raw in enumerate(lines, start=1):
        if raw.endswith("\r"):
            raw = raw[:-1]
            _issue(issues, name, number, "crlf", "", "line ends with CR LF")
        if not raw.strip():
            _issue(issues, name, number, "blank_line", "", "blank line ignored")
            continue
        fields = raw.split()
        subject = fields[0].removesuffix(".mp4")  # Name or Name_i, as in the issue's other kinds
        if raw != raw.rstrip():
            _issue(issues, name, number, "trailing_space", subject, "trailing whitespace ignored")
        if raw != raw.lstrip():
            _issue(issues, name, number, "leading_space", subject, "leading whitespace ignored")
        yield number, fields


def _read_table(path: Path, issues: list[AnnotationIssue],
                parse: Callable[[list[str], str, int, list[AnnotationIssue]], tuple[str, Any]]) -> _Table:
    """Read one file with ``parse(fields, file, line, issues) -> (key, value)``; first row of a key wins."""
    table = _Table(file=path.name, present=path.is_file())
    if not table.present:
        return table
    for number, fields in _read_lines(path, issues):
        table.n_rows += 1
        try:
            key, value = parse(fields, path.name, number, issues)
        except _Malformed as error:
            _issue(issues, path.name, number, "malformed_line",
                   error.key or fields[0].removesuffix(".mp4"), str(error))
            if error.key is not None and error.key not in table.rows:
                table.malformed.setdefault(error.key, number)
            continue
        first = table.rows.get(key)
        if first is None:
            table.rows[key] = _Row(number, value)
            continue
        first.duplicate_lines.append(number)
        same = "same value" if first.value == value else f"different value {value!r}, kept {first.value!r}"
        _issue(issues, path.name, number, "duplicate_row", key,
               f"{key} already given at line {first.line} ({same}); first row wins")
    return table


def _mp4_name(token: str, expected: str) -> str:
    if not token.endswith(".mp4") or len(token) == 4:
        raise _Malformed(f"expected {expected}.mp4, got {token!r}")
    return token[:-4]


def _field_count(fields: list[str], expected: int, layout: str, key: str | None) -> None:
    if len(fields) != expected:
        raise _Malformed(f"expected {expected} fields ({layout}), got {len(fields)}", key)


def _parse_url(fields: list[str], file: str, line: int, issues: list[AnnotationIssue]) -> tuple[str, str]:
    _field_count(fields, 2, "Name URL", fields[0])
    return fields[0], fields[1]


def _parse_resolution(fields: list[str], file: str, line: int,
                      issues: list[AnnotationIssue]) -> tuple[str, int]:
    video = _mp4_name(fields[0], "Name")
    _field_count(fields, 2, "Name.mp4 H", video)
    if not fields[1].isdigit():
        raise _Malformed(f"height {fields[1]!r} is not a non-negative integer", video)
    height = int(fields[1])
    if height == 0:
        _issue(issues, file, line, "resolution_zero", video,
               "annotated height is 0: the crop box scale is unknown, a landmark-derived box is used")
    return video, height


def parse_timestamp(text: str) -> float:
    """Seconds of ``MM:SS`` or ``HH:MM:SS`` (seconds may have a fraction); ValueError if not of that form."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"time {text!r} is not MM:SS or HH:MM:SS")
    hours, minutes, seconds = match.group(1), int(match.group(2)), float(match.group(3))
    if seconds >= 60 or (hours is not None and minutes >= 60):
        raise ValueError(f"time {text!r} has a field out of range")
    return (int(hours) if hours is not None else 0) * 3600 + minutes * 60 + seconds


def _parse_time(fields: list[str], file: str, line: int,
                issues: list[AnnotationIssue]) -> tuple[str, tuple[tuple[float, float], ...]]:
    video = _mp4_name(fields[0], "Name")
    if len(fields) < 2:
        raise _Malformed("expected at least one time range after the name", video)
    ranges = []
    for index, token in enumerate(fields[1:]):
        parts = token.split("-")
        if len(parts) != 2:
            raise _Malformed(f"clip {index}: {token!r} is not START-END", video)
        try:
            start, end = parse_timestamp(parts[0]), parse_timestamp(parts[1])
        except ValueError as error:
            raise _Malformed(f"clip {index}: {error}", video) from None
        if end <= start:
            _issue(issues, file, line, "bad_time_range", f"{video}_{index}",
                   f"range {token} ends at or before its start")
        ranges.append((start, end))
    return video, tuple(ranges)


def _clip_key(token: str) -> tuple[str, str, int]:
    """``Name_i.mp4`` -> (``Name_i``, ``Name``, i)."""
    stem = _mp4_name(token, "Name_i")
    match = _CLIP_NAME.fullmatch(stem)
    if match is None:
        raise _Malformed(f"clip name {token!r} is not Name_i.mp4")
    return stem, match.group(1), int(match.group(2))


def _number(text: str, what: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Malformed(f"{what} {text!r} is not a number", key) from None
    if not math.isfinite(value):
        raise _Malformed(f"{what} {text!r} is not finite", key)
    return value


def _parse_crop_wh(fields: list[str], file: str, line: int,
                   issues: list[AnnotationIssue]) -> tuple[str, CropBox]:
    clip, _, _ = _clip_key(fields[0])
    _field_count(fields, 5, "Name_i.mp4 x w y h", clip)
    x, w, y, h = (_number(text, what, clip) for text, what in zip(fields[1:], ("x", "w", "y", "h"), strict=False))
    box = CropBox(x=x, y=y, w=w, h=h)
    if w <= 0 or h <= 0:
        _issue(issues, file, line, "crop_box_invalid", clip, f"non-positive size w={w:g} h={h:g}")
    return clip, box


def _parse_crop_ratio(fields: list[str], file: str, line: int,
                      issues: list[AnnotationIssue]) -> tuple[str, float]:
    clip, _, _ = _clip_key(fields[0])
    _field_count(fields, 2, "Name_i.mp4 r", clip)
    ratio = _number(fields[1], "ratio", clip)
    if ratio <= 0:
        raise _Malformed(f"ratio {fields[1]!r} is not positive", clip)
    return clip, ratio


_PARSERS = {
    "url": _parse_url,
    "resolution": _parse_resolution,
    "time": _parse_time,
    "crop_wh": _parse_crop_wh,
    "crop_ratio": _parse_crop_ratio,
}


def _find_subsets(annotations_dir: Path, issues: list[AnnotationIssue]) -> list[str]:
    """Subset prefixes of every ``<subset>_<suffix>`` file present (prefix = text before the first ``_``)."""
    subsets = set()
    for suffix in FILE_SUFFIXES.values():
        for path in sorted(annotations_dir.glob(f"*_{suffix}")):
            prefix = path.name[: -len(suffix) - 1]
            if not prefix or "_" in prefix:
                _issue(issues, path.name, 0, "unexpected_file", "",
                       f"name does not have the form <subset>_{suffix}; ignored")
                continue
            subsets.add(prefix)
    return sorted(subsets)


# --------------------------------------------------------------------------------------------- joining


def _box_outside_frame(box: CropBox, height: int) -> str | None:
    """Why ``box`` does not fit a 16:9 frame of ``height`` pixels, or None if it fits."""
    width = round(height * 16 / 9)
    if box.x < 0 or box.y < 0 or box.x + box.w > width or box.y + box.h > height:
        return (f"box x={box.x:g} y={box.y:g} w={box.w:g} h={box.h:g} exceeds the 16:9 frame "
                f"{width}x{height}; kept, the crop stage clamps it to the real frame")
    return None


def _check_row_counts(subset: str, tables: dict[str, _Table], issues: list[AnnotationIssue]) -> None:
    """Record when url/resolution/time row counts differ, or crop rows do not match the clip count."""
    videos = {kind: tables[kind] for kind in ("url", "resolution", "time") if tables[kind].present}
    if len({table.n_rows for table in videos.values()}) > 1:
        counts = ", ".join(f"{table.n_rows} rows in {table.file}" for table in videos.values())
        _issue(issues, videos.get("time", next(iter(videos.values()))).file, 0, "row_count_mismatch", subset,
               counts)
    time = tables["time"]
    if not time.present:
        return
    n_clips = sum(len(row.value) for row in time.rows.values())
    for kind in ("crop_wh", "crop_ratio"):
        table = tables[kind]
        if table.present and table.n_rows != n_clips:
            _issue(issues, table.file, 0, "row_count_mismatch", subset,
                   f"{table.n_rows} rows in {table.file} for {n_clips} clips in {time.file}")


def _where(video: str, tables: Iterable[_Table]) -> str:
    places = [f"{table.file}:{(table.rows[video].line if video in table.rows else table.malformed[video])}"
              for table in tables if video in table.rows or video in table.malformed]
    return ", ".join(places) if places else "nowhere"


def _join_subset(subset: str, tables: dict[str, _Table], claimed: dict[str, str],
                 issues: list[AnnotationIssue]) -> list[HdtfClip]:
    """Join the five files of one subset into clips; ``claimed`` maps videos already seen to their subset."""
    url, resolution, time = tables["url"], tables["resolution"], tables["time"]
    boxes, ratios = tables["crop_wh"], tables["crop_ratio"]
    _check_row_counts(subset, tables, issues)
    videos = sorted(set(url.rows) | set(url.malformed) | set(resolution.rows) | set(resolution.malformed)
                    | set(time.rows) | set(time.malformed))
    clips: list[HdtfClip] = []
    made: set[str] = set()
    bad_names: dict[str, tuple[str, str]] = {}
    for video in videos:
        if video in claimed:
            _issue(issues, time.file, time.rows[video].line if video in time.rows else 0, "duplicate_row",
                   video, f"video already annotated in subset {claimed[video]}; that one wins")
            continue
        claimed[video] = subset
        defined = next(((table.file, table.rows[video].line) for table in (time, resolution, url)
                        if video in table.rows), (time.file, 0))
        problem = name_problem(video)
        if problem is not None:
            bad_names[video] = problem
            _issue(issues, *defined, problem[0], video, problem[1])
        elif not CLIP_ID_PATTERN.fullmatch(video):
            _issue(issues, *defined, "id_renamed", video,
                   f"{video!r} has characters a clip id cannot hold (only [A-Za-z0-9_-]; a '.' would split a "
                   f"WebDataset key): its clips are renamed, e.g. {as_clip_id(video + '_0')}, noted renamed_from")
        video_url = url.rows[video].value if video in url.rows else None
        notes: list[str] = []
        if video not in url.rows:
            notes.append("not_in_url_list")
            if url.present and video in time.rows:
                _issue(issues, url.file, url.malformed.get(video, 0), "not_in_url_list", video,
                       f"annotated ({_where(video, [resolution, time])}) but no usable row in {url.file}")
        if video not in time.rows:
            if video in time.malformed:  # malformed_line already recorded at that line
                reason, detail = "malformed_line", f"time line {time.file}:{time.malformed[video]} unparsable"
            else:
                reason, detail = "no_time_annotation", f"no line in {time.file}"
                where = _where(video, [url, resolution])
                _issue(issues, time.file, 0, "no_time_annotation", video, f"listed at {where} but {detail}")
            clips.append(HdtfClip(clip_id=video, video=video, subset=subset, url=video_url,
                                  notes=tuple(notes), reject_reason=reason, reject_detail=detail))
            continue
        time_row = time.rows[video]
        height: int | None = None
        if video in resolution.rows:
            height = resolution.rows[video].value or None
            if height is None:
                notes.append("resolution_zero")
        else:
            notes.append("resolution_missing")
            if resolution.present:
                why = "its row is malformed" if video in resolution.malformed else "no row"
                _issue(issues, resolution.file, resolution.malformed.get(video, 0), "resolution_missing",
                       video, f"{why} for a video with clips; crop boxes cannot be scaled")
        if time_row.duplicate_lines or (video in resolution.rows and resolution.rows[video].duplicate_lines):
            notes.append("duplicate_row")
        for index, (start_s, end_s) in enumerate(time_row.value):
            clip_id = f"{video}_{index}"
            made.add(clip_id)
            clips.append(_join_clip(clip_id, video, subset, start_s, end_s, height, video_url, list(notes),
                                    tables, issues))
    for table in (boxes, ratios):
        for clip_id, row in table.rows.items():
            if clip_id not in made:
                video, index = _CLIP_NAME.fullmatch(clip_id).groups()
                if video in time.malformed:
                    why = f"the time line of {video} ({time.file}:{time.malformed[video]}) is unparsable"
                elif video in time.rows:
                    why = f"{video} has {len(time.rows[video].value)} clips in {time.file}"
                else:
                    why = f"{video} has no line in {time.file}"
                _issue(issues, table.file, row.line, "crop_without_clip", clip_id, f"no clip {index}: {why}")
    # a bad name outranks every other reason: the clip can never be processed under it
    return [replace(clip, reject_reason=bad_names[clip.video][0], reject_detail=bad_names[clip.video][1])
            if clip.video in bad_names else clip for clip in clips]


def _join_clip(clip_id: str, video: str, subset: str, start_s: float, end_s: float, height: int | None,
               video_url: str | None, notes: list[str], tables: dict[str, _Table],
               issues: list[AnnotationIssue]) -> HdtfClip:
    """One clip of a video: attach its crop box and ratio, noting what is missing or suspect."""
    boxes, ratios, time = tables["crop_wh"], tables["crop_ratio"], tables["time"]
    box_row, ratio_row = boxes.rows.get(clip_id), ratios.rows.get(clip_id)
    box = box_row.value if box_row else None
    defined_at = f"{time.file}:{time.rows[video].line}"
    if box is None:
        notes.append("crop_box_missing")
        if boxes.present:
            why = (f"its row (line {boxes.malformed[clip_id]}) is malformed" if clip_id in boxes.malformed
                   else "no row")
            _issue(issues, boxes.file, boxes.malformed.get(clip_id, 0), "crop_box_missing", clip_id,
                   f"{why} for the clip of {defined_at}; a landmark-derived box is used")
    elif box.w <= 0 or box.h <= 0:
        notes.append("crop_box_invalid")  # issue recorded when the row was read
    elif height:
        outside = _box_outside_frame(box, height)
        if outside:
            notes.append("crop_box_outside_frame")
            _issue(issues, boxes.file, box_row.line, "crop_box_outside_frame", clip_id, outside)
    if ratio_row is None:
        notes.append("crop_ratio_missing")
        if ratios.present:
            why = (f"its row (line {ratios.malformed[clip_id]}) is malformed" if clip_id in ratios.malformed
                   else "no row")
            _issue(issues, ratios.file, ratios.malformed.get(clip_id, 0), "crop_ratio_missing", clip_id,
                   f"{why} for the clip of {defined_at}")
    if ((box_row and box_row.duplicate_lines) or (ratio_row and ratio_row.duplicate_lines)) \
            and "duplicate_row" not in notes:
        notes.append("duplicate_row")
    reject_reason, reject_detail = None, ""
    if end_s <= start_s:
        reject_reason = "bad_time_range"
        reject_detail = f"end {end_s:g}s is not after start {start_s:g}s ({defined_at})"
    return HdtfClip(clip_id=clip_id, video=video, subset=subset, start_s=start_s, end_s=end_s, box=box,
                    annotated_height=height, crop_ratio=ratio_row.value if ratio_row else None, url=video_url,
                    notes=tuple(notes), reject_reason=reject_reason, reject_detail=reject_detail)


# --------------------------------------------------------------------------------------------- public API


def read_hdtf_annotations(annotations_dir: Path) -> tuple[HdtfAnnotations, list[AnnotationIssue]]:
    """Read and join every subset's five files in ``annotations_dir``; never raises on bad content.

    Every video and clip mentioned in any file ends up either as an ``HdtfClip`` or in an issue.
    """
    annotations_dir = Path(annotations_dir)
    issues: list[AnnotationIssue] = []
    subsets = _find_subsets(annotations_dir, issues) if annotations_dir.is_dir() else []
    if not subsets:
        _issue(issues, str(annotations_dir), 0, "file_missing", "",
               f"no *_{FILE_SUFFIXES['time']} (or other HDTF annotation file) found")
    clips: list[HdtfClip] = []
    urls: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for subset in subsets:
        tables: dict[str, _Table] = {}
        for kind, suffix in FILE_SUFFIXES.items():
            path = annotations_dir / f"{subset}_{suffix}"
            tables[kind] = _read_table(path, issues, _PARSERS[kind])
            if not tables[kind].present:
                _issue(issues, path.name, 0, "file_missing", subset, f"subset {subset} has no {path.name}")
        for video, row in tables["url"].rows.items():
            urls.setdefault(video, row.value)
        clips.extend(_join_subset(subset, tables, claimed, issues))
    clips.sort(key=lambda clip: clip.clip_id)
    return HdtfAnnotations(clips=tuple(clips), urls=urls, subsets=tuple(subsets)), issues


def hdtf_candidates(annotations_dir: Path, videos_dir: Path) -> tuple[list[Candidate], list[AnnotationIssue]]:
    """One ``Candidate`` per annotated clip (sorted by id) and all annotation issues.

    Sources are ``videos_dir/Name.mp4``, or ``Name.webm``/``Name.mkv``/... when that is how the video was
    downloaded (yt-dlp keeps YouTube's container unless told otherwise); a clip whose file is absent gets
    ``reject_reason="missing_source"`` (unless it was already rejected for an annotation reason), so a partial
    download never raises. A found entry that is not a readable regular file inside ``videos_dir`` rejects its
    clips with the reason of ``preprocess.datasets.discover.video_entry_problem``. Names rejected by ``name_problem`` are
    never looked up. Ids are as annotated: ``discover_candidates`` settles them.
    """
    annotations, issues = read_hdtf_annotations(annotations_dir)
    videos_dir = Path(videos_dir)
    sources: dict[str, tuple[Path | None, tuple[str, str] | None]] = {}
    candidates = []
    for clip in annotations.clips:
        if clip.video not in sources:
            unsafe = name_problem(clip.video)
            sources[clip.video] = (None, unsafe) if unsafe else _downloaded_video(videos_dir, clip.video)
        found, problem = sources[clip.video]
        # only a string for the table: never opened when the name was refused
        source = found or videos_dir / f"{clip.video}.mp4"
        reject_reason, reject_detail = clip.reject_reason, clip.reject_detail
        if reject_reason is None and problem is not None:
            reject_reason, reject_detail = problem
        elif reject_reason is None and found is None:
            reject_reason, reject_detail = "missing_source", f"{source} not found (nor another video container)"
        candidates.append(Candidate(
            candidate_id=clip.clip_id, source=str(source), dataset=DATASET, start_s=clip.start_s,
            end_s=clip.end_s, annotated_box=clip.box, annotated_height=clip.annotated_height,
            crop_ratio=clip.crop_ratio, notes=clip.notes, reject_reason=reject_reason,
            reject_detail=reject_detail))
    return candidates, issues


def _downloaded_video(videos_dir: Path, name: str) -> tuple[Path | None, tuple[str, str] | None]:
    """The first readable ``Name.<video container>`` in ``VIDEO_EXTENSIONS`` order (``.mp4`` first) as
    ``(path, None)``; else ``(path, (reason, detail))`` for the first entry there that is not one (a broken link,
    a directory, a link out of ``videos_dir``...); else ``(None, None)`` when there is no entry at all."""
    first_problem: tuple[Path, tuple[str, str]] | None = None
    for extension in VIDEO_EXTENSIONS:
        path = videos_dir / f"{name}{extension}"
        if not os.path.lexists(path):
            continue
        problem = video_entry_problem(path, confine_to=videos_dir)
        if problem is None:
            return path, None
        first_problem = first_problem or (path, problem)
    return first_problem if first_problem else (None, None)


def summarise_issues(issues: Iterable[AnnotationIssue]) -> dict[str, int]:
    """Issue count per kind, sorted by kind (for logs and run summaries)."""
    return dict(sorted(Counter(issue.kind for issue in issues).items()))


def main(argv: list[str] | None = None) -> None:
    """Print issue counts per kind and candidate counts for an annotation folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations_dir", type=Path)
    parser.add_argument("--videos", type=Path, default=None,
                        help="folder of downloaded Name.mp4 files (default: not checked)")
    args = parser.parse_args(argv)
    if args.videos is None:
        annotations, issues = read_hdtf_annotations(args.annotations_dir)
        reasons = Counter(clip.reject_reason for clip in annotations.clips if clip.reject_reason)
        n_candidates = len(annotations.clips)
    else:
        candidates, issues = hdtf_candidates(args.annotations_dir, args.videos)
        reasons = Counter(c.reject_reason for c in candidates if c.reject_reason)
        n_candidates = len(candidates)
    print("issues per kind:")
    for kind, count in summarise_issues(issues).items():
        print(f"  {kind:24s} {count}")
    print(f"candidates: {n_candidates}")
    for reason, count in sorted(reasons.items()):
        print(f"  rejected {reason:15s} {count}")


if __name__ == "__main__":
    main()
