"""Stage: CLIP text-encoder embeddings of each clip's description, cached in the shard (paper 3.4).

Stable Diffusion 1.5's own text encoder (``CLIPTextModel`` in the ``text_encoder/`` folder, tokenizer in
``tokenizer/``): 77 tokens padded, the last hidden state (77, 768) as the cross-attention context, exactly
what the UNet sees, so the trainer never runs the text encoder. Stored as float16. Descriptions are encoded in
batches of ``models.text_encoder.batch_size`` across pieces (``preprocess.run.batching``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from preprocess.run.batching import run_fixed_shape_batches
from preprocess.run.model_loading import LoadedModel, load_model, model_identity, model_source, wrapped_loader
from preprocess.run.settings import ModelChoice
from preprocess.run.stage import Stage

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

    def encode(self, texts: list[str], batch_size: int = 1) -> np.ndarray:
        """(len(texts), 77, hidden) float16, in forward passes of exactly ``batch_size`` texts (a short batch
        filled with copies, ``preprocess.run.batching``), so a text's embedding does not depend on the others."""
        import torch

        def forward(batch: list[str]) -> np.ndarray:
            tokens = self.tokenizer(batch, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                    return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(input_ids=tokens.input_ids).last_hidden_state
            return hidden.float().cpu().numpy().astype(np.float16)

        # every text is padded to 77 tokens: one shape
        embeddings = run_fixed_shape_batches(texts, [MAX_TOKENS] * len(texts), batch_size, forward)
        return np.stack(embeddings) if embeddings else np.zeros((0, MAX_TOKENS, self.model.config.hidden_size),
                                                                 np.float16)


def load_text_encoder(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    source = model_source("text_encoder", choice)
    model = wrapped_loader("text_encoder", choice, lambda: DescriptionEncoder(source, revision=choice.revision, device=str(device)))
    model.name = choice.model
    return LoadedModel("text_encoder", choice.model, model, device, torch.float32)


# ---------------------------------------------------------------- the stage: on each kept piece's description, batched

CLIP_TEXT_FILE = "clip_text.npy"


def _text_embedding_many(pieces: list, settings, workspace, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.text_encoder
    encoder = load_model("text_encoder", choice, load_text_encoder)
    embeddings = encoder.model.encode([piece.features["describe"]["text"] for piece in pieces], choice.batch_size)
    for embedding, out_dir in zip(embeddings, out_dirs, strict=True):
        np.save(out_dir / CLIP_TEXT_FILE, embedding)
    return [{"file": CLIP_TEXT_FILE, "shape": list(embedding.shape), "model": choice.model}
            for embedding in embeddings]


STAGE = Stage(
    name="text_embedding", version=2, group="visual", models=("text_encoder",), loader=load_text_encoder,
    enabled=lambda settings: settings.visual.description.enabled, run_many=_text_embedding_many,
    applies=lambda piece, settings: piece.kept and "describe" in piece.features,
    key_parts=lambda piece, settings, workspace: [piece.features.get("describe", {}).get("key"),
                                                  model_identity(settings.models.text_encoder)],
    run=lambda piece, settings, workspace, out_dir: _text_embedding_many([piece], settings, workspace, [out_dir])[0])
