"""Captioning with VideoLLaMA2 (the paper's model, 3.4) through its own Prefect deployment.

VideoLLaMA2 pins an old torch and transformers, so it never runs in this environment: it runs in its own, as
the deployment ``videollama2-captions/default`` served by ``flows/videollama2_service.py`` (a self-contained
file: ``python flows/videollama2_service.py serve`` there, against the same Prefect server). The captioning
loader (``preprocess.run.model_loading``) builds a ``VideoLLaMA2DeploymentCaptioner`` when
``models.captioning.model`` is ``videollama2:<path or id>``; ``<path or id>`` is handed to
``videollama2.model_init`` in the service's environment.

The call contract: the clip's *path* goes to the deployment (``run_deployment``), never decoded frames, so the
model's own processor samples ``model.config.num_frames`` frames over the whole clip (the pipeline's
``visual.description.n_frames`` / ``frame_size`` do not apply to this backend); the service returns, per clip,
the text, the frames the model saw and their size, or a per-clip error. Both sides must see the same file
system (the same machine, or the output folder and the service's ``PREFECT_LOCAL_STORAGE_PATH``, where its
results are persisted, mounted at the same paths).

Failures, and what they mean for the run:

- the deployment is missing, not served, unreachable, its flow run failed (VideoLLaMA2 missing there, the
  model not found, CUDA out of memory) or did not finish in time: ``VideoLLaMA2ServiceError``, a
  ``ModelNotFoundError``, i.e. the model is not available: an environment failure, never one clip's fault.
  The construction checks the deployment, so a missing service shows when the model is loaded.
- the service could not caption this clip (unreadable video): ``ClipCaptionError``, recorded against the clip.

Cost: one flow run loads the model once and captions the clips it is given; ``describe_video`` sends one clip
per run (the describe stage runs per piece), ``describe_videos`` several.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.run.failures import ModelNotFoundError

FLOW_NAME = "videollama2-captions"  # flows/videollama2_service.py FLOW_NAME (a test checks they agree)
DEFAULT_DEPLOYMENT = f"{FLOW_NAME}/default"
DEFAULT_TIMEOUT_S = 900.0  # one run, generously: queueing behind another run plus a cold 7B model load
SERVE_HINT = ("serve it from the VideoLLaMA2 environment with `PREFECT_API_URL={api} python "
              "flows/videollama2_service.py serve` (docs/visual_features.md, "
              "'VideoLLaMA2 in its own environment')")


class VideoLLaMA2ServiceError(ModelNotFoundError):
    """The VideoLLaMA2 deployment cannot caption (missing, not served, failed, timed out): the model is not
    available to this run, whichever clip asked."""


class ClipCaptionError(RuntimeError):
    """The service ran but could not caption this one clip (its error is recorded against the clip)."""


@dataclass(frozen=True)
class VideoDescription:
    text: str
    n_frames: int  # frames the model saw (its config's num_frames)
    frame_size: int  # their side in pixels after the model's processor
    seconds: float  # time spent on this clip in the service (excluding the model load)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(none set: an ephemeral server; set PREFECT_API_URL)"


class VideoLLaMA2DeploymentCaptioner:
    """Client of the ``videollama2-captions`` deployment; see the module docstring.

    model_path: what the service passes to ``videollama2.model_init`` (a folder in its environment or a hub
    id). deployment: "flow/deployment" name. timeout_s: the longest one flow run is waited for, queueing
    included; a run still unfinished then is cancelled. poll_interval_s: how often its state is read.
    """

    def __init__(self, model_path: str, *, deployment: str = DEFAULT_DEPLOYMENT,
                 timeout_s: float = DEFAULT_TIMEOUT_S, poll_interval_s: float = 2.0, max_new_tokens: int = 60):
        self.model_path, self.deployment = model_path, deployment
        self.timeout_s, self.poll_interval_s, self.max_new_tokens = timeout_s, poll_interval_s, max_new_tokens
        self.name = f"videollama2:{model_path}"
        self._check_deployment()

    def _error(self, what: str) -> VideoLLaMA2ServiceError:
        return VideoLLaMA2ServiceError(f"captioning model {self.name!r}: {what}")

    def _check_deployment(self) -> None:
        """Fail now, with what to do, when no process can run the deployment (instead of every clip waiting
        ``timeout_s`` for a run nobody picks up)."""
        from prefect import get_client
        from prefect.exceptions import ObjectNotFound

        hint = SERVE_HINT.format(api=_api_url())
        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(self.deployment)
        except ObjectNotFound:
            raise self._error(f"no Prefect deployment {self.deployment!r} on the server at {_api_url()}; "
                              f"{hint}") from None
        except Exception as error:  # httpx connection errors, an ephemeral server that did not start, ...
            raise self._error(f"cannot read deployment {self.deployment!r} from the Prefect server at "
                              f"{_api_url()} ({type(error).__name__}: {error}); start the server, or set "
                              f"PREFECT_API_URL to the one the service is served against") from error
        status = getattr(deployment.status, "value", deployment.status)
        if status == "NOT_READY" or deployment.paused:
            raise self._error(f"deployment {self.deployment!r} exists but no process is serving it (status "
                              f"{status}, paused {deployment.paused}, last polled {deployment.last_polled}); "
                              f"{hint}")

    def describe(self, frames, prompt: str, max_new_tokens: int | None = None) -> str:
        raise TypeError(f"{self.name} reads the clip itself (its config sets the frame count): call "
                        f"describe_video(path, ...) instead of describe(frames, ...)")

    def describe_video(self, video: Path, prompt: str, max_new_tokens: int | None = None) -> VideoDescription:
        """One clip (a video file) -> its description; ``ClipCaptionError`` when the service could not
        caption it, ``VideoLLaMA2ServiceError`` when the service could not run."""
        result = self.describe_videos([video], prompt, max_new_tokens)[0]
        if isinstance(result, ClipCaptionError):
            raise result
        return result

    def describe_videos(self, videos: list[Path], prompt: str,
                        max_new_tokens: int | None = None) -> list[VideoDescription | ClipCaptionError]:
        """Several clips in one flow run (one model load): per clip, in order, a description or its error."""
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        clips = [str(Path(video).resolve()) for video in videos]
        missing = [clip for clip in clips if not Path(clip).is_file()]
        if missing:
            raise FileNotFoundError(f"clips to caption do not exist: {missing}")
        parameters = {"clips": clips, "prompt": prompt, "model_path": self.model_path,
                      "max_new_tokens": max_new_tokens or self.max_new_tokens}
        try:
            flow_run = run_deployment(self.deployment, parameters=parameters, timeout=self.timeout_s,
                                      poll_interval=self.poll_interval_s)
        except ObjectNotFound:
            raise self._error(f"deployment {self.deployment!r} is gone from the server at {_api_url()}; "
                              f"{SERVE_HINT.format(api=_api_url())}") from None
        state, where = flow_run.state, f"flow run {flow_run.name!r} ({flow_run.id}) of {self.deployment!r}"
        if state is None or not state.is_final():
            self._cancel(flow_run.id)
            raise self._error(
                f"{where} did not finish within {self.timeout_s:.0f} s (state {getattr(state, 'name', None)}); "
                f"cancelled. Check that a process serves it ({SERVE_HINT.format(api=_api_url())}) and look at "
                f"its log: `prefect flow-run logs {flow_run.id}`")
        if not state.is_completed():
            raise self._error(f"{where} ended {state.name}: {state.message}. Its log: "
                              f"`prefect flow-run logs {flow_run.id}`")
        try:  # the service persisted it as JSON under its own PREFECT_LOCAL_STORAGE_PATH (an absolute path)
            entries = state.result()
        except Exception as error:
            raise self._error(
                f"{where} completed but its result cannot be read here ({type(error).__name__}: {error}); it is "
                f"stored under the service's PREFECT_LOCAL_STORAGE_PATH (default PREFECT_HOME/storage): run the "
                f"service on this machine, or set that path to a folder both sides see at the same path"
            ) from error
        if not isinstance(entries, list) or len(entries) != len(clips):
            raise self._error(f"{where} returned {type(entries).__name__} of length "
                              f"{len(entries) if isinstance(entries, list) else '-'} for {len(clips)} clips: the "
                              f"served flows/videollama2_service.py does not match this client; serve this "
                              f"repository's version")
        return [self._parse(clip, entry) for clip, entry in zip(clips, entries, strict=True)]

    def _parse(self, clip: str, entry: dict[str, Any]) -> VideoDescription | ClipCaptionError:
        if entry.get("clip") != clip:
            raise self._error(f"the service answered for {entry.get('clip')!r} where {clip!r} was asked")
        if entry.get("error"):
            return ClipCaptionError(f"VideoLLaMA2 ({self.model_path}) could not caption {clip}: {entry['error']}")
        return VideoDescription(text=entry["text"], n_frames=entry["n_frames"], frame_size=entry["frame_size"],
                                seconds=entry["seconds"])

    def _cancel(self, flow_run_id) -> None:
        """Cancel an abandoned run so that it does not hold the service's GPU for nobody (best effort: the
        timeout error that follows is what matters)."""
        from prefect import get_client
        from prefect.states import Cancelling

        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run_id, Cancelling(message=f"{self.name}: client timed out"),
                                          force=True)
        except Exception:  # a failed cancel must not hide the timeout
            pass
