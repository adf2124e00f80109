"""Video files and names, shared by every dataset reader: which entries are readable videos, safe clip ids, and
the candidates of a plain folder tree of videos.

No name can stop a run: whatever the discovered names are, ``discover_candidates`` returns candidates that
are safe to pass on (``settle_candidates``, applied to every dataset kind):

- every candidate id is a valid shard key (``[A-Za-z0-9_-]+``) and unique, and no candidate id equals a
  piece id ``<other candidate id>_p<n>`` that filter-and-split may give another candidate's pieces; an id
  that had to change is renamed deterministically and noted (``renamed_from:<old id>``);
- every ``source`` is valid UTF-8, so the candidate survives Prefect's JSON parameters and the parquet
  tables; a path that is not (a non-UTF-8 file name) is carried with its odd bytes written ``\\xNN`` and the
  candidate is rejected ``bad_name``;
- every entry with a video extension that is not a readable regular file becomes a rejected candidate
  (``broken_link``, ``symlink_loop``, ``not_a_file``, ``unreadable``) instead of vanishing, so it gets a row.

HDTF paths come from annotation text, so ``preprocess/datasets/hdtf.py`` also refuses names that are not a plain file
name (``unsafe_path``, ``bad_name``) and sources that resolve outside ``raw_dir`` (``link_outside_raw_dir``).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from preprocess.run.records import Candidate
from shards.schema import CLIP_ID_PATTERN

# the containers talking-head collections come in; anything else in a folder (notes, audio, frames) is not a clip
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".wmv", ".3gp", ".ogv")
# Reject reasons given at discovery (before any stage runs), for names and entries that cannot be read as videos.
DISCOVERY_REASONS = ("bad_name", "unsafe_path", "link_outside_raw_dir", "broken_link", "symlink_loop",
                     "not_a_file", "unreadable")
_PIECE_ID = re.compile(r"(.+)_p(\d+)")  # the ids run_select gives the pieces of a split candidate
RENAMED_NOTE = "renamed_from:"


def as_clip_id(text: str) -> str:
    """``text`` with every character a shard key cannot hold (only [A-Za-z0-9_-]; a dot would split the key)
    replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def clip_id_for(relative: Path) -> str:
    """A clip id from a relative path: ``a/b c.mp4`` -> ``a__b_c``."""
    return as_clip_id(Path(relative).with_suffix("").as_posix().replace("/", "__"))


