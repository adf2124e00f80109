"""The ``preprocess`` Prefect flow: discovers candidate clips and maps each stage over them as Prefect tasks.

One task per stage per clip (rather than one task per clip running all stages) so that the UI shows
progress stage by stage, model stages can later batch across clips, and stages that need a GPU can carry the
``gpu`` tag and its concurrency limit. The stages know nothing of Prefect: each task is a one-line call into
``preprocess.pipeline``, which does the caching, so a re-run with nothing changed does no stage work and a
killed run resumes where it stopped.

After filter-and-split, the sync check (sync-check: SyncNet offset and confidence; it may shift a piece's audio or
reject it ``out_of_sync``), then the audio and emotion stages are mapped over the kept pieces, one task per stage
(separate-vocals, transcribe, text-emotion, speech-emotion, valence-arousal, wav2vec), then the visual and
semantic ones (action-units, describe, text-embedding, and vae-latents when enabled). The model stages carry
the ``gpu`` tag (``prefect concurrency-limit create gpu 1`` serialises them on one GPU). Each loads its model
once per worker process (``preprocess.stage_models``) and batches within a clip (never across clips, so that
a clip's numbers do not depend on which clips shared its batch and a resumed run stays byte-identical).

One run per out_dir: the flow holds ``synchrorama.run_lock``'s lock on the out_dir from before any clean-up
to the end, so a second run there (``serve(limit=2)`` makes a double trigger easy) fails at once with
``OutputLocked``. A run that fails before publishing (a model that cannot load, too many stage failures, no
candidates, no clip kept while shards are published) leaves every published file as it was; publishing is one
run-level commit (``preprocess.write_outputs.publish_outputs``) that ``synchrorama validate`` checks.

Callable without a server, as a plain function::

    from flows.preprocess import preprocess
    preprocess(dataset="folder", raw_dir="videos/", out_dir="out/", profile="tiny")
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from preprocess.discover import DATASETS, discover_candidates, looked_for
from preprocess.failures import (
    FAILURE_REASONS,
    RunFailed,
    check_failure_shares,
    is_environment_error,
    stage_failure_shares,
)
from preprocess.pipeline import (
    AUDIO_STAGES,
    VISUAL_STAGES,
    ClipJob,
    PieceOutcome,
    Workspace,
    run_action_units,
    run_describe,
    run_faces,
    run_latents,
    run_locate,
    run_probe,
    run_select,
    run_separate,
    run_speech_emotion,
    run_standardise,
    run_sync,
    run_text_embedding,
    run_text_emotion,
    run_transcribe,
    run_valence_arousal,
    run_wav2vec,
    start_job,
)
from preprocess.preflight import load_active_models
from preprocess.records import Candidate, Rejection
from preprocess.settings import PreprocessSettings, load_settings
from preprocess.write_outputs import TINY_MODELS_WARNING, publish_outputs, tiny_model_stages
from shards.schema import SHARD_NAME_PATTERN
from shards.tables import SHARDS_DIR
from synchrorama.run_lock import hold_output_lock

PIECE_STAGES = ("sync", *AUDIO_STAGES, *VISUAL_STAGES)

# Our own cache (in out_dir) decides what is redone, so Prefect's result cache is off for every task.
_stage = {"cache_policy": NONE, "persist_result": False}


@task(name="load-models", **_stage)
def load_models_task(settings: PreprocessSettings) -> list[str]:
    return load_active_models(settings)


@task(name="start", **_stage)
def start_task(candidate: Candidate, out_dir: str) -> ClipJob:
    return start_job(candidate, Workspace(Path(out_dir)))


@task(name="probe", **_stage)
def probe_task(job: ClipJob, settings: PreprocessSettings, out_dir: str) -> ClipJob:
    return run_probe(job, settings, Workspace(Path(out_dir)))


@task(name="locate-faces", **_stage)
def locate_task(job: ClipJob, settings: PreprocessSettings, out_dir: str) -> ClipJob:
    return run_locate(job, settings, Workspace(Path(out_dir)))


@task(name="standardise", **_stage)
def standardise_task(job: ClipJob, settings: PreprocessSettings, out_dir: str) -> ClipJob:
    return run_standardise(job, settings, Workspace(Path(out_dir)))


@task(name="face-landmarks", **_stage)
def faces_task(job: ClipJob, settings: PreprocessSettings, out_dir: str) -> ClipJob:
    return run_faces(job, settings, Workspace(Path(out_dir)))


@task(name="filter-and-split", **_stage)
def select_task(job: ClipJob, settings: PreprocessSettings, out_dir: str) -> list[PieceOutcome]:
    return run_select(job, settings, Workspace(Path(out_dir)))


_model_stage = {**_stage, "tags": ["gpu"]}


@task(name="sync-check", **_model_stage)
def sync_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_sync(piece, settings, Workspace(Path(out_dir)))


@task(name="separate-vocals", **_model_stage)
def separate_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_separate(piece, settings, Workspace(Path(out_dir)))


@task(name="transcribe", **_model_stage)
def transcribe_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_transcribe(piece, settings, Workspace(Path(out_dir)))


@task(name="text-emotion", **_model_stage)
def text_emotion_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_text_emotion(piece, settings, Workspace(Path(out_dir)))


@task(name="speech-emotion", **_model_stage)
def speech_emotion_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_speech_emotion(piece, settings, Workspace(Path(out_dir)))


@task(name="valence-arousal", **_model_stage)
def valence_arousal_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_valence_arousal(piece, settings, Workspace(Path(out_dir)))


@task(name="wav2vec", **_model_stage)
def wav2vec_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_wav2vec(piece, settings, Workspace(Path(out_dir)))


@task(name="action-units", **_stage)
def action_units_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_action_units(piece, settings, Workspace(Path(out_dir)))


@task(name="describe", **_model_stage)
def describe_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_describe(piece, settings, Workspace(Path(out_dir)))


@task(name="text-embedding", **_model_stage)
def text_embedding_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_text_embedding(piece, settings, Workspace(Path(out_dir)))


@task(name="vae-latents", **_model_stage)
def latents_task(piece: PieceOutcome, settings: PreprocessSettings, out_dir: str) -> PieceOutcome:
    return run_latents(piece, settings, Workspace(Path(out_dir)))


# (pipeline stage name as in reject reasons, task): the per-piece model stages after separate-vocals, in order.
PIECE_TASKS = (("transcribe", transcribe_task), ("text_emotion", text_emotion_task),
               ("speech_emotion", speech_emotion_task), ("valence_arousal", valence_arousal_task),
               ("wav2vec", wav2vec_task), ("action_units", action_units_task), ("describe", describe_task),
               ("text_embedding", text_embedding_task), ("latents", latents_task))


class _DropWorkerThreadTimeoutWarning(logging.Filter):
    """Prefect warns on every task run with a timeout in a worker thread that the timeout cannot interrupt a
    blocking call. Ours do not block unboundedly: every ffmpeg call polls with its own limit (``preprocess.media``),
    so the injected timeout lands within a poll interval. One warning per task run would bury the real log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_DropWorkerThreadTimeoutWarning())


