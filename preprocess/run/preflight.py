"""Before any clip is touched: load every model the run's enabled stages declare, each once, or fail the run.

A model that cannot be loaded (not in the cache, a wrong path, a processor that cannot be built here, CUDA out of
memory, a bad driver) would otherwise fail inside its stage on every clip. Here it fails the run at once, with one
message that lists every such model: what it is, where it was looked for and how to get it (the loaders'
``ModelNotFoundError`` messages), or the loader's own error.

The loaded models stay in ``preprocess.run.model_loading``' process-wide cache, so the stages reuse them: the flow's
tasks run in threads of the process that ran the preflight.
"""

from __future__ import annotations

from preprocess.pipeline import model_stages
from preprocess.run.failures import ModelNotFoundError
from preprocess.run.model_loading import load_model
from preprocess.run.settings import ModelChoice, PreprocessSettings


class ModelSetupError(RuntimeError):
    """One or more of the run's models cannot be loaded; the message says which, where and how to fix it."""


def active_models(settings: PreprocessSettings) -> dict[str, ModelChoice]:
    """The models of ``settings.models`` that the enabled stages load, by kind, with their model choice."""
    return {kind: getattr(settings.models, kind) for stage in model_stages(settings) for kind in stage.models}


def load_active_models(settings: PreprocessSettings) -> list[str]:
    """Load every model of the enabled stages once (see the module docstring); returns what was loaded, as
    "kind: reference". Raises ``ModelSetupError`` listing every model that failed."""
    loaded, problems = [], []
    for stage in model_stages(settings):
        for kind in stage.models:
            choice = getattr(settings.models, kind)
            try:
                load_model(kind, choice, stage.loader)
                loaded.append(f"{kind}: {choice.model}")
            except ModelNotFoundError as error:
                problems.append(str(error))
            except Exception as error:  # anything else a loader raises is as fatal: say which model it was
                problems.append(f"{kind} model {choice.model!r} (revision {choice.revision or 'default'}, device "
                                f"{choice.device}) failed to load: {type(error).__name__}: {error}")
        if stage.preload is not None:
            try:
                loaded.append(f"{stage.name}: {stage.preload(settings)}")
            except Exception as error:
                problems.append(str(error))
    if problems:
        raise ModelSetupError(f"{len(problems)} model(s) of profile {settings.profile!r} cannot be loaded, so no "
                              "clip was processed:\n- " + "\n- ".join(problems))
    return loaded
