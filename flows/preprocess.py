"""The ``preprocess`` Prefect flow: discovers candidate clips, splits them into partitions and runs each partition
through four stage groups, one Prefect task each (issue 13; ``preprocess.run.partitions``).

Partitions, not clips, are the unit of orchestration: ``partitions.max_clips`` candidates (or
``partitions.max_seconds`` of annotated video) each, so a dataset's task-run count grows with its partitions
(four per partition, plus a handful per run), not with clips x stages; Prefect's server and the Dask runner stall
at a few thousand task runs. The groups: ``video`` (fingerprint, probe, locate, standardise, face landmarks,
filter-and-split, on the CPU), ``audio`` (sync check, separation, transcription, text and speech emotion,
valence-arousal, wav2vec) and ``visual`` (action units, description, text embedding, latents), which batch each
stage across the partition's pieces and take a slot of a strict Prefect global concurrency limit
(``partitions.gpu_limit_name``, ``partitions.gpu_slots``; created by the run when missing), and ``write`` (the
partition's shards and tables, marker last). Task runs are named ``<group>-p00042``; a progress artifact per group
shows the share of partitions through it.

No global barrier: a partition goes on to its model groups as soon as its video group is done, while other
partitions are still decoding, so CPU and GPU work overlap. At most ``workers`` CPU tasks (video, write) and
``gpu_slots`` model-group tasks run at once; finishing started partitions comes before starting new ones, which
bounds the work in flight. The stages know nothing of Prefect and do their own caching (``preprocess.run.cache``), so
a rerun redoes only the partitions without a valid marker, and inside them only the stages whose outputs are
missing. The engine (threads, Dask or Ray) comes from ``settings.engine`` (``flows.engines``).

One run per out_dir: the flow holds ``shards.output_lock``'s lock on the out_dir from before any clean-up
to the end, so a second run there (``serve(limit=2)`` makes a double trigger easy) fails at once with
``OutputLocked``. A run that fails before publishing (a model that cannot load, too many stage failures, no
candidates, no clip kept while shards are published) leaves every published file as it was; publishing is one
run-level commit (``preprocess.run.outputs.publish_partitions``) that ``synchrorama validate`` checks.

Callable without a server, as a plain function::

    from flows.preprocess import preprocess
    preprocess(dataset="folder", raw_dir="videos/", out_dir="out/", profile="tiny")
"""


from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import tiny_models
from flows.engines import build_task_runner, engine_workers, gpu_resources
from flows.gpu_limit import ensure_gpu_limit, gpu_slot
from preprocess.datasets.discover import DATASETS, discover_candidates, looked_for
from preprocess.pipeline import run_model_group, run_video_group
from preprocess.run.failures import RunFailed, check_failure_shares, is_environment_error
from preprocess.run.job import ClipJob, PieceOutcome, Workspace
from preprocess.run.model_loading import register_tiny_builder
from preprocess.run.outputs import (
    TINY_MODELS_WARNING,
    publish_partitions,
    tiny_model_stages,
    write_partition,
)
from preprocess.run.partitions import (
    GPU_GROUPS,
    STAGE_GROUPS,
    Partition,
    failure_counts,
    finished_record,
    has_transient_failures,
    partition_dir,
    partition_key,
    plan_partitions,
    prune_work,
    remove_stale_partitions,
)
from preprocess.run.preflight import load_active_models
from preprocess.run.records import Rejection
from preprocess.run.settings import PreprocessSettings, load_settings
from shards.leftovers import remove_leftovers
from shards.output_lock import hold_output_lock
from shards.schema import SHARD_NAME_PATTERN
from shards.tables import SHARDS_DIR, SUMMARY_FILE

# The tiny profile's models are built on first use in whatever process runs this flow (a served deployment's
# subprocess, a Dask or Ray worker): the stages themselves never import test-model builders.
register_tiny_builder(tiny_models.BUILDER)