def _first_failure(stage_futures: list[tuple[str, list[PrefectFuture]]], index: int) -> tuple[str, BaseException | str]:
    """The first stage whose task failed for item ``index`` (later ones never ran), and its exception."""
    for stage, futures in stage_futures:
        futures[index].wait()
        state = futures[index].state
        if state.is_failed() or state.is_crashed():
            return stage, state.result(raise_on_failure=False)
    return stage_futures[-1][0], "the task did not finish"


def _failure_rejection(stage_futures: list[tuple[str, list[PrefectFuture]]], index: int) -> Rejection:
    """A clip whose task failed (ran past ``limits.task_timeout_s``, or crashed outside the stage's own error
    handling) is rejected; an environment failure is re-raised and stops the run."""
    stage, error = _first_failure(stage_futures, index)
    if isinstance(error, BaseException) and is_environment_error(error):
        raise error
    reason = "timeout" if isinstance(error, TimeoutError) else "error"
    return Rejection(stage, reason, f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error)


@flow(name="process-clips", task_runner=ThreadPoolTaskRunner(max_workers=2))
def process_clips(candidates: list[Candidate], settings: PreprocessSettings, out_dir: str) -> list[PieceOutcome]:
    limit = {"timeout_seconds": settings.limits.task_timeout_s}
    args = (unmapped(settings), unmapped(out_dir))
    jobs = start_task.with_options(**limit).map(candidates, unmapped(out_dir))
    clip_stages = [("fingerprint", jobs)]
    for stage, stage_task in (("probe", probe_task), ("locate", locate_task), ("standardise", standardise_task),
                              ("faces", faces_task), ("pieces", select_task)):
        jobs = stage_task.with_options(**limit).map(jobs, *args)
        clip_stages.append((stage, jobs))
    outcomes = []
    for index, future in enumerate(jobs):
        try:
            outcomes += future.result()
        except Exception:
            outcomes.append(PieceOutcome(clip_id=candidates[index].candidate_id, job=ClipJob(candidate=candidates[index]),
                                         rejection=_failure_rejection(clip_stages, index)))
    kept = [outcome for outcome in outcomes if outcome.kept]
    if not kept:
        return outcomes
    # the sync check runs first: it may reject a piece or shift its audio, which every audio stage then reads
    pieces = sync_task.with_options(**limit).map(kept, *args)
    piece_stages = [("sync", pieces)]
    pieces = separate_task.with_options(**limit).map(pieces, *args)
    piece_stages.append(("separate", pieces))
    for stage, piece_task in PIECE_TASKS:
        pieces = piece_task.with_options(**limit).map(pieces, *args)
        piece_stages.append((stage, pieces))
    finished = []
    for index, future in enumerate(pieces):
        try:
            finished.append(future.result())
        except Exception:
            finished.append(replace(kept[index], rejection=_failure_rejection(piece_stages, index)))
    return [outcome for outcome in outcomes if not outcome.kept] + finished


