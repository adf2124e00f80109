"""Partitions: the unit of orchestration (issue 13). No Prefect in sight; ``flows/preprocess.py`` composes these.

Candidates are split deterministically (in candidate-id order, ``partitions.max_clips`` candidates or
``partitions.max_seconds`` of annotated video each) into partitions. Each partition goes through four stage
groups, one Prefect task each: ``video`` (fingerprint, probe, locate, standardise, face landmarks, filter-and-split
for every candidate, on the CPU), ``audio`` (sync check and the audio model stages over every kept piece) and
``visual`` (action units, description, text embedding, latents), which take a GPU slot, and ``write`` (the
partition's own shards and tables, ``preprocess.write_outputs.write_partition``), whose marker
``partition.json`` is written last. The stage cache (``preprocess.cache``) still decides what work is redone
inside a group; the marker lets a rerun skip a finished partition without touching any of its clips.

A partition's key hashes what decides its outputs: its candidates (with each source file's size and mtime), every
setting but the ones that only decide how the run is executed (workers, engine, pruning), the stage versions and
the tiny-model builder's version. A partition whose clips hit a transient failure (``error``, ``timeout``) is
written (so that the run can publish) but its marker says ``retry``: the next run redoes it, and its cached
stages make that cheap.

Stages keep their per-clip time limit (``limits.task_timeout_s``): each stage call on a clip (or a batch of
pieces) runs under ``prefect.utilities.timeout``; past it the clip is rejected ``timeout`` at that stage
(a batch past its limit is redone piece by piece, so that only the slow piece is rejected).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefect.utilities.timeout import timeout

from preprocess.cache import stable_hash
from preprocess.failures import FAILURE_REASONS
from preprocess.pipeline import (
    AUDIO_STAGES,
    STAGE_VERSIONS,
    VISUAL_STAGES,
    ClipJob,
    PieceOutcome,
    Workspace,
    _model_identity,
    run_faces,
    run_locate,
    run_piece_stage_batch,
    run_probe,
    run_select,
    run_standardise,
    start_job,
)
from preprocess.records import Candidate, Rejection
from preprocess.settings import ModelChoice, PreprocessSettings
from preprocess.stage_models import is_tiny_reference, local_path

log = logging.getLogger(__name__)

PARTITION_VERSION = 1
PARTITIONS_DIR = "partitions"  # under out_dir/work
MARKER_FILE = "partition.json"
# The stage groups, in the order a partition goes through them; the model groups take a GPU slot.
STAGE_GROUPS = ("video", "audio", "visual", "write")
GPU_GROUPS = ("audio", "visual")
# Stages whose failures count per piece (clip id); the others count per candidate.
PIECE_STAGES = ("sync", *AUDIO_STAGES, *VISUAL_STAGES, "audio", "visual")
GROUP_STAGES = {"audio": ("sync", *AUDIO_STAGES), "visual": VISUAL_STAGES}
VIDEO_STAGES = (("probe", run_probe), ("locate", run_locate), ("standardise", run_standardise),
                ("faces", run_faces))
# Settings that decide how a run executes, not what it produces: left out of the partition key.
EXECUTION_SETTINGS = {"workers": True, "engine": True,
                      "partitions": {"prune_work": True, "gpu_slots": True, "gpu_limit_name": True}}
# Cache stages whose entries hold a kept piece's cut files, exactly what its shard sample holds: pruned once the
# partition's shards are written (``partitions.prune_work``).
PRUNED_STAGES = ("pieces", "sync")


@dataclass(frozen=True)
class Partition:
    index: int
    candidates: tuple[Candidate, ...]

    @property
    def name(self) -> str:
        return f"p{self.index:05d}"


def plan_partitions(candidates: list[Candidate], settings: PreprocessSettings) -> list[Partition]:
    """Split candidates (in candidate-id order) into consecutive partitions of at most ``max_clips`` candidates
    and about ``max_seconds`` of annotated video: the same candidates and settings give the same partitions."""
    chosen = settings.partitions
    ordered = sorted(candidates, key=lambda candidate: (candidate.candidate_id, candidate.source, candidate.start_s))
    partitions, current, seconds = [], [], 0.0
    for candidate in ordered:
        current.append(candidate)
        if candidate.end_s is not None:
            seconds += max(0.0, candidate.end_s - candidate.start_s)
        if len(current) >= chosen.max_clips or seconds >= chosen.max_seconds:
            partitions.append(Partition(len(partitions), tuple(current)))
            current, seconds = [], 0.0
    if current:
        partitions.append(Partition(len(partitions), tuple(current)))
    return partitions


def _stat_signature(path: str | None) -> list | None:
    """(size, mtime) of an input file: a changed file changes the partition key (its content is hashed by the
    stages themselves, which also notice a file replaced by one of identical content)."""
    if path is None:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def partition_key(partition: Partition, settings: PreprocessSettings) -> str:
    """What decides a partition's outputs (see the module docstring); models as the stages' keys know them."""
    candidates = [[asdict(candidate), _stat_signature(candidate.source), _stat_signature(candidate.audio_source),
                   _stat_signature(candidate.annotation_file)] for candidate in partition.candidates]
    models = {kind: _model_identity(choice) if isinstance(choice, ModelChoice) else choice
              for kind, choice in settings.models}
    # a retrained sync expert at the same path is a new model (its stage key hashes the file's content); a tiny one
    # is covered by the builder's version in its identity, and may not be built yet when the run plans
    sync_reference = settings.models.sync_expert.model
    sync_weights = None if is_tiny_reference(sync_reference) else local_path(sync_reference)
    return stable_hash("partition", PARTITION_VERSION, STAGE_VERSIONS, candidates,
                       settings.model_dump(mode="json", exclude=EXECUTION_SETTINGS), models,
                       _stat_signature(str(sync_weights)) if sync_weights else None)


def partition_dir(workspace: Workspace, key: str) -> Path:
    return workspace.out_dir / "work" / PARTITIONS_DIR / key


def finished_record(workspace: Workspace, key: str) -> dict[str, Any] | None:
    """The marker of a finished partition with this key (None when unfinished, to be retried, or unreadable)."""
    try:
        record = json.loads((partition_dir(workspace, key) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or record.get("retry", True):
        return None
    return record


def _limited(stage: str, clip_id: str, limit_s: float, call: Callable[[], Any]) -> Any:
    """``call()`` under the per-clip stage time limit; TimeoutError names the stage and the limit."""
    try:
        with timeout(limit_s):
            return call()
    except TimeoutError as error:
        raise TimeoutError(f"stage {stage} on {clip_id} ran past limits.task_timeout_s = {limit_s} s") from error


def _timed_out(stage: str, error: TimeoutError) -> Rejection:
    return Rejection(stage, "timeout", str(error))


def _clip_through_video_stages(candidate: Candidate, settings: PreprocessSettings,
                               workspace: Workspace) -> list[PieceOutcome]:
    """One candidate through the video stages, each under the per-clip time limit."""
    limit, clip_id = settings.limits.task_timeout_s, candidate.candidate_id
    job, stage = ClipJob(candidate=candidate), "fingerprint"
    try:
        job = _limited(stage, clip_id, limit, lambda: start_job(candidate, workspace))
        for stage, function in VIDEO_STAGES:
            job = _limited(stage, clip_id, limit, lambda f=function, j=job: f(j, settings, workspace))
        stage = "pieces"
        return _limited(stage, clip_id, limit, lambda j=job: run_select(j, settings, workspace))
    except TimeoutError as error:
        job = replace(job, rejection=_timed_out(stage, error))
        return [PieceOutcome(clip_id=clip_id, job=job, rejection=job.rejection)]


def run_video_group(partition: Partition, settings: PreprocessSettings,
                    workspace: Workspace) -> list[PieceOutcome]:
    """Every candidate of the partition through the video stages (in order), to its piece outcomes."""
    return [outcome for candidate in partition.candidates
            for outcome in _clip_through_video_stages(candidate, settings, workspace)]


def run_model_group(group: str, pieces: list[PieceOutcome], settings: PreprocessSettings,
                    workspace: Workspace) -> list[PieceOutcome]:
    """The group's per-piece stages over the partition's pieces, each stage batched across the kept pieces
    (``preprocess.pipeline.run_piece_stage_batch``); rejected pieces pass through."""
    limit = settings.limits.task_timeout_s
    for stage in GROUP_STAGES[group]:
        kept = [index for index, piece in enumerate(pieces) if piece.kept]
        if not kept:
            break
        batch = [pieces[index] for index in kept]
        try:
            done = _limited(stage, f"{len(batch)} pieces", limit * len(batch),
                            lambda s=stage, b=batch: run_piece_stage_batch(s, b, settings, workspace))
        except TimeoutError:
            done = []
            for piece in batch:  # one by one: only the slow piece is rejected
                try:
                    done += _limited(stage, piece.clip_id, limit,
                                     lambda s=stage, p=piece: run_piece_stage_batch(s, [p], settings, workspace))
                except TimeoutError as error:
                    done.append(replace(piece, rejection=_timed_out(stage, error)))
        pieces = list(pieces)
        for index, piece in zip(kept, done, strict=True):
            pieces[index] = piece
    return pieces


def has_transient_failures(outcomes: list[PieceOutcome]) -> bool:
    """A clip rejected ``error``/``timeout``: its partition is retried by the next run."""
    return any(outcome.rejection is not None and outcome.rejection.reason in FAILURE_REASONS
               for outcome in outcomes)


def prune_work(outcomes: list[PieceOutcome], workspace: Workspace) -> int:
    """Delete the cache entries that hold exactly what a written partition's shards hold: each kept piece's cut
    files (clip.mp4, clip.wav, landmarks, pose; in ``pieces``, or in ``sync`` for a piece whose audio the sync check
    shifted); returns how many were removed. Left: the standardised clip (the one copy of a kept second beyond the
    shard, from which a piece is re-cut, identically, when a changed setting redoes the partition) and the
    features (small next to the video but costly to recompute). docs/pipeline.md, "Disk", has the figures."""
    entries = {(Path(outcome.files_dir).parent.name, outcome.content_key) for outcome in outcomes
               if outcome.kept and outcome.content_key and outcome.files_dir}
    return sum(workspace.cache.remove(stage, key) for stage, key in sorted(entries) if stage in PRUNED_STAGES)


def process_partition(partition: Partition, settings: PreprocessSettings,
                      workspace: Workspace) -> list[PieceOutcome]:
    """Every stage group but write on one partition, without Prefect (tests, benchmarks)."""
    outcomes = run_video_group(partition, settings, workspace)
    for group in GPU_GROUPS:
        outcomes = run_model_group(group, outcomes, settings, workspace)
    return outcomes


def process_candidates(candidates: list[Candidate], settings: PreprocessSettings,
                       workspace: Workspace) -> list[PieceOutcome]:
    """Every candidate through every stage, partition by partition, without Prefect (tests, benchmarks)."""
    return [outcome for partition in plan_partitions(candidates, settings)
            for outcome in process_partition(partition, settings, workspace)]


def failure_counts(outcomes: list[PieceOutcome]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per stage, [clips failed (``error``/``timeout``), clips attempted] among these outcomes, and a first example
    per failing stage. Partitions hold disjoint clips, so the run's shares are the sums over its partitions."""
    attempted: dict[str, set[str]] = {}
    failed: dict[str, set[str]] = {}
    examples: dict[str, str] = {}
    for outcome in outcomes:
        candidate_id = outcome.job.candidate.candidate_id
        for timing in outcome.job.timings:
            attempted.setdefault(timing.stage, set()).add(candidate_id)
        for timing in outcome.timings:
            attempted.setdefault(timing.stage, set()).add(outcome.clip_id)
        rejection = outcome.rejection
        if rejection is not None and rejection.reason in FAILURE_REASONS:
            item = outcome.clip_id if rejection.stage in PIECE_STAGES else candidate_id
            attempted.setdefault(rejection.stage, set()).add(item)
            failed.setdefault(rejection.stage, set()).add(item)
            examples.setdefault(rejection.stage, f"{outcome.clip_id}: {rejection.reason}: {rejection.detail}"[:300])
    return ({stage: [len(failed.get(stage, ())), len(items)] for stage, items in sorted(attempted.items())},
            examples)


def remove_stale_partitions(workspace: Workspace, keep: set[str]) -> int:
    """Delete partition directories of earlier runs that this run's partitions no longer use (after it published:
    the published shards are hard links, so this frees only what nothing published holds)."""
    root = workspace.out_dir / "work" / PARTITIONS_DIR
    if not root.is_dir():
        return 0
    removed = 0
    for directory in sorted(root.iterdir()):
        if directory.is_dir() and directory.name not in keep:
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
    return removed