def display_path(path: str | Path) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 (surrogate escapes in Python) written ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def is_utf8(text: str) -> bool:
    """False for a str holding surrogate escapes (an undecodable file name), which JSON and parquet refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def video_entry_problem(path: Path, confine_to: Path | None = None) -> tuple[str, str] | None:
    """Why ``path`` (an entry with a video extension) cannot be read as a video file, or None if it can.

    Returns ``(reason, detail)`` with reason ``broken_link``, ``symlink_loop``, ``not_a_file`` (a directory,
    pipe, socket or device: never opened, a pipe would block the reader), ``unreadable`` (cannot be opened), or,
    when ``confine_to`` is given, ``link_outside_raw_dir`` (a symlink whose target resolves outside it).
    """
    shown = display_path(path)
    try:
        entry = path.lstat()
    except OSError as error:
        return "unreadable", f"{shown}: cannot stat ({error.strerror}); check the path and its permissions"
    if stat.S_ISLNK(entry.st_mode):
        target = display_path(os.readlink(path))
        try:
            entry = path.stat()
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "symlink_loop", (f"{shown} is a symbolic link that loops ({error.strerror}, via {target}); "
                                        "point it at a real file or remove it")
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                return "broken_link", (f"{shown} is a symbolic link to {target}, which does not exist; "
                                       "restore the target or remove the link")
            return "unreadable", f"{shown}: cannot follow the link to {target} ({error.strerror})"
        if confine_to is not None:
            real, root = os.path.realpath(path), os.path.realpath(confine_to)
            if os.path.commonpath([real, root]) != root:
                return "link_outside_raw_dir", (
                    f"{shown} is a symbolic link to {display_path(real)}, outside raw_dir {display_path(root)}; "
                    "sources named by annotation files must stay inside raw_dir: copy or move the video into it")
    if not stat.S_ISREG(entry.st_mode):
        return "not_a_file", f"{shown} has a video extension but is {_kind_of(entry.st_mode)}; rename or move it"
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        return "unreadable", f"{shown} cannot be opened ({error.strerror}); fix its permissions"
    return None


def settle_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Make a discovered list safe to run, for every dataset kind; returns it sorted by candidate id.

    Sources that are not valid UTF-8 are rejected ``bad_name`` (shown with ``\\xNN`` escapes). Ids are made
    valid shard keys, then unique, and no id may equal ``<another id>_p<n>`` (a piece id of a split candidate).
    First every valid id is kept unless it clashes with one kept before it, in (id, source) order, so ``X``
    keeps ``X``; then the others are renamed in the same order: made valid (``A.B_0`` -> ``A_B_0``) and, if that
    clashes, suffixed with the source's extension, then a number (``X_p0`` -> ``X_p0_mp4``, ``X_p0_mp42``, ...).
    Renamed candidates carry the note ``renamed_from:<old id>``. Applying it twice changes nothing.
    """
    taken: set[str] = set()
    piece_bases: set[str] = set()  # the ids that taken ids would be a piece of

    def conflicts(clip_id: str) -> bool:
        match = _PIECE_ID.fullmatch(clip_id)
        return clip_id in taken or clip_id in piece_bases or (match is not None and match.group(1) in taken)

    def take(clip_id: str) -> None:
        taken.add(clip_id)
        match = _PIECE_ID.fullmatch(clip_id)
        if match is not None:
            piece_bases.add(match.group(1))

    settled, to_rename = [], []
    for candidate in sorted(candidates, key=lambda c: (c.candidate_id, c.source)):
        if not is_utf8(candidate.source):
            shown = display_path(candidate.source)
            candidate = replace(candidate, source=shown, **({} if candidate.reject_reason else {
                "reject_reason": "bad_name",
                "reject_detail": f"the path {shown} is not valid UTF-8 (\\xNN: undecodable bytes), which the run's "
                                 "JSON parameters and the parquet tables cannot hold; rename it to UTF-8"}))
        if CLIP_ID_PATTERN.fullmatch(candidate.candidate_id) and not conflicts(candidate.candidate_id):
            take(candidate.candidate_id)
            settled.append(candidate)
        else:
            to_rename.append(candidate)
    for candidate in to_rename:  # after every id that could stay, so a renamed id never displaces one
        clip_id = as_clip_id(candidate.candidate_id)
        if conflicts(clip_id):
            extension = re.sub(r"[^A-Za-z0-9]", "", Path(candidate.source).suffix.lower()) or "clip"
            base, number = f"{clip_id}_{extension}", 1
            clip_id = base
            while conflicts(clip_id):
                number += 1
                clip_id = f"{base}{number}"
        take(clip_id)
        settled.append(replace(candidate, candidate_id=clip_id,
                               notes=(*candidate.notes, f"{RENAMED_NOTE}{display_path(candidate.candidate_id)}")))
    return sorted(settled, key=lambda c: c.candidate_id)


def folder_candidates(raw_dir: Path, dataset: str = "folder", pattern: str = "**/*") -> list[Candidate]:
    """One candidate per entry with a video extension under ``raw_dir`` (whole duration, crop box from the face).

    Entries that are not readable regular files are rejected candidates (see ``video_entry_problem``); symbolic
    links to files are followed, wherever they point (a folder of links is a common way to curate a dataset).
    Hidden entries (``.name``) are skipped. Sorted by id; ids settled by ``settle_candidates``.
    """
    raw_dir = Path(raw_dir)
    entries = sorted(p for p in raw_dir.glob(pattern)
                     if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
    candidates = []
    for entry in entries:
        problem = video_entry_problem(entry)
        reason, detail = problem if problem else (None, "")
        candidates.append(Candidate(candidate_id=clip_id_for(entry.relative_to(raw_dir)), source=str(entry),
                                    dataset=dataset, reject_reason=reason, reject_detail=detail))
    return settle_candidates(candidates)
