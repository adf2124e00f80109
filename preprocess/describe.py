"""Stage: an LLM-written description of the whole clip's attributes and actions (paper 3.4).

The paper uses VideoLLaMA2. Two backends share one interface:

- ``TransformersCaptioner``: any transformers image-text-to-text model (LLaVA, LLaVA-OneVision, Qwen2.5-VL,
  ...) through ``AutoProcessor`` / ``AutoModelForImageTextToText``. The clip's uniformly sampled frames go in
  as a list of images: transformers' *video* processors need torchvision, which CPU machines here lack; with
  a GPU environment the same frames work as images too. Greedy decoding, so a description is reproducible.
- ``VideoLLaMA2Captioner``: the paper's model through its own ``model_init`` / ``mm_infer`` API. VideoLLaMA2
  is not on PyPI and pins old torch/transformers, so it lives in its own environment
  (``pip install git+https://github.com/DAMO-NLP-SG/VideoLLaMA2``); this backend imports it lazily.

The prompt is configurable and recorded with every description, with the model reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from preprocess.media import count_video_frames, iter_rgb_frames

DEFAULT_PROMPT = (
    "Describe the person in this video in one or two sentences: visible attributes (for example wearing "
    "earrings, glasses, a hat, hairstyle, clothing) and actions over the whole clip (for example turning "
    "head, nodding, smiling, raising eyebrows)."
)


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


class TransformersCaptioner:
    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 60):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=getattr(torch, dtype))
        except OSError as error:
            raise FileNotFoundError(
                f"captioning model {model_path!r} not found locally (no hub access here): download it with "
                f"`hf download {model_path}` on a connected machine and point the config at that folder, or "
                f"use the tiny profile (`python -m synchrorama.tiny_models`)") from error
        self.model.to(device).eval()
        self.device, self.max_new_tokens, self.name = device, max_new_tokens, str(model_path)

    def _prompt_text(self, n_images: int, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"USER: {image_token * n_images}\n{prompt} ASSISTANT:"

    def describe(self, frames: list[np.ndarray], prompt: str, max_new_tokens: int | None = None) -> str:
        import torch

        inputs = self.processor(images=frames, text=self._prompt_text(len(frames), prompt), return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:  # the processor returns float32 pixels; a bf16/fp16 model wants its own dtype
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                         do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


class VideoLLaMA2Captioner:
    def __init__(self, model_path: str = "DAMO-NLP-SG/VideoLLaMA2-7B"):
        try:
            from videollama2 import mm_infer, model_init
        except ImportError as error:
            raise ImportError(
                "VideoLLaMA2 is not installed in this environment; install it in its own environment with "
                "`pip install git+https://github.com/DAMO-NLP-SG/VideoLLaMA2` (it pins older torch and "
                "transformers), or use the transformers captioning backend") from error
        self._mm_infer = mm_infer
        self.model, self.processor, self.tokenizer = model_init(model_path)
        self.name = f"videollama2:{model_path}"

    def describe(self, frames: list[np.ndarray], prompt: str, max_new_tokens: int | None = None) -> str:
        video = self.processor["video"](np.stack(frames))
        options = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        return self._mm_infer(video, prompt, model=self.model, tokenizer=self.tokenizer, do_sample=False,
                              modal="video", **options).strip()