# Our own cache (in out_dir) decides what is redone, so Prefect's result cache is off for every task.
_stage = {"cache_policy": NONE, "persist_result": False}


@task(name="load-models", **_stage)
def load_models_task(settings: PreprocessSettings) -> list[str]:
    return load_active_models(settings)


@task(name="video", **_stage)
def video_task(partition: Partition, settings: PreprocessSettings, out_dir: str) -> list[PieceOutcome]:
    return run_video_group(partition.candidates, settings, Workspace(Path(out_dir)))


@task(name="audio", tags=["gpu"], **_stage)
def audio_task(pieces: list[PieceOutcome], settings: PreprocessSettings, out_dir: str) -> list[PieceOutcome]:
    with gpu_slot(settings.partitions.gpu_limit_name):
        return run_model_group("audio", pieces, settings, Workspace(Path(out_dir)))


@task(name="visual", tags=["gpu"], **_stage)
def visual_task(pieces: list[PieceOutcome], settings: PreprocessSettings, out_dir: str) -> list[PieceOutcome]:
    with gpu_slot(settings.partitions.gpu_limit_name):
        return run_model_group("visual", pieces, settings, Workspace(Path(out_dir)))


@task(name="write", **_stage)
def write_task(partition: Partition, key: str, pieces: list[PieceOutcome], settings: PreprocessSettings,
               out_dir: str) -> dict[str, Any]:
    """The partition's shards and tables, marker last; then (``partitions.prune_work``) the work entries its shards
    now hold. A partition with a transient failure is marked ``retry`` and keeps its work entries."""
    workspace = Workspace(Path(out_dir))
    retry = has_transient_failures(pieces)
    shares, examples = failure_counts(pieces)
    record = write_partition(pieces, settings, partition_dir(workspace, key), {
        "key": key, "name": partition.name, "retry": retry, "candidate_ids": [
            candidate.candidate_id for candidate in partition.candidates],
        "failures": shares, "failure_examples": examples})
    if settings.partitions.prune_work and not retry:
        prune_work(pieces, workspace)
    return record


GROUP_TASKS = {"video": video_task, "audio": audio_task, "visual": visual_task}


class _DropWorkerThreadTimeoutWarning(logging.Filter):
    """Prefect warns on every task run with a timeout in a worker thread that the timeout cannot interrupt a
    blocking call. Ours do not block unboundedly: every ffmpeg call polls with its own limit (``preprocess.run.media``),
    so the injected timeout lands within a poll interval. One warning per task run would bury the real log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_DropWorkerThreadTimeoutWarning())


def _failed_group(group: str, partition: Partition, pieces: list[PieceOutcome] | None,
                  error: BaseException) -> list[PieceOutcome]:
    """A group task that failed outside the stages' own error handling (they turn a clip's crash into its
    rejection): its clips are rejected ``error`` at that group (``timeout`` past a time limit); an environment
    failure is re-raised and stops the run."""
    if is_environment_error(error):
        raise error
    rejection = Rejection(group, "timeout" if isinstance(error, TimeoutError) else "error",
                          f"{type(error).__name__}: {error}"[:500])
    if pieces is None:  # the video group: no piece yet, one row per candidate
        return [PieceOutcome(clip_id=candidate.candidate_id, job=ClipJob(candidate=candidate, rejection=rejection),
                             rejection=rejection) for candidate in partition.candidates]
    return [replace(piece, rejection=rejection) if piece.kept else piece for piece in pieces]


class _Progress:
    """One progress artifact per stage group: the share of this run's partitions through it."""

    def __init__(self, total: int):
        self.total, self.done = total, Counter()
        self.ids = {group: create_progress_artifact(0.0, key=f"preprocess-{group}",
                                                    description=f"partitions through the {group} stage group")
                    for group in STAGE_GROUPS}

    def advance(self, group: str) -> None:
        self.done[group] += 1
        update_progress_artifact(self.ids[group], 100.0 * self.done[group] / self.total,
                                 description=f"{group}: {self.done[group]} of {self.total} partitions")


