"""Partitions: the unit of orchestration (issue 13). No Prefect in sight; ``flows/preprocess.py`` composes these.

Candidates are split deterministically (in candidate-id order, ``partitions.max_clips`` candidates or
``partitions.max_seconds`` of annotated video each) into partitions. Each partition goes through four stage
groups, one Prefect task each: ``video`` (fingerprint, probe, locate, standardise, face landmarks, filter-and-split
for every candidate, on the CPU), ``audio`` (sync check and the audio model stages over every kept piece) and
``visual`` (action units, description, text embedding, latents), which take a GPU slot, and ``write`` (the
partition's own shards and tables, ``preprocess.run.outputs.write_partition``), whose marker
``partition.json`` is written last. The stage cache (``preprocess.run.cache``) still decides what work is redone
inside a group; the marker lets a rerun skip a finished partition without touching any of its clips.

A partition's key hashes what decides its outputs: its candidates (with each source file's size and mtime), every
setting but the ones that only decide how the run is executed (workers, engine, pruning), the stage versions and
the tiny-model builder's version. A partition whose clips hit a transient failure (``error``, ``timeout``) is
written (so that the run can publish) but its marker says ``retry``: the next run redoes it, and its cached
stages make that cheap.

Stages keep their per-clip time limit (``limits.task_timeout_s``, applied by ``preprocess.run.executor``): past
it the clip is rejected ``timeout`` at that stage
(a batch past its limit is redone piece by piece, so that only the slow piece is rejected).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from preprocess.pipeline import AUDIO_STAGES, VISUAL_STAGES, run_model_group, run_video_group, stage_versions
from preprocess.run.cache import stable_hash
from preprocess.run.failures import FAILURE_REASONS
from preprocess.run.job import PieceOutcome, Workspace
from preprocess.run.model_loading import is_tiny_reference, local_path, model_identity
from preprocess.run.outputs import partition_file_problem
from preprocess.run.records import Candidate
from preprocess.run.settings import ModelChoice, PreprocessSettings

log = logging.getLogger(__name__)

PARTITION_VERSION = 1
PARTITIONS_DIR = "partitions"  # under out_dir/work
MARKER_FILE = "partition.json"
# The stage groups, in the order a partition goes through them; the model groups take a GPU slot.
STAGE_GROUPS = ("video", "audio", "visual", "write")
GPU_GROUPS = ("audio", "visual")
# Stages whose failures count per piece (clip id); the others count per candidate.
PIECE_STAGES = ("sync", *AUDIO_STAGES, *VISUAL_STAGES, "audio", "visual")
# Settings that decide how a run executes, not what it produces: left out of the partition key.
EXECUTION_SETTINGS = {"workers": True, "engine": True, "shards": {"publish_hard_links": True},
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
    models = {kind: model_identity(choice) if isinstance(choice, ModelChoice) else choice
              for kind, choice in settings.models}
    # a retrained sync expert at the same path is a new model (its stage key hashes the file's content); a tiny one
    # is covered by the builder's version in its identity, and may not be built yet when the run plans
    sync_reference = settings.models.sync_expert.model
    sync_weights = None if is_tiny_reference(sync_reference) else local_path(sync_reference)
    return stable_hash("partition", PARTITION_VERSION, stage_versions(), candidates,
                       settings.model_dump(mode="json", exclude=EXECUTION_SETTINGS), models,
                       _stat_signature(str(sync_weights)) if sync_weights else None)


def partition_dir(workspace: Workspace, key: str) -> Path:
    return workspace.out_dir / "work" / PARTITIONS_DIR / key


def finished_record(workspace: Workspace, key: str) -> dict[str, Any] | None:
    """The marker of a finished partition with this key whose files verify (None when unfinished, to be retried,
    unreadable, or when a file it lists is missing or changed: then the partition is redone, with a warning)."""
    part_dir = partition_dir(workspace, key)
    try:
        record = json.loads((part_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or record.get("retry", True):
        return None
    problem = partition_file_problem(part_dir, record)
    if problem is not None:
        log.warning("partition %s (%s) is marked finished but %s: redoing it", record.get("name"), key, problem)
        return None
    return record


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
    outcomes = run_video_group(partition.candidates, settings, workspace)
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
