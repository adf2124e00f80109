"""VideoLLaMA2 captioning as a Prefect deployment of its own, run from VideoLLaMA2's own environment (paper 3.4).

VideoLLaMA2 is not on PyPI and pins an old torch and transformers, so it cannot share the pipeline's
environment. This file is the whole service: it imports only the standard library and prefect (and, inside the
flow, ``videollama2``), nothing from this repository, so it runs in the VideoLLaMA2 environment with only
prefect added there (the pipeline's version, ``prefect==3.8.8``; docs/visual_features.md, "VideoLLaMA2 in its
own environment", has the install commands). Serve it against the pipeline's Prefect server::

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/videollama2_service.py serve

and the pipeline (``preprocess.visual.describe_videollama2``, selected by ``models.captioning.model =
"videollama2:<path or id>"``) calls the deployment ``videollama2-captions/default`` with clip *paths*: the
file system is shared, frames never travel through Prefect.

One flow run captions a list of clips with one model load (``videollama2.model_init``). Each clip is read by
the model's own video processor (``processor["video"](path, num_frames=N)``, decord inside VideoLLaMA2) with
``N`` = ``model.config.num_frames`` (VideoLLaMA2's own fallback ``videollama2.constants.NUM_FRAMES`` when the
config has none): given a path it samples N frames uniformly over the whole clip, repeating frames of a short
clip rather than appending black ones (which it does when handed fewer decoded frames than N). A clip that
fails (unreadable, empty) gets an entry with ``error`` set; the other clips go on. A failure of the
environment (``videollama2`` missing, the model not found, CUDA errors, out of memory) fails the flow run, so
the pipeline stops loudly instead of rejecting every clip.

Results are persisted as JSON (``persist_result``), so the caller reads them with ``state.result()``.
``serve`` runs at most ``--limit`` (default 1) flow runs at a time: each run loads the model onto the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

FLOW_NAME = "videollama2-captions"
DEFAULT_DEPLOYMENT = "default"
DEFAULT_MODEL = "DAMO-NLP-SG/VideoLLaMA2-7B"
INSTALL_HINT = ("install VideoLLaMA2 in its own environment (a clone of "
                "https://github.com/DAMO-NLP-SG/VideoLLaMA2: its requirements.txt without the gradio/httpx "
                "pins, which conflict with prefect, then `pip install -e . --no-deps`; synchrorama's "
                "docs/visual_features.md has the commands) and serve this file from there")


class VideoLLaMA2EnvironmentError(RuntimeError):
    """The VideoLLaMA2 environment cannot caption at all (not installed, wrong version, model not loadable)."""


def _load(model_path: str):
    """(model, processor dict, tokenizer, mm_infer) through VideoLLaMA2's own API."""
    try:
        import videollama2
    except ImportError as error:
        raise VideoLLaMA2EnvironmentError(
            f"`import videollama2` failed in {sys.executable}: {error}. This flow must run in VideoLLaMA2's "
            f"environment: {INSTALL_HINT}") from error
    if not hasattr(videollama2, "mm_infer"):
        raise VideoLLaMA2EnvironmentError(
            f"videollama2 at {getattr(videollama2, '__file__', '?')} has no mm_infer (an old version whose "
            f"model_init returns a single video processor); install the repository's current main branch")
    try:
        model, processor, tokenizer = videollama2.model_init(model_path)
    except Exception as error:
        raise VideoLLaMA2EnvironmentError(
            f"videollama2.model_init({model_path!r}) failed ({type(error).__name__}: {error}); give a local "
            f"checkpoint folder or a hub id present in this environment's Hugging Face cache") from error
    return model, processor, tokenizer, videollama2.mm_infer


def config_num_frames(model) -> tuple[int, str]:
    """Frames the model was trained to see per video, and where the number came from.

    The same rule as ``videollama2.model_init``: ``model.config.num_frames`` (8 for VideoLLaMA2-7B, 16 for the
    -16F and 2.1 checkpoints, per VideoLLaMA2's model table), else the package's ``NUM_FRAMES`` constant.
    """
    configured = getattr(getattr(model, "config", None), "num_frames", None)
    if configured:
        return int(configured), "model.config.num_frames"
    from videollama2.constants import NUM_FRAMES

    return int(NUM_FRAMES), "videollama2.constants.NUM_FRAMES"


# Substrings of errors from a broken GPU setup rather than from one clip (the pipeline's preprocess.run.failures
# uses the same list; this file cannot import it).
_DEVICE_ERROR_MARKERS = ("CUDA", "cuDNN", "cuBLAS", "out of memory", "HIP error", "no kernel image",
                         "Found no NVIDIA driver")


