"""Stage: CLIP text-encoder embeddings of each clip's description, cached in the shard (paper 3.4).

Stable Diffusion 1.5's own text encoder (``CLIPTextModel`` in the ``text_encoder/`` folder, tokenizer in
``tokenizer/``): 77 tokens padded, the last hidden state (77, 768) as the cross-attention context, exactly
what the UNet sees, so the trainer never runs the text encoder. Stored as float16.
"""

from __future__ import annotations

import numpy as np

MAX_TOKENS = 77


class DescriptionEncoder:
    def __init__(self, model_path: str, *, revision: str | None = None, device: str = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", revision=revision)
            self.model = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", revision=revision)
            self.model.to(device).eval()
        except OSError as error:
            raise FileNotFoundError(
                f"CLIP text encoder not found under {model_path!r} (expected text_encoder/ and tokenizer/ "
                f"folders, as in a diffusers Stable Diffusion 1.5 checkpoint): download "
                f"stable-diffusion-v1-5/stable-diffusion-v1-5 on a connected machine, or use the tiny profile"
            ) from error
        self.device, self.name = device, str(model_path)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 77, hidden) float16."""
        import torch

        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=tokens.input_ids).last_hidden_state
        return hidden.float().cpu().numpy().astype(np.float16)