def _check_failure_shares(outcomes: list[PieceOutcome], settings: PreprocessSettings) -> None:
    """Fail the run when a stage failed on more than ``limits.max_error_fraction`` of the clips it ran on."""
    attempts, examples = [], {}
    for outcome in outcomes:
        candidate_id = outcome.job.candidate.candidate_id
        attempts += [(timing.stage, candidate_id, False) for timing in outcome.job.timings]
        attempts += [(timing.stage, outcome.clip_id, False) for timing in outcome.timings]
        rejection = outcome.rejection
        if rejection is not None and rejection.reason in FAILURE_REASONS:
            item = outcome.clip_id if rejection.stage in PIECE_STAGES else candidate_id
            attempts.append((rejection.stage, item, True))
            examples.setdefault(rejection.stage, f"{outcome.clip_id}: {rejection.reason}: {rejection.detail}"[:300])
    check_failure_shares(stage_failure_shares(attempts), settings.limits.max_error_fraction, examples)


def _published_shards(out: Path) -> list[str]:
    """The shard tars a previous run published in ``out/shards``."""
    shards_dir = out / SHARDS_DIR
    if not shards_dir.is_dir():
        return []
    return sorted(path.name for path in shards_dir.iterdir()
                  if (match := SHARD_NAME_PATTERN.fullmatch(path.name)) and match.group(2) == "tar")


def _refuse_empty_publish(outcomes: list[PieceOutcome], out: Path) -> None:
    """A run that keeps nothing is almost always misconfigured (a wrong filter, raw_dir or model): it must not
    replace a published dataset with an empty one unless asked to (``replace_with_empty``)."""
    published = _published_shards(out)
    if any(outcome.kept for outcome in outcomes) or not published:
        return
    reasons = Counter(outcome.rejection.reason for outcome in outcomes if outcome.rejection)
    found = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(8)) or "no rejections"
    raise RunFailed(
        f"this run kept 0 of {len(outcomes)} clips (rejected: {found}); the {len(published)} published shards in "
        f"{out / SHARDS_DIR}, the tables and summary.json were left untouched. Check the settings and raw_dir "
        f"(a filter override can reject everything); to publish an empty dataset over them anyway, rerun with "
        f"replace_with_empty=true (prefect: -p replace_with_empty=true)")


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
    limit: process only the first N candidates (sorted by id), for a quick look.
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
        raw, annotations = Path(raw_dir).resolve(), Path(annotations_dir).resolve() if annotations_dir else None
        candidates, issues = discover_candidates(dataset, raw, annotations, pattern, settings.layouts)
        if not candidates:
            raise RunFailed(_no_candidates_message(dataset, raw, annotations, pattern, settings))
        if limit is not None:
            candidates = candidates[:limit]
        logger.info("%d candidate clips from %s (%s), %d annotation issues; output in %s",
                    len(candidates), raw_dir, dataset, len(issues), out)
        if tiny_model_stages(settings):
            logger.warning(TINY_MODELS_WARNING + " (stages: %s)", ", ".join(tiny_model_stages(settings)))
        loaded = load_models_task.with_options(timeout_seconds=settings.limits.task_timeout_s)(settings)
        logger.info("models loaded:\n  %s", "\n  ".join(loaded))
        removed = Workspace(out).cache.remove_leftovers()
        if removed:
            logger.info("removed %d unfinished work directories left by an interrupted run", removed)

        runner = ThreadPoolTaskRunner(max_workers=settings.workers)
        outcomes = process_clips.with_options(task_runner=runner)(candidates, settings, str(out))
        _check_failure_shares(outcomes, settings)
        if not replace_with_empty:
            _refuse_empty_publish(outcomes, out)
        # Everything above fails without touching a published file; from here on publish_outputs marks the
        # out_dir as being published until summary.json, written last, commits it.
        summary, record = publish_outputs(outcomes, issues, settings, out, run_id=str(flow_run.id),
                                          extra={"dataset": dataset, "profile": profile})
    logger.info("summary\n%s", summary.as_text())
    return record