@flow(name="process-partitions")
def process_partitions(todo: list[tuple[Partition, str]], settings: PreprocessSettings,
                       out_dir: str) -> list[dict[str, Any]]:
    """Every partition of ``todo`` (with its key) through video -> audio -> visual -> write, returning the written
    partitions' markers. A task is submitted when its partition's previous group finishes and a slot is free:
    ``workers`` CPU slots, ``partitions.gpu_slots`` GPU slots; a later group goes before an earlier one."""
    cpu_slots = engine_workers(settings.engine, settings.workers)
    gpu_slots = settings.partitions.gpu_slots
    progress = _Progress(len(todo))
    ready: list[tuple[int, str, int, list[PieceOutcome] | None]] = [(0, "video", number, None)
                                                                    for number in range(len(todo))]
    running: dict[PrefectFuture, tuple[str, int, list[PieceOutcome] | None]] = {}
    records: dict[int, dict[str, Any]] = {}
    while ready or running:
        ready.sort(key=lambda item: (-item[0], item[2]))  # later groups first, then partition order
        for item in list(ready):
            _, group, number, pieces = item
            busy = sum(1 for running_group, _, _ in running.values() if (running_group in GPU_GROUPS)
                       == (group in GPU_GROUPS))
            if busy >= (gpu_slots if group in GPU_GROUPS else cpu_slots):
                continue
            partition, key = todo[number]
            options = {"task_run_name": f"{group}-{partition.name}"}
            if group == "video":
                future = video_task.with_options(**options).submit(partition, settings, out_dir)
            elif group == "write":
                future = write_task.with_options(**options).submit(partition, key, pieces, settings, out_dir)
            else:
                with gpu_resources(settings.engine):
                    future = GROUP_TASKS[group].with_options(**options).submit(pieces, settings, out_dir)
            running[future] = (group, number, pieces)
            ready.remove(item)
        finished = next(as_completed(list(running)))
        group, number, pieces = running.pop(finished)
        finished.wait()  # the final state, not the server's view of it (which may lag behind)
        state = finished.state
        if state.is_completed():
            result = finished.result()
        elif group == "write":
            raise state.result(raise_on_failure=False)
        else:
            result = _failed_group(group, todo[number][0], pieces, state.result(raise_on_failure=False))
        progress.advance(group)
        if group == "write":
            records[number] = result
        else:
            following = STAGE_GROUPS.index(group) + 1
            ready.append((following, STAGE_GROUPS[following], number, result))
    return [records[number] for number in range(len(todo))]


def _check_failure_shares(records: list[dict[str, Any]], settings: PreprocessSettings) -> None:
    """Fail the run when a stage failed on more than ``limits.max_error_fraction`` of the clips it ran on."""
    shares: dict[str, list[int]] = {}
    examples: dict[str, str] = {}
    for record in records:
        for stage, (failed, attempted) in record["failures"].items():
            total = shares.setdefault(stage, [0, 0])
            total[0] += failed
            total[1] += attempted
        for stage, example in record["failure_examples"].items():
            examples.setdefault(stage, example)
    check_failure_shares({stage: tuple(counts) for stage, counts in shares.items()},
                         settings.limits.max_error_fraction, examples)


def _published_shards(out: Path) -> list[str]:
    """The shard tars a previous run published in ``out/shards``."""
    shards_dir = out / SHARDS_DIR
    if not shards_dir.is_dir():
        return []
    return sorted(path.name for path in shards_dir.iterdir()
                  if (match := SHARD_NAME_PATTERN.fullmatch(path.name)) and match.group(2) == "tar")


