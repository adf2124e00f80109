"""Temp files and folders that interrupted runs leave in an out_dir, found (for ``validate``) and removed (by a run
that holds the out_dir's lock).

Every writer of the project writes under a temp name and renames into place: cache entries
(``work/<stage>/.tmp-<key>-<pid>@<host>-<hex>``), JSON files (``.<name>.tmp-<hex>``: summary.json, fingerprints,
partition markers), shards and tables (``.<name>.tmp-<pid>``). A temp name that survives is a write that never
finished. Under the out_dir's lock (``shards.output_lock``) taken before any work starts, no writer of another run
can be alive, whatever host or pid its temp names, so all of them are removed: a run restarted in a new container
(another host name) cleans up after the old one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# ".tmp-..." (cache entries) or ".<name>.tmp-..." (files); the lock file and other dot files never match
TEMP_NAME = re.compile(r"^\.(tmp-.+|.+\.tmp-[^/]+)$")


def find_leftovers(out_dir: Path) -> list[Path]:
    """Every temp file or folder under ``out_dir`` (not what is inside a temp folder), sorted."""
    found = []
    for root, dirs, files in os.walk(out_dir):
        for name in list(dirs):
            if TEMP_NAME.match(name):
                found.append(Path(root) / name)
                dirs.remove(name)  # its content belongs to it
        found += [Path(root) / name for name in files if TEMP_NAME.match(name)]
    return sorted(found)


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Remove every temp file and folder under ``out_dir``; only call it holding the out_dir's lock, before this
    run has started writing. Returns what was removed."""
    removed = find_leftovers(out_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