def _is_environmental(error: BaseException) -> bool:
    """Errors no other clip would escape: they fail the run instead of being recorded against one clip."""
    return (isinstance(error, (VideoLLaMA2EnvironmentError, ImportError, MemoryError))
            or "OutOfMemory" in type(error).__name__
            or any(marker in str(error) for marker in _DEVICE_ERROR_MARKERS))


def caption_clip(clip: str, prompt: str, *, model, processor, tokenizer, mm_infer, n_frames: int,
                 max_new_tokens: int) -> dict[str, Any]:
    """One clip's entry: ``text``, ``n_frames`` (frames the model saw), ``frame_size`` (their width in pixels
    after the processor's resize; square for VideoLLaMA2), ``seconds``; or ``error`` ("Type: message") when
    this clip failed. Environment failures (including a path this process cannot see) are raised instead."""
    started = time.monotonic()
    entry: dict[str, Any] = {"clip": clip, "text": None, "n_frames": None, "frame_size": None, "error": None}
    try:
        if not Path(clip).is_file():  # the caller only sends files it has: this is not one clip's fault
            raise VideoLLaMA2EnvironmentError(
                f"no such clip file {clip} in this environment: the service reads the caller's paths, so both "
                f"must see the same file system (run it on the same machine, or mount the output folder at "
                f"the same path)")
        # A path, not decoded frames: the processor samples n_frames over the whole clip itself and never pads.
        video = processor["video"](clip, num_frames=n_frames)  # (T, C, H, W)
        entry["n_frames"], entry["frame_size"] = int(video.shape[0]), int(video.shape[-1])
        text = mm_infer(video, prompt, model=model, tokenizer=tokenizer, modal="video", do_sample=False,
                        max_new_tokens=max_new_tokens)
        entry["text"] = str(text).strip()
    except Exception as error:
        if _is_environmental(error):
            raise
        entry["error"] = f"{type(error).__name__}: {error}"
    entry["seconds"] = round(time.monotonic() - started, 3)
    return entry


@flow(name=FLOW_NAME, persist_result=True, result_serializer="json")
def videollama2_captions(clips: list[str], prompt: str, model_path: str = DEFAULT_MODEL,
                         max_new_tokens: int = 60) -> list[dict[str, Any]]:
    """Caption each clip with VideoLLaMA2; one entry per clip, in order.

    clips: absolute paths of the video files. prompt: the instruction. model_path: a VideoLLaMA2 checkpoint
    folder or hub id, as ``videollama2.model_init`` takes it. max_new_tokens: generation limit (greedy).
    Each entry: ``clip``, ``text``, ``n_frames``, ``frame_size``, ``error``, ``seconds``, plus ``model``
    (model_path) and ``frames_from`` (where ``n_frames`` was read).
    """
    logger = get_run_logger()
    started = time.monotonic()
    model, processor, tokenizer, mm_infer = _load(model_path)
    n_frames, frames_from = config_num_frames(model)
    logger.info("%s loaded in %.1f s; %d frames per clip (%s); %d clips",
                model_path, time.monotonic() - started, n_frames, frames_from, len(clips))
    entries = []
    for clip in clips:
        entry = caption_clip(clip, prompt, model=model, processor=processor, tokenizer=tokenizer,
                             mm_infer=mm_infer, n_frames=n_frames, max_new_tokens=max_new_tokens)
        if entry["error"]:
            logger.warning("clip %s failed: %s", clip, entry["error"])
        entries.append({**entry, "model": model_path, "frames_from": frames_from})
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help=f"serve the flow as deployment {FLOW_NAME}/{DEFAULT_DEPLOYMENT}, "
                                              "the name the pipeline calls (blocks)")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at a time (each loads the model)")
    caption = commands.add_parser("caption", help="caption clips here and print JSON (checks the environment)")
    caption.add_argument("clips", nargs="+")
    caption.add_argument("--model", default=DEFAULT_MODEL)
    caption.add_argument("--prompt", default="Describe the person in this video.")
    caption.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args(argv)
    if args.command == "serve":
        videollama2_captions.serve(name=DEFAULT_DEPLOYMENT, limit=args.limit)
    else:
        clips = [str(Path(clip).resolve()) for clip in args.clips]
        print(json.dumps(videollama2_captions(clips, args.prompt, args.model, args.max_new_tokens), indent=2))


if __name__ == "__main__":
    main()
