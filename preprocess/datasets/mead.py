"""Reading MEAD's folder layout into candidate clips: each camera video paired with its microphone recording.

MEAD (Wang et al., "MEAD: A Large-scale Audio-visual Dataset for Emotional Talking-face Generation", ECCV 2020)
is distributed per subject (``M003``, ``W009``, ...), as its README and the public loaders that read it lay it out
(e.g. the EMOTE/inferno ``process_mead.py``, and scripts that map ``video/<view>/...mp4`` to ``audio/...m4a``)::

    <subject>/video/<view>/<emotion>/level_<n>/<nnn>.mp4    view: front, down, top, left_30, left_60, right_30, right_60
    <subject>/audio/<emotion>/level_<n>/<nnn>.m4a           one microphone recording for all seven cameras

with the eight emotions ``angry contempt disgusted fear happy neutral sad surprised`` and intensity levels 1-3
(neutral has level 1 only). The microphone audio is the clip's sound; the cameras' own tracks are not (they may be
missing, a camera microphone, or silence), so each candidate carries its microphone file as ``audio_source``
(``preprocess.video.standardise`` reads it as a second input over the same time range). Which views become candidates is
``settings.layouts.mead_views`` (default ``front``: the talking-face benchmarks use the frontal camera).

Each candidate is one whole recording (start 0, to the end) with ``subject``, ``emotion`` and ``emotion_level``
set (clips-table columns). Anomalies (issue kinds; ``*`` also rejects the candidate with that reason so that it
keeps a row): ``video_without_audio*`` (reason ``missing_audio``: no ``audio/<emotion>/level_<n>/<nnn>.*``),
``unknown_emotion*`` (a folder name outside the eight: a typo such as ``surprise`` would mislabel every clip under
it), ``bad_level*`` (not ``level_<n>``), ``unexpected_path`` (a video or audio file not at the layout's depth;
skipped), ``audio_without_video`` (a recording no used camera has; nothing to make), ``view_not_used`` (one issue per
subject and view not in ``mead_views``, with its video count), ``unknown_view``, ``no_video_folder``, plus the
entry reasons of ``preprocess.datasets.discover.video_entry_problem`` (broken links, unreadable files) for either file.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from preprocess.datasets.video_files import VIDEO_EXTENSIONS, as_clip_id, video_entry_problem
from preprocess.run.records import AnnotationIssue, Candidate

DATASET = "mead"
EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised")
VIEWS = ("front", "down", "top", "left_30", "left_60", "right_30", "right_60")
AUDIO_EXTENSIONS = (".m4a", ".wav", ".aac", ".mp3", ".flac")
_LEVEL = re.compile(r"level_(\d+)")


def looked_for(raw_dir: Path, views: tuple[str, ...] = ("front",)) -> str:
    """What discovery looked for, for the error of a run with no candidates (with the views that are there)."""
    raw_dir = Path(raw_dir)
    present = sorted({path.name for pattern in ("video/*", "*/video/*") for path in raw_dir.glob(pattern)
                      if path.is_dir()})
    return (f"MEAD subject folders under raw_dir {raw_dir} holding <subject>/video/<view>/<emotion>/level_<n>/<nnn>.mp4 "
            f"for the views {list(views)} (settings layouts.mead_views), paired with "
            f"<subject>/audio/<emotion>/level_<n>/<nnn>.m4a; views found there: {present or 'none'}")


def _files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Entries with one of ``extensions`` under ``folder`` (hidden entries skipped), sorted."""
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in extensions and not path.name.startswith("."))


def _emotion_and_level(parts: tuple[str, ...]) -> tuple[str, int | None]:
    """(emotion folder name, level number or None when the level folder is not ``level_<n>``)."""
    emotion, level = parts[-3], _LEVEL.fullmatch(parts[-2])
    return emotion, int(level.group(1)) if level else None


