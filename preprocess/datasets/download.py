"""Optional: download HDTF's source videos from YouTube with yt-dlp (``pip install -e ".[download]"``).

Nothing else in the project needs the network. Videos already present are skipped; each download goes to a
temporary name and is renamed when complete, so a broken-off download never looks like a video.

Video names are text from the url files, so no name reaches a path unchecked: a name that is not a plain file name
(``preprocess.datasets.hdtf.name_problem``: a ``/`` or ``\\``, ``.``, ``..``, control characters) is refused with
its reason and nothing is written for it, and every path is checked to lie in the output folder. yt-dlp never sees
a name: its output template is a fixed temporary name (a hash of the video name) in the output folder with ``%``
escaped as ``%%`` (yt-dlp reads ``%(field)s`` in a template as a field of the video, which would put the file
elsewhere), and Python renames the finished file to ``Name.mp4``, the name ``hdtf_candidates`` looks for.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from preprocess.datasets.hdtf import FILE_SUFFIXES, name_problem, read_hdtf_annotations

FORMAT = "bestvideo[ext=mp4]+bestaudio[ext=m4a]/best[ext=mp4]/best"


def download_paths(out_dir: Path, name: str) -> tuple[Path | None, Path | None, tuple[str, str] | None]:
    """``(out_dir/Name.mp4, the temporary download path, None)`` for the video ``name``, both inside the resolved
    ``out_dir``, or ``(None, None, (reason, detail))`` when ``name`` cannot be a file name there. The temporary name
    holds no character of ``name`` (a hash of it, so a rerun continues the same partial download)."""
    problem = name_problem(name)
    root = Path(os.path.realpath(out_dir))
    target = root / f"{name}.mp4"
    if problem is None and (Path(os.path.normpath(target)).parent != root or target.name != f"{name}.mp4"):
        problem = ("unsafe_path", "")
    if problem is not None:
        return None, None, (problem[0], f"video name {name!r} is not a plain file name, so it cannot name a file "
                                        f"inside {root}; not downloaded. Fix the name in the url files")
    return target, root / f".download-{hashlib.sha256(name.encode()).hexdigest()[:16]}.mp4", None


def yt_dlp_template(path: Path) -> str:
    """``path`` as a yt-dlp output template that means exactly that path: every ``%`` doubled."""
    return str(path).replace("%", "%%")


def download_hdtf_videos(annotations_dir: Path, out_dir: Path, names: list[str] | None = None) -> dict[str, str]:
    """Download ``Name.mp4`` for every (or each named) video in the url files; returns name -> status.

    A status is ``present``, ``downloaded``, ``failed: <error>`` (unavailable videos are common; the others go
    on), ``refused (<reason>): <detail>`` for a name that is not a plain file name, or ``not in the url files`` for
    a requested name. A url-file line that is not ``Name URL`` (a name with a space) is reported under
    ``<file> line <n>`` as ``skipped: <why>`` when no names are requested."""
    try:
        import yt_dlp
    except ImportError as error:
        raise SystemExit('yt-dlp is not installed: pip install -e ".[download]"') from error
    annotations, issues = read_hdtf_annotations(Path(annotations_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    statuses = {}
    if not names:
        for issue in issues:
            if issue.file.endswith(FILE_SUFFIXES["url"]) and issue.kind == "malformed_line":
                statuses[f"{issue.file} line {issue.line}"] = f"skipped: {issue.detail}"
    for name in sorted(set(names or ()) - set(annotations.urls)):
        statuses[name] = "not in the url files"
    for name, url in sorted(annotations.urls.items()):
        if names and name not in names:
            continue
        target, partial, refusal = download_paths(out_dir, name)
        if refusal is not None:
            statuses[name] = f"refused ({refusal[0]}): {refusal[1]}"
            continue
        try:
            if target.exists():  # inside the try: a name too long for a file raises here
                statuses[name] = "present"
                continue
            options = {"outtmpl": yt_dlp_template(partial), "format": FORMAT, "merge_output_format": "mp4",
                       "quiet": True, "noprogress": True}
            with yt_dlp.YoutubeDL(options) as downloader:
                downloader.download([url])
            partial.replace(target)
            statuses[name] = "downloaded"
        except Exception as error:  # unavailable videos are common, and names too long for a file: record, go on
            statuses[name] = f"failed: {error}"
    return statuses
