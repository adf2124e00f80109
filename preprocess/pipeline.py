"""The table of stages, in the order a clip goes through them, and the groups the flow runs them in.

Each stage declares itself in its own module (``STAGE = Stage(...)``: name, version, group, models, cache-key
parts, ``run`` and, where it batches, ``run_many``); ``preprocess.run.executor`` runs every one by the same rules
(cache, rejections, batching, time limits). Adding a stage is its module plus one line here.

Groups: ``video`` runs per candidate on the CPU and ends with the split into pieces; ``audio`` and ``visual`` run
per kept piece, each stage batched across a partition's pieces (``flows/preprocess.py`` gives them a GPU slot).
Nothing here knows of Prefect: tests and benchmarks call these functions directly.
"""

from __future__ import annotations

from preprocess.audio import (
    separate,
    speech_emotion,
    sync_check,
    text_emotion,
    transcribe,
    valence_arousal,
    wav2vec_features,
)
from preprocess.run import executor
from preprocess.run.executor import start_job
from preprocess.run.job import ClipJob, PieceOutcome, Workspace
from preprocess.run.model_loading import LoadedModel
from preprocess.run.model_loading import load_model as _load_model
from preprocess.run.records import Candidate
from preprocess.run.settings import ModelChoice, PreprocessSettings
from preprocess.run.stage import Split, Stage
from preprocess.video import cut, faces, frame_quality, locate, probe, select, speech_activity, standardise
from preprocess.visual import action_units, describe, latents, text_embedding

STAGES: tuple[Stage | Split, ...] = (
    # video: per candidate
    probe.STAGE,
    locate.STAGE,
    standardise.STAGE,  # with the face mesh and frame-quality measures on its one decode
    faces.STAGE,
    speech_activity.STAGE,
    frame_quality.STAGE,
    select.STAGE,  # the split into pieces, each cut (cut.STAGE) when kept
    # audio: per kept piece
    sync_check.STAGE,
    separate.STAGE,
    transcribe.STAGE,
    text_emotion.STAGE,
    speech_emotion.STAGE,
    valence_arousal.STAGE,
    wav2vec_features.STAGE,
    # visual: per kept piece
    action_units.STAGE,
    describe.STAGE,
    text_embedding.STAGE,
    latents.STAGE,
)
# Stages that run inside another (the cut, per piece, inside the split): cached and versioned like the rest.
INNER_STAGES = (cut.STAGE,)



def cached_stages() -> dict[str, Stage]:
    """Every cached stage of the table (and those run inside another) by name, read from the table when called."""
    return {stage.name: stage for stage in (*STAGES, *INNER_STAGES) if isinstance(stage, Stage)}


def stage_versions() -> dict[str, int]:
    """Each cached stage's version: part of every partition's key, so a bumped version redoes the partitions."""
    return {name: stage.version for name, stage in cached_stages().items()}


def stages_of(group: str) -> tuple[Stage | Split, ...]:
    return tuple(stage for stage in STAGES if stage.group == group)


# The per-piece model stages whose results the shards hold, in the order they run (the sync check is a filter).
AUDIO_STAGES = tuple(stage.name for stage in stages_of("audio") if stage.name != "sync")
VISUAL_STAGES = tuple(stage.name for stage in stages_of("visual"))


def run_video_group(candidates: tuple[Candidate, ...] | list[Candidate], settings: PreprocessSettings,
                    workspace: Workspace) -> list[PieceOutcome]:
    """Every candidate through the video stages (in order), to its piece outcomes."""
    return [outcome for candidate in candidates
            for outcome in executor.run_candidate(candidate, stages_of("video"), settings, workspace)]


def run_model_group(group: str, pieces: list[PieceOutcome], settings: PreprocessSettings,
                    workspace: Workspace) -> list[PieceOutcome]:
    """The audio or visual group's stages over a partition's pieces, each batched across the kept pieces."""
    return executor.run_piece_stages(stages_of(group), pieces, settings, workspace)


def run_stage(name: str, item, settings: PreprocessSettings, workspace: Workspace):
    """One stage, by name, on one job or piece (tests, benchmarks)."""
    return executor.run_stage(cached_stages()[name], item, settings, workspace)


def run_piece_stage_batch(name: str, pieces: list[PieceOutcome], settings: PreprocessSettings,
                          workspace: Workspace) -> list[PieceOutcome]:
    """One per-piece stage, by name, over many pieces (batched where the stage batches)."""
    return executor.run_stage_batch(cached_stages()[name], pieces, settings, workspace)


def run_select(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> list[PieceOutcome]:
    """Filter-and-split of a job that went through the face mesh: speech activity, frame quality, then the split
    into judged (and, when kept, cut) pieces (tests, benchmarks)."""
    for stage in (speech_activity.STAGE, frame_quality.STAGE):
        job = executor.run_stage(stage, job, settings, workspace)
    return executor.split_job(select.STAGE, job, settings, workspace)


def run_clip_stages(candidate: Candidate, settings: PreprocessSettings,
                    workspace: Workspace) -> tuple[ClipJob, list[PieceOutcome]]:
    """Every video stage on one candidate (tests, benchmarks): the job after the face mesh and its piece outcomes."""
    job = start_job(candidate, workspace)
    for name in ("probe", "locate", "standardise", "faces"):
        job = run_stage(name, job, settings, workspace)
    return job, run_select(job, settings, workspace)


def run_audio_stages(piece: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    """Every audio stage but the sync check on one piece, in order (tests, benchmarks)."""
    for name in AUDIO_STAGES:
        piece = run_stage(name, piece, settings, workspace)
    return piece


def model_stages(settings: PreprocessSettings) -> list[Stage]:
    """The enabled stages that load a model, in table order."""
    return [stage for stage in cached_stages().values() if stage.enabled(settings) and (stage.models or stage.preload)]


def load_model(kind: str, choice: ModelChoice) -> LoadedModel:
    """A model by kind, with the loader its stage declares (generation, evaluation and benchmarks use it)."""
    loader = next((stage.loader for stage in cached_stages().values() if kind in stage.models), None)
    return _load_model(kind, choice, loader)