def _subject_candidates(subject_dir: Path, raw_dir: Path, views: tuple[str, ...],
                        issues: list[AnnotationIssue]) -> list[Candidate]:
    subject = subject_dir.name

    def issue(path: Path | str, kind: str, detail: str) -> None:
        shown = path.relative_to(raw_dir).as_posix() if isinstance(path, Path) else path
        issues.append(AnnotationIssue(shown, 0, kind, subject, detail))

    audio_dir, video_dir = subject_dir / "audio", subject_dir / "video"
    audio: dict[tuple[str, str, str], Path] = {}
    if audio_dir.is_dir():
        for path in _files(audio_dir, AUDIO_EXTENSIONS):
            parts = path.relative_to(audio_dir).parts
            if len(parts) != 3:
                issue(path, "unexpected_path", "audio not at audio/<emotion>/level_<n>/<nnn>.m4a; ignored")
                continue
            audio.setdefault((parts[0], parts[1], path.stem), path)
    if not video_dir.is_dir():
        issue(subject_dir, "no_video_folder", f"{subject} has no video/ folder; its {len(audio)} recordings are unused")
        return []
    candidates, paired, other_views = [], set(), Counter()
    for path in _files(video_dir, VIDEO_EXTENSIONS):
        parts = path.relative_to(video_dir).parts
        if len(parts) != 4:
            issue(path, "unexpected_path", "video not at video/<view>/<emotion>/level_<n>/<nnn>.mp4; ignored")
            continue
        view = parts[0]
        if view not in views:
            other_views[view] += 1
            continue
        emotion, level = _emotion_and_level(parts)
        key = (emotion, parts[2], path.stem)
        clip_id = as_clip_id(f"{subject}_{view}_{emotion}_{parts[2]}_{path.stem}")
        mic = audio.get(key)
        reason, detail = None, ""
        if emotion not in EMOTIONS:
            reason, detail = "unknown_emotion", (f"emotion folder {emotion!r} is not one of MEAD's {list(EMOTIONS)}; "
                                                 "rename the folder (its clips would be mislabelled)")
        elif level is None:
            reason, detail = "bad_level", f"level folder {parts[2]!r} is not level_<n>; rename it"
        elif mic is None:
            reason, detail = "missing_audio", (f"no microphone recording audio/{emotion}/{parts[2]}/{path.stem}.m4a "
                                               f"(or {'/'.join(AUDIO_EXTENSIONS[1:])}) for this video in {subject}")
        else:
            problem = video_entry_problem(path) or video_entry_problem(mic)
            if problem:
                reason, detail = problem
        if reason in ("unknown_emotion", "bad_level", "missing_audio"):
            issue(path, {"missing_audio": "video_without_audio"}.get(reason, reason), detail)
        if mic is not None:
            paired.add(key)
        candidates.append(Candidate(
            candidate_id=clip_id, source=str(path), dataset=DATASET, audio_source=str(mic) if mic else None,
            subject=subject, emotion=emotion, emotion_level=level, notes=(f"view:{view}",),
            reject_reason=reason, reject_detail=detail))
    for view, count in sorted(other_views.items()):
        kind = "view_not_used" if view in VIEWS else "unknown_view"
        issue(video_dir / view, kind, f"{count} videos of view {view!r} skipped (layouts.mead_views={list(views)})")
    used_views = [view for view in views if (video_dir / view).is_dir()]
    for key, path in sorted(audio.items()):
        if key not in paired and used_views:
            issue(path, "audio_without_video", f"no video {'/'.join(key)}.mp4 in the views {used_views}; unused")
    return candidates


def mead_candidates(raw_dir: Path, views: tuple[str, ...] = ("front",)) -> tuple[list[Candidate], list[AnnotationIssue]]:
    """Candidates of every subject folder under ``raw_dir`` (one holding ``video/`` or ``audio/``; ``raw_dir``
    itself may be one subject's folder), sorted by id; never raises on bad content. Ids are
    ``<subject>_<view>_<emotion>_level_<n>_<nnn>``, settled by ``discover_candidates``."""
    raw_dir = Path(raw_dir)
    issues: list[AnnotationIssue] = []
    if (raw_dir / "video").is_dir() or (raw_dir / "audio").is_dir():
        subjects = [raw_dir]
    else:
        subjects = sorted(path for path in raw_dir.iterdir()
                          if path.is_dir() and ((path / "video").is_dir() or (path / "audio").is_dir()))
    candidates = []
    for subject_dir in subjects:
        candidates += _subject_candidates(subject_dir, raw_dir if subject_dir != raw_dir else raw_dir.parent,
                                          tuple(views), issues)
    return sorted(candidates, key=lambda c: c.candidate_id), issues
