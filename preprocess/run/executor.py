"""The stage executor: one set of rules for every stage, read from the table of stages (``preprocess.pipeline``).

A stage declares itself in its own module as a ``Stage`` (name, version, group, the models it needs, the parts of
its cache key, ``run`` and, where it batches, ``run_many``); a ``Split`` turns a candidate's job into its pieces.
The executor applies, the same way to each:

- the cache: a stage's key hashes its name, version and declared key parts; a stored result is reused, a
  missing one computed into its own entry (``preprocess.run.cache``), so a changed setting re-runs only the
  stages whose key parts read it;
- rejections: a rejected job or piece passes through untouched; a crash rejects the clip ``error`` (not cached:
  the next run retries it), unless it is a failure of the environment (``preprocess.run.failures``: imports,
  model loading, CUDA, memory, disk), which stops the run;
- batching: a stage with ``run_many`` computes its cache misses across pieces, ``PIECES_PER_CALL`` per call; a
  crashed call is redone piece by piece, so that only the bad piece is rejected;
- time limits: every stage call on a clip (or a batch of pieces, with the limit times its size) runs under
  ``limits.task_timeout_s``; past it the clip is rejected ``timeout`` at that stage.

Every stored result lands in the job's ``entries`` or the piece's ``features`` under the stage's name (its JSON
plus ``key`` and ``dir``), with the stage's timing; ``Stage.finish`` reads it into the job or piece.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect.utilities.timeout import timeout

from preprocess.run.cache import stable_hash
from preprocess.run.failures import EnvironmentFailure, is_environment_error
from preprocess.run.job import ClipJob, PieceOutcome, Workspace, as_entry, rejected, with_timing
from preprocess.run.records import Candidate, Rejection
from preprocess.run.settings import PreprocessSettings
from preprocess.run.stage import Item, Split, Stage

log = logging.getLogger(__name__)

# Pieces per call of a batched stage: bounds what one call holds in memory (sampled frames, audio) and what a crash
# makes redo one by one. Inside a call the model runs in batches of its ModelChoice.batch_size items.
PIECES_PER_CALL = 32


def stage_key(stage: Stage, item: Item, settings: PreprocessSettings, workspace: Workspace) -> str:
    return stable_hash(stage.name, stage.version, *stage.key_parts(item, settings, workspace))


def _store(stage: Stage, item: Item, key: str, stored: dict, cached: bool, settings: PreprocessSettings,
           workspace: Workspace) -> Item:
    entry = as_entry(stored, key, workspace.cache.entry_dir(stage.name, key))
    item = with_timing(item, stage.timing_name or stage.name, stored["seconds"], cached)
    if isinstance(item, PieceOutcome):
        item = replace(item, features={**item.features, stage.name: entry})
    else:
        item = replace(item, entries={**item.entries, stage.name: entry})
    return stage.finish(item, entry, settings, workspace)


def _crashed(stage_name: str, item: Item, clip_id: str, error: Exception) -> Item:
    """A bad clip must never stop the run; a broken environment must."""
    if is_environment_error(error):
        raise EnvironmentFailure(stage_name, clip_id, error) from error
    log.error("stage %s crashed on %s:\n%s", stage_name, clip_id, traceback.format_exc())
    return rejected(item, Rejection(stage_name, "error", f"{type(error).__name__}: {error}"))


def _clip_id(item: Item) -> str:
    return item.clip_id if isinstance(item, PieceOutcome) else item.candidate.candidate_id


def should_run(stage: Stage, item: Item, settings: PreprocessSettings) -> bool:
    return item.rejection is None and stage.enabled(settings) and stage.applies(item, settings)


def run_stage(stage: Stage, item: Item, settings: PreprocessSettings, workspace: Workspace) -> Item:
    """One cached stage on one job or piece (see the module docstring for the rules)."""
    if not should_run(stage, item, settings):
        return item
    try:
        if stage.prepare is not None:
            prepared = stage.prepare(item, settings, workspace)
            if isinstance(prepared, Rejection):
                return rejected(item, prepared)
            if prepared.rejection is not None:  # rejected with what prepare learnt kept on it (standardise's crop)
                return prepared
            item = prepared
        key = stage_key(stage, item, settings, workspace)
        stored, cached = workspace.cache.run(stage.name, key, lambda out_dir: stage.run(item, settings, workspace,
                                                                                       out_dir))
        return _store(stage, item, key, stored, cached, settings, workspace)
    except Exception as error:
        return _crashed(stage.name, item, _clip_id(item), error)


def run_stage_batch(stage: Stage, items: list[Item], settings: PreprocessSettings,
                    workspace: Workspace) -> list[Item]:
    """One stage over many pieces (a partition's), in order. Each piece gets the outcome, key and stored files that
    ``run_stage`` gives it alone; a stage with ``run_many`` computes the cache misses of up to ``PIECES_PER_CALL``
    pieces per call (``StageCache.run_many``: one entry per piece)."""
    if stage.run_many is None or not stage.batchable(settings):
        return [run_stage(stage, item, settings, workspace) for item in items]
    outcomes = list(items)
    ready = [index for index, item in enumerate(items) if should_run(stage, item, settings)]
    for first in range(0, len(ready), PIECES_PER_CALL):
        group = ready[first:first + PIECES_PER_CALL]
        for index, outcome in zip(group, _run_batch(stage, [items[i] for i in group], settings, workspace),
                                  strict=True):
            outcomes[index] = outcome
    return outcomes


def _run_batch(stage: Stage, group: list[Item], settings: PreprocessSettings, workspace: Workspace) -> list[Item]:
    try:
        keys = [stage_key(stage, item, settings, workspace) for item in group]
        by_key = dict(zip(keys, group, strict=True))
        stored = workspace.cache.run_many(stage.name, keys, lambda missing, out_dirs: stage.run_many(
            [by_key[key] for key in missing], settings, workspace, out_dirs))
    except Exception as error:
        if is_environment_error(error):
            raise EnvironmentFailure(stage.name, _clip_id(group[0]), error) from error
        log.warning("stage %s crashed on a batch of %d pieces (%s): redoing them one by one\n%s", stage.name,
                    len(group), ", ".join(_clip_id(item) for item in group), traceback.format_exc())
        return [run_stage(stage, item, settings, workspace) for item in group]
    done = []
    for item, key, (result, cached) in zip(group, keys, stored, strict=True):
        try:
            done.append(_store(stage, item, key, result, cached, settings, workspace))
        except Exception as error:
            done.append(_crashed(stage.name, item, _clip_id(item), error))
    return done


# ---------------------------------------------------------------- groups of stages, under the per-clip time limit


def _limited(stage: str, clip_id: str, limit_s: float, call: Callable[[], Any]) -> Any:
    """``call()`` under the per-clip stage time limit; TimeoutError names the stage and the limit."""
    try:
        with timeout(limit_s):
            return call()
    except TimeoutError as error:
        raise TimeoutError(f"stage {stage} on {clip_id} ran past limits.task_timeout_s = {limit_s} s") from error


def start_job(candidate: Candidate, workspace: Workspace) -> ClipJob:
    """A candidate's job, with its source's content fingerprint (or rejected: an annotation problem, no source)."""
    job = ClipJob(candidate=candidate, notes=candidate.notes)
    if candidate.reject_reason:
        return rejected(job, Rejection("annotations", candidate.reject_reason, candidate.reject_detail))
    source = Path(candidate.source)
    if not source.exists():
        return rejected(job, Rejection("annotations", "missing_source", f"{source} does not exist"))
    try:
        return replace(job, source_sha256=workspace.fingerprint(source))
    except Exception as error:
        return _crashed("fingerprint", job, candidate.candidate_id, error)


def run_candidate(candidate: Candidate, stages: tuple[Stage | Split, ...], settings: PreprocessSettings,
                  workspace: Workspace) -> list[PieceOutcome]:
    """One candidate through the video group's stages in table order (the split last), each under the time limit."""
    limit, clip_id = settings.limits.task_timeout_s, candidate.candidate_id
    job, name = ClipJob(candidate=candidate), "fingerprint"
    try:
        job = _limited(name, clip_id, limit, lambda: start_job(candidate, workspace))
        for stage in stages:
            name = stage.name
            if isinstance(stage, Split):
                return _limited(name, clip_id, limit, lambda s=stage, j=job: split_job(s, j, settings, workspace))
            job = _limited(name, clip_id, limit, lambda s=stage, j=job: run_stage(s, j, settings, workspace))
    except TimeoutError as error:
        job = rejected(job, Rejection(name, "timeout", str(error)))
    return [PieceOutcome(clip_id=clip_id, job=job, rejection=job.rejection)]


def split_job(split: Split, job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> list[PieceOutcome]:
    """A job into its pieces; a rejected job, or a split that crashed, gives one rejected outcome."""
    if job.rejection is not None:
        return [PieceOutcome(clip_id=job.candidate.candidate_id, job=job, rejection=job.rejection)]
    try:
        return split.run(job, settings, workspace)
    except Exception as error:
        failed = _crashed(split.name, job, job.candidate.candidate_id, error)
        return [PieceOutcome(clip_id=job.candidate.candidate_id, job=job, rejection=failed.rejection)]


def run_piece_stages(stages: tuple[Stage, ...], pieces: list[PieceOutcome], settings: PreprocessSettings,
                     workspace: Workspace) -> list[PieceOutcome]:
    """Per-piece stages in order, each batched across the kept pieces; rejected pieces pass through. A batch past
    its time limit (the limit times its size) is redone piece by piece, so that only the slow piece is rejected."""
    limit = settings.limits.task_timeout_s
    for stage in stages:
        kept = [index for index, piece in enumerate(pieces) if piece.kept]
        if not kept:
            break
        batch = [pieces[index] for index in kept]
        try:
            done = _limited(stage.name, f"{len(batch)} pieces", limit * len(batch),
                            lambda s=stage, b=batch: run_stage_batch(s, b, settings, workspace))
        except TimeoutError:
            done = []
            for piece in batch:
                try:
                    done += _limited(stage.name, piece.clip_id, limit,
                                     lambda s=stage, p=piece: run_stage_batch(s, [p], settings, workspace))
                except TimeoutError as error:
                    done.append(rejected(piece, Rejection(stage.name, "timeout", str(error))))
        pieces = list(pieces)
        for index, piece in zip(kept, done, strict=True):
            pieces[index] = piece
    return pieces
