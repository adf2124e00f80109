"""Which failures reject one clip and which fail the whole run.

A clip-specific failure (a damaged file, an ffmpeg error on that input, a stage bug triggered by that clip) rejects
the clip with reason ``error`` (or ``timeout``) and the run goes on. A failure of the environment (a model that
cannot be imported or loaded, CUDA errors, out of memory, a full disk) would hit every clip the same way: turning
it into one ``error`` rejection per clip makes an empty dataset that looks like a success, so it stops the run
instead, once, with the reason. So does a stage whose clip failures exceed ``RunLimits.max_error_fraction`` of
the clips it ran on: that many "clip" failures are not about the clips.

Media tools follow the same split (``preprocess.run.media.check_tool_run``): a full disk, an I/O error or no memory
reported by ffmpeg becomes an ``OSError`` with that errno (environmental: the run stops); a tool killed by a
signal, past its time limit or missing a file is a ``TransientMediaFailure`` (the clip's uncached ``error``,
retried next run); only ffmpeg rejecting the input is a verdict that a stage may cache.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from collections.abc import Iterable

# Clip reject reasons that mean "the stage failed" rather than "the clip is not good training data".
FAILURE_REASONS = ("error", "timeout")
# Substrings of RuntimeError messages raised by a broken GPU setup rather than by an input.
_DEVICE_ERROR_MARKERS = ("CUDA", "cuDNN", "cuBLAS", "NCCL", "out of memory", "HIP error", "no kernel image",
                         "Found no NVIDIA driver")
# EIO: a failing disk or network file system (ffmpeg's "Input/output error", preprocess.run.media.MediaEnvironmentError)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO}


class EnvironmentFailure(RuntimeError):
    """A stage failed because of the environment, not the clip: the run stops."""

    def __init__(self, stage: str, clip_id: str, cause: BaseException):
        super().__init__(f"stage {stage} cannot run in this environment (first seen on {clip_id}): "
                         f"{type(cause).__name__}: {cause}")
        self.stage, self.clip_id = stage, clip_id


class ModelNotFoundError(RuntimeError):
    """A configured model is not available locally (and could not be fetched)."""


class RunFailed(RuntimeError):
    """The run cannot do its job (see the message); nothing was published."""


def is_environment_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the environment (imports, model loading, device, memory, disk)."""
    if isinstance(error, (EnvironmentFailure, ImportError, ModelNotFoundError, MemoryError)):
        return True
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        return True
    if isinstance(error, RuntimeError) and any(marker in str(error) for marker in _DEVICE_ERROR_MARKERS):
        return True
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and is_environment_error(cause)


def stage_failure_shares(attempts: Iterable[tuple[str, str, bool]]) -> dict[str, tuple[int, int]]:
    """Per stage, (failed, attempted) counts of distinct items, from (stage, item id, failed) records."""
    attempted: dict[str, set[str]] = defaultdict(set)
    failed: dict[str, set[str]] = defaultdict(set)
    for stage, item, did_fail in attempts:
        attempted[stage].add(item)
        if did_fail:
            failed[stage].add(item)
    return {stage: (len(failed[stage]), len(items)) for stage, items in attempted.items()}


def check_failure_shares(shares: dict[str, tuple[int, int]], max_fraction: float,
                         examples: dict[str, str]) -> None:
    """Raise ``RunFailed`` naming every stage whose failure share exceeds ``max_fraction``."""
    over = {stage: counts for stage, counts in shares.items() if counts[0] and counts[0] > max_fraction * counts[1]}
    if over:
        lines = [f"{stage}: {failed} of {attempted} failed (first: {examples.get(stage, '?')})"
                 for stage, (failed, attempted) in sorted(over.items())]
        raise RunFailed(f"stages failed on more than {max_fraction:.0%} of their clips, so the cause is not the "
                        f"clips; nothing was published. " + "; ".join(lines))