def _refuse_empty_publish(records: list[dict[str, Any]], out: Path) -> None:
    """A run that keeps nothing is almost always misconfigured (a wrong filter, raw_dir or model): it must not
    replace a published dataset with an empty one unless asked to (``replace_with_empty``)."""
    published = _published_shards(out)
    if any(record["n_kept"] for record in records) or not published:
        return
    reasons = Counter()
    for record in records:
        reasons.update(record["reasons"])
    found = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(8)) or "no rejections"
    n_clips = sum(record["n_clips"] for record in records)
    raise RunFailed(
        f"this run kept 0 of {n_clips} clips (rejected: {found}); the {len(published)} published shards in "
        f"{out / SHARDS_DIR}, the tables and summary.json were left untouched. Check the settings and raw_dir "
        f"(a filter override can reject everything); to publish an empty dataset over them anyway, rerun with "
        f"replace_with_empty=true (prefect: -p replace_with_empty=true)")


def _refuse_subset_over_published(out: Path, limit: int, n_candidates: int) -> None:
    """A quick look (``limit``) must not replace a published full dataset: refused before any work, unless the
    published dataset is itself a subset (an earlier quick look)."""
    published = _published_shards(out)
    if not published:
        return
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    if summary.get("limit") is not None:
        return
    raise RunFailed(
        f"limit={limit} processes {limit} of the {n_candidates} candidates, and {out} holds a published dataset "
        f"({len(published)} shards, {summary.get('n_kept', '?')} clips) that publishing the subset would replace. "
        f"Write the quick look elsewhere (another out_dir), or rerun with publish_subset=true (prefect: -p "
        f"publish_subset=true; synchrorama run --publish-subset) to replace it with the subset on purpose. Nothing "
        f"was written")


def _no_candidates_message(dataset: str, raw_dir: Path, annotations_dir: Path | None, pattern: str,
                           settings: PreprocessSettings | None = None) -> str:
    looked = looked_for(dataset, raw_dir, annotations_dir, pattern, settings.layouts if settings else None)
    return (f"no candidate clips for dataset {dataset!r}: looked for {looked}; check raw_dir, dataset and "
            f"pattern; nothing was written")


