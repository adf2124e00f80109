"""Stage: an LLM-written description of the whole clip's attributes and actions (paper 3.4).

The paper uses VideoLLaMA2. Two backends:

- ``TransformersCaptioner``: any transformers image-text-to-text model (the default Qwen2.5-VL, LLaVA,
  LLaVA-OneVision, ...) through its own processor and ``AutoModelForImageTextToText``. The clip's uniformly
  sampled frames go in as a list of images, in both installs: transformers' *video* processors need
  torchvision, which the CPU install must not have, so there the processor is built without its video
  processor (``load_captioning_processor``); with torchvision (a GPU install) it is the plain ``AutoProcessor``.
  Greedy decoding, so a description is reproducible. Clips are described in batches of
  ``models.captioning.batch_size`` (``describe_many``; a description does not depend on its batch-mates).
- ``VideoLLaMA2DeploymentCaptioner`` (``preprocess.visual.describe_videollama2``): the paper's model, which pins an
  old torch/transformers, runs in its own environment as a Prefect deployment (``flows/videollama2_service.py``)
  that reads the clip file itself; it has ``describe_video(path, prompt, max_new_tokens)`` instead of frames.

The prompt is configurable and recorded with every description, with the model reference.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from preprocess.run.batching import run_fixed_shape_batches
from preprocess.run.media import count_video_frames, iter_rgb_frames
from preprocess.run.model_loading import (
    VIDEOLLAMA2_PREFIX,
    LoadedModel,
    load_model,
    model_identity,
    model_source,
    wrapped_loader,
)
from preprocess.run.settings import ModelChoice
from preprocess.run.stage import Stage
from preprocess.video.standardise import VIDEO_FILE


class CaptionBackend(Protocol):
    name: str  # model reference recorded with each description

    def describe(self, frames: list[np.ndarray], prompt: str, max_new_tokens: int | None = None) -> str:
        """frames: RGB uint8 (H, W, 3) sampled uniformly over the clip -> one description (greedy decoding,
        at most ``max_new_tokens`` tokens; None: the backend's default)."""
        ...


def sample_frames_uniformly(video: Path, n_frames: int, size: int = 512) -> list[np.ndarray]:
    """``n_frames`` frames at evenly spaced positions over the whole clip (centres of n equal spans)."""
    total = count_video_frames(video)
    wanted = {int((index + 0.5) * total / n_frames) for index in range(min(n_frames, total))}
    return [frame for index, frame in enumerate(iter_rgb_frames(video, width=size, height=size)) if index in wanted]


def load_captioning_processor(model_path: str, *, revision: str | None = None):
    """The captioning model's own processor, able to take frames as images with or without torchvision.

    With torchvision (a GPU install): ``AutoProcessor``, image and video processors. Without it (the CPU install):
    the same processor class, built from the image processor and the tokenizer only. Qwen2-VL / Qwen2.5-VL /
    LLaVA-OneVision processors construct a video processor that refuses to exist without torchvision, and
    ``ProcessorMixin`` accepts no ``None`` in its place, so ``AutoProcessor`` would fail on every clip. The image
    processor is then the PIL backend ``AutoImageProcessor`` picks (``Qwen2VLImageProcessorPil`` for
    ``"image_processor_type": "Qwen2VLImageProcessor"``), with the model's settings. The processor class is the
    one transformers maps the model's config to (``Qwen2_5_VLProcessor`` for ``model_type`` ``qwen2_5_vl``).
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(model_path, revision=revision)
    config_class = type(AutoConfig.from_pretrained(model_path, revision=revision))
    processor_class = PROCESSOR_MAPPING[config_class] if config_class in PROCESSOR_MAPPING else None
    if processor_class is None or "video_processor" not in processor_class.get_attributes():
        return AutoProcessor.from_pretrained(model_path, revision=revision)  # needs no torchvision
    return _without_video_processor(processor_class).from_pretrained(model_path, revision=revision)


@functools.cache
def _without_video_processor(processor_class: type) -> type:
    """A subclass of ``processor_class`` whose sub-processors are its image processor and tokenizer only.

    ``ProcessorMixin`` takes the list of sub-processors from the ``__init__`` signature (and checks each one's
    class), so leaving one out means a signature without it. Everything else (chat template, image-token
    expansion, ``__call__``, decoding) is the class's own code; the instance has no ``video_processor``.
    """
    parameters = inspect.signature(processor_class.__init__).parameters
    if not {"image_processor", "tokenizer", "video_processor"} <= set(parameters):
        raise TypeError(f"{processor_class.__name__} does not take (image_processor, tokenizer, video_processor): "
                        f"cannot build it without its video processor; install torchvision to use AutoProcessor")

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                 chat_template=chat_template, **kwargs)

    return type(f"{processor_class.__name__}WithoutVideo", (processor_class,),
                {"__init__": __init__, "__module__": __name__,
                 "__doc__": f"{processor_class.__name__} without its video processor (frames go in as images)."})


class TransformersCaptioner:
    """An image-text-to-text model from transformers (the default: Qwen2.5-VL) describing a clip's frames."""

    def __init__(self, model_path: str, *, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int = 60):
        import torch
        from transformers import AutoModelForImageTextToText

        try:
            self.processor = load_captioning_processor(model_path, revision=revision)
            self.model = AutoModelForImageTextToText.from_pretrained(model_path, revision=revision,
                                                                     dtype=getattr(torch, dtype))
        except OSError as error:
            raise FileNotFoundError(
                f"captioning model {model_path!r} not found locally (no hub access here): download it with "
                f"`hf download {model_path}` on a connected machine and point the config at that folder, or "
                f"use the tiny profile (`python -m tiny_models`)") from error
        self.model.to(device).eval()
        self.device, self.max_new_tokens, self.name = device, max_new_tokens, str(model_path)

    def _prompt_text(self, n_images: int, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"USER: {image_token * n_images}\n{prompt} ASSISTANT:"

    def describe(self, frames: list[np.ndarray], prompt: str, max_new_tokens: int | None = None,
                 batch_size: int = 1) -> str:
        return self.describe_many([frames], prompt, max_new_tokens, batch_size)[0]

    def describe_many(self, clips: list[list[np.ndarray]], prompt: str, max_new_tokens: int | None = None,
                      batch_size: int = 1) -> list[str]:
        """One description per clip (its sampled frames), the same prompt for all: clips with the same number
        and size of frames have prompts of the same token count, so they batch without padding, in batches of
        exactly ``batch_size`` clips (a short batch filled with copies, ``preprocess.run.batching``); a clip's
        description does not depend on the others. A clip that finishes early is padded after its end of
        sequence while the others go on, and the padding is dropped when decoding."""
        import torch

        def forward(rows: list[list[np.ndarray]]) -> list[str]:
            texts = [self._prompt_text(len(frames), prompt) for frames in rows]
            inputs = self.processor(images=[frame for frames in rows for frame in frames], text=texts,
                                    return_tensors="pt", padding=True)
            if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
                raise RuntimeError("captioning prompts of one batch differ in length: clips were grouped wrongly")
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:  # the processor returns float32 pixels; a bf16/fp16 model wants its dtype
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                             do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

        shapes = [(len(frames), *(frames[0].shape if frames else ())) for frames in clips]
        return run_fixed_shape_batches(clips, shapes, batch_size, forward)


def load_captioner(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    if choice.model.startswith(VIDEOLLAMA2_PREFIX):
        from preprocess.visual.describe_videollama2 import VideoLLaMA2DeploymentCaptioner

        # VideoLLaMA2 runs in its own environment behind a Prefect deployment, on the device its service picks:
        # "loading" it here checks that the deployment is served (VideoLLaMA2ServiceError, a ModelNotFoundError).
        model = VideoLLaMA2DeploymentCaptioner(choice.model[len(VIDEOLLAMA2_PREFIX):])
    else:
        source = model_source("captioning", choice)
        model = wrapped_loader("captioning", choice, lambda: TransformersCaptioner(
            source, revision=choice.revision, device=str(device), dtype=str(dtype).removeprefix("torch.")))
        model.name = choice.model  # the reference as configured, not the resolved folder
    return LoadedModel("captioning", choice.model, model, device, dtype)


# ---------------------------------------------------------------- the stage: on each kept piece's video, batched


def _describe_many(pieces: list, settings, workspace, out_dirs: list[Path]) -> list[dict]:
    chosen, choice = settings.visual.description, settings.models.captioning
    captioner = load_model("captioning", choice, load_captioner)
    videos = [Path(piece.files_dir) / VIDEO_FILE for piece in pieces]
    if hasattr(captioner.model, "describe_video"):  # VideoLLaMA2's service reads each clip with its own sampler
        described = [captioner.model.describe_video(video, chosen.prompt, chosen.max_new_tokens) for video in videos]
        answers = [(d.text, d.n_frames, d.frame_size) for d in described]
    else:
        clips = [sample_frames_uniformly(video, chosen.n_frames, chosen.frame_size) for video in videos]
        with captioner.lock:
            texts = captioner.model.describe_many(clips, chosen.prompt, chosen.max_new_tokens, choice.batch_size)
        answers = [(text, len(frames), chosen.frame_size) for text, frames in zip(texts, clips, strict=True)]
    # An empty answer is recorded as such, never replaced by a made-up one.
    return [{"text": text, "status": "ok" if text.strip() else "empty", "prompt": chosen.prompt,
             "model": choice.model, "n_frames": n_frames, "frame_size": frame_size}
            for text, n_frames, frame_size in answers]


STAGE = Stage(
    name="describe", version=1, group="visual", models=("captioning",), loader=load_captioner,
    enabled=lambda settings: settings.visual.description.enabled, run_many=_describe_many,
    # VideoLLaMA2's service describes one clip per call: nothing to batch
    batchable=lambda settings: not settings.models.captioning.model.startswith(VIDEOLLAMA2_PREFIX),
    key_parts=lambda piece, settings, workspace: [piece.content_key, settings.visual.description.fingerprint(),
                                                  model_identity(settings.models.captioning)],
    run=lambda piece, settings, workspace, out_dir: _describe_many([piece], settings, workspace, [out_dir])[0])
