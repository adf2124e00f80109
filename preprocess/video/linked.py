"""Stage entries made of arrays that an earlier stage's decode already wrote: the face mesh and the frame-quality
measures run inside standardise's one decode (``preprocess.video.standardise``), and their own entries hard-link
those arrays (copies where links are not possible), so that no array is stored twice."""

from __future__ import annotations

from pathlib import Path

from preprocess.run.cache import link_or_copy
from preprocess.run.job import Workspace


def linked_from_standardise(workspace: Workspace, standardise_key: str, part: str, files: tuple[str, ...],
                            out_dir: Path) -> dict:
    """The ``part`` ("faces" or "frame_quality") result stored with the standardise entry, its ``files`` linked into
    ``out_dir``."""
    stored = workspace.cache.load("standardise", standardise_key)
    if stored is None or part not in stored:  # removed under the run: an uncached error, the next run recomputes
        raise RuntimeError(f"the standardise entry {standardise_key} holds no {part} result")
    if stored[part]["kind"] == "ok":
        clip_dir = workspace.cache.entry_dir("standardise", standardise_key)
        for name in files:
            link_or_copy(clip_dir / name, out_dir / name)
    return stored[part]