@flow(name="preprocess", log_prints=True)
def preprocess(
    dataset: str = "hdtf",
    raw_dir: str = "data/raw/hdtf",
    out_dir: str = "out/hdtf",
    profile: str = "default",
    annotations_dir: str | None = None,
    pattern: str = "**/*",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    replace_with_empty: bool = False,
    publish_subset: bool = False,
) -> dict[str, Any]:
    """Turn raw talking-face videos into 512x512, 25 fps clips in WebDataset shards plus parquet tables.

    dataset: "hdtf" (annotation files + Name.mp4 videos), "vfhq" (per-clip meta-info files + <video id>.mp4
        videos), "mead" (<subject>/video/<view>/... paired with <subject>/audio/...) or "folder" (any tree of videos).
    raw_dir: the videos (for HDTF also the annotation files, else the project's shipped copy is used).
    out_dir: where shards/, tables/, work/ (the resumable cache) and summary.json are written. One run per
        out_dir: a run on an out_dir that another run holds fails at once (``OutputLocked``).
    profile: settings profile: "default" (real model references) or "tiny" (locally built tiny models).
    annotations_dir: HDTF annotation files, when not in raw_dir; VFHQ meta-info files (default raw_dir/meta_info).
    pattern: glob of videos under raw_dir for folder datasets.
    overrides: nested settings overrides, e.g. {"filters": {"max_abs_yaw_deg": 30}}.
    limit: process only the first N candidates (sorted by id), for a quick look. Refused on an out_dir that holds
        a published dataset of a full run (it would replace it): write the quick look to another out_dir.
    publish_subset: let a run with ``limit`` replace a published full dataset with its subset, on purpose.
    replace_with_empty: let a run that keeps no clip replace published shards with an empty dataset (without
        it, such a run fails and leaves them untouched).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    logger = get_run_logger()
    settings = load_settings(profile, overrides, dataset=dataset)
    out = Path(out_dir).resolve()
    # Held for the whole run, before any clean-up or write: a second run on this out_dir is refused at once
    # instead of deleting this run's temp files and publishing over it. The kernel frees it if we are killed.
    with hold_output_lock(out, f"preprocess {dataset} (flow run {flow_run.id})"):
        # under the lock, before this run writes anything: every temp there is a dead run's, whatever host it names
        left = remove_leftovers(out) if out.is_dir() else []
        if left:
            logger.info("removed %d temp files and folders that interrupted runs left in %s", len(left), out)
        raw, annotations = Path(raw_dir).resolve(), Path(annotations_dir).resolve() if annotations_dir else None
        candidates, issues = discover_candidates(dataset, raw, annotations, pattern, settings.layouts)
        if not candidates:
            raise RunFailed(_no_candidates_message(dataset, raw, annotations, pattern, settings))
        subset = limit is not None and limit < len(candidates)
        if subset and not publish_subset:
            _refuse_subset_over_published(out, limit, len(candidates))
        if limit is not None:
            candidates = candidates[:limit]
        logger.info("%d candidate clips from %s (%s), %d annotation issues; output in %s",
                    len(candidates), raw_dir, dataset, len(issues), out)
        if tiny_model_stages(settings):
            logger.warning(TINY_MODELS_WARNING + " (stages: %s)", ", ".join(tiny_model_stages(settings)))
        partitions = plan_partitions(candidates, settings)
        workspace = Workspace(out)
        keyed = [(partition, partition_key(partition, settings)) for partition in partitions]
        finished = {key: record for _, key in keyed if (record := finished_record(workspace, key)) is not None}
        todo = [(partition, key) for partition, key in keyed if key not in finished]
        logger.info("%d partitions (at most %d candidates or %.0f s each): %d finished by an earlier run, %d to do",
                    len(partitions), settings.partitions.max_clips, settings.partitions.max_seconds,
                    len(finished), len(todo))
        written = {}
        if todo:
            # every model the unfinished partitions need, before any clip: a broken setup fails once, naming them all
            loaded = load_models_task.with_options(timeout_seconds=settings.limits.task_timeout_s)(settings)
            logger.info("models loaded:\n  %s", "\n  ".join(loaded))
            ensure_gpu_limit(settings.partitions.gpu_limit_name, settings.partitions.gpu_slots)
            cpu_slots = engine_workers(settings.engine, settings.workers)
            # threads: the pool holds the CPU and the GPU slots, so a model group never waits behind video work
            runner = (ThreadPoolTaskRunner(max_workers=cpu_slots + settings.partitions.gpu_slots)
                      if settings.engine.kind == "threads" else build_task_runner(settings.engine, settings.workers))
            records = process_partitions.with_options(task_runner=runner)(todo, settings, str(out))
            written = {record["key"]: record for record in records}
        records = [finished.get(key) or written[key] for _, key in keyed]
        _check_failure_shares(records, settings)
        if not replace_with_empty:
            _refuse_empty_publish(records, out)
        # Everything above fails without touching a published file; from here on publish_partitions marks the
        # out_dir as being published until summary.json, written last, commits it.
        summary, record = publish_partitions([(partition_dir(workspace, key), partition_record)
                                              for (_, key), partition_record in zip(keyed, records, strict=True)],
                                             issues, settings, out, run_id=str(flow_run.id),
                                             extra={"dataset": dataset, "profile": profile,
                                                    "n_partitions_reused": len(finished),
                                                    "limit": limit if subset else None})
        # a subset keeps the full run's partitions: the next full run reuses them
        removed = 0 if subset else remove_stale_partitions(workspace, {key for _, key in keyed})
        if removed:
            logger.info("removed %d partition directories of earlier runs that this run no longer uses", removed)
    logger.info("summary\n%s", summary.as_text())
    return record
