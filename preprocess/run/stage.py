"""What a stage declares about itself (``Stage``, ``Split``); ``preprocess.run.executor`` runs every one by the same
rules, and ``preprocess.pipeline`` lists them in order. Nothing here runs anything.

Adding a stage: a module that ends with its ``STAGE = Stage(...)`` declaration, and its line in
``preprocess.pipeline.STAGES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from preprocess.run.job import ClipJob, PieceOutcome, Workspace
from preprocess.run.model_loading import Loader
from preprocess.run.settings import PreprocessSettings

Item = Union[ClipJob, PieceOutcome]
GROUPS = ("video", "audio", "visual")  # the stage groups, in the order a partition goes through them


def _always(*_: Any) -> bool:
    return True


def not_rejected(item: Item, settings: PreprocessSettings) -> bool:
    """The default: a job not rejected, a piece kept (not rejected and cut into its own files)."""
    return item.kept if isinstance(item, PieceOutcome) else item.rejection is None


def _unchanged(item: Item, entry: dict, settings: PreprocessSettings, workspace: Workspace) -> Item:
    return item


@dataclass(frozen=True)
class Stage:
    """One cached stage. ``key_parts(item, settings, workspace)`` lists what its output depends on beyond its name
    and version (upstream keys, its settings' fingerprint, the model identity); ``run(item, settings, workspace,
    out_dir)`` computes one item's result (a JSON-able dict; files go into ``out_dir``); ``finish(item, entry,
    settings, workspace)`` reads the stored result into the item (and may reject it)."""

    name: str
    version: int  # bump when the code changes the output
    group: str  # "video" (per candidate, CPU), "audio" or "visual" (per kept piece, batched, a GPU slot)
    key_parts: Callable[[Any, PreprocessSettings, Workspace], list]
    run: Callable[[Any, PreprocessSettings, Workspace, Path], dict]
    finish: Callable[[Any, dict, PreprocessSettings, Workspace], Any] = _unchanged
    models: tuple[str, ...] = ()  # settings.models fields it loads (``load_model``); loaded before any clip
    loader: Loader | None = None  # its own loader of that model, where the model's class lives in the stage's module
    preload: Callable[[PreprocessSettings], str] | None = None  # loads a model outside settings.models; says which
    enabled: Callable[[PreprocessSettings], bool] = _always  # switched off: no entry, no model loaded
    applies: Callable[[Any, PreprocessSettings], bool] = not_rejected  # else the item passes through untouched
    prepare: Callable[[Any, PreprocessSettings, Workspace], Any] | None = None  # checks before the key; -> item or Rejection
    run_many: Callable[[list, PreprocessSettings, Workspace, list[Path]], list[dict]] | None = None
    batchable: Callable[[PreprocessSettings], bool] = _always  # False: run_many is not used with these settings
    timing_name: str | None = None  # its name in the timings, when that differs (the cut's "pieces" is "cut")


@dataclass(frozen=True)
class Split:
    """The stage that turns a candidate's job into its pieces: ``run(job, settings, workspace) -> [PieceOutcome]``
    (it runs its own cached stages per piece through ``run_stage``)."""

    name: str
    group: str
    run: Callable[[ClipJob, PreprocessSettings, Workspace], list[PieceOutcome]]
