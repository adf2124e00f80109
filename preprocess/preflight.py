"""Before any clip is touched: load every model the run's active stages need, each once, or fail the run.

A model that cannot be loaded (not in the cache, a wrong path, a processor that cannot be built here, CUDA out of
memory, a bad driver) would otherwise fail inside its stage on every clip. Here it fails the run at once, with one
message that lists every such model: what it is, where it was looked for and how to get it (the loaders'
``ModelNotFoundError`` messages), or the loader's own error.

The loaded models stay in ``preprocess.stage_models``' process-wide cache, so the stages reuse them: the flow's
tasks run in threads of the process that ran the preflight.
"""

from __future__ import annotations

from preprocess.settings import ModelChoice, PreprocessSettings


class ModelSetupError(RuntimeError):
    """One or more of the run's models cannot be loaded; the message says which, where and how to fix it."""


def active_models(settings: PreprocessSettings) -> dict[str, ModelChoice]:
    """The model stages this run will execute, by kind (``stage_models.KINDS``), with their model choice."""
    models = settings.models
    active = {"separation": models.separation, "transcription": models.transcription,
              "text_emotion": models.text_emotion, "speech_emotion": models.speech_emotion,
              "valence_arousal": models.valence_arousal, "wav2vec": models.wav2vec}
    if settings.visual.description.enabled:
        active["captioning"] = models.captioning
        active["text_encoder"] = models.text_encoder
    if settings.visual.latents.enabled:
        active["vae"] = models.vae
    if settings.sync.enabled:
        active["sync_expert"] = models.sync_expert
    return active


def load_active_models(settings: PreprocessSettings) -> list[str]:
    """Load every active model once (see the module docstring); returns what was loaded, as "kind: reference".

    Raises ``ModelSetupError`` listing every model that failed.
    """
    from preprocess.pipeline import au_backend
    from preprocess.stage_models import ModelNotFoundError, load_model

    loaded, problems = [], []
    for kind, choice in active_models(settings).items():
        try:
            load_model(kind, choice)
            loaded.append(f"{kind}: {choice.model}")
        except ModelNotFoundError as error:
            problems.append(str(error))
        except Exception as error:  # anything else a loader raises is as fatal: say which model it was
            problems.append(f"{kind} model {choice.model!r} (revision {choice.revision or 'default'}, device "
                            f"{choice.device}) failed to load: {type(error).__name__}: {error}")
    try:
        from preprocess.speech_activity import load_silero_vad, silero_identity

        load_silero_vad()
        loaded.append(f"speech_activity: {silero_identity()}")
    except Exception as error:
        problems.append(f"speech-activity model (Silero VAD from the silero-vad package) failed to load: "
                        f"{type(error).__name__}: {error}. It ships inside its wheel: `pip install -c "
                        f"constraints.txt silero-vad`")
    try:
        backend = au_backend(settings)
        loaded.append(f"action_units: {backend.name}")
    except Exception as error:
        problems.append(f"action-unit model ({settings.visual.action_units.backend}, "
                        f"{settings.visual.action_units.exported_model}) failed to load: "
                        f"{type(error).__name__}: {error}")
    if problems:
        raise ModelSetupError(f"{len(problems)} model(s) of profile {settings.profile!r} cannot be loaded, so no "
                              "clip was processed:\n- " + "\n- ".join(problems))
    return loaded
