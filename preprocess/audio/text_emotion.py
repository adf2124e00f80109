"""Stage: text sentiment of the transcript (E_t of the paper's eq. 1).

Model: a ``RobertaForSequenceClassification`` (default ``j-hartmann/emotion-english-distilroberta-base``) with
the 7 classes anger, disgust, fear, joy, neutral, sadness, surprise. The transcript (truncated to
``max_tokens`` tokens, padded to a multiple of ``TOKEN_BUCKET`` tokens with its attention mask) is classified
once, in a batch of ``models.text_emotion.batch_size`` rows with other transcripts of that padded length
(``preprocess.run.batching``: its numbers do not depend on the batch-mates). The probabilities are the softmax of
the logits, and the embedding is the final hidden state of the ``<s>`` token, which is what the classification
head reads (768 floats for the distilroberta model).

Only real text is scored: an empty transcript, a clip without speech, or (with ``english_only``) a transcript
in another language gets a row with its ``status`` and no numbers, and zeros with ``text_valid = 0`` in the
shard's ``emotion.npz``, never made-up probabilities.

Writes ``emotion_text.npy``: float32 ``(7 + D,)``, the probabilities in ``TEXT_EMOTION_CLASSES`` order then the
embedding (zeros when not valid); ``preprocess.run.outputs`` splits it into ``text_probs`` and ``text_embedding``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.run.batching import run_fixed_shape_batches
from preprocess.run.model_loading import LoadedModel, load_model, model_identity
from preprocess.run.settings import TextEmotionSettings
from preprocess.run.stage import Stage

TEXT_EMOTION_CLASSES = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
TEXT_EMOTION_FILE = "emotion_text.npy"
# Transcripts are padded to a multiple of this many tokens, so that different ones can share a batch shape.
TOKEN_BUCKET = 32


@dataclass(frozen=True)
class TextEmotion:
    status: str  # ok / no_speech / empty_transcript / non_english
    probabilities: dict[str, float] | None  # class -> probability, None unless ok
    top_class: str | None
    embedding_dim: int
    file: str
    model: str


def class_order(id2label: dict) -> list[int]:
    """Model output index of each of ``TEXT_EMOTION_CLASSES``; raises if the model has other classes."""
    labels = {str(label).lower(): int(index) for index, label in id2label.items()}
    if sorted(labels) != sorted(TEXT_EMOTION_CLASSES):
        raise ValueError(f"text emotion model labels {sorted(labels)} are not the 7 classes {TEXT_EMOTION_CLASSES}")
    return [labels[name] for name in TEXT_EMOTION_CLASSES]


def scoring_status(text: str, language: str | None, transcript_status: str,
                   settings: TextEmotionSettings) -> str:
    """``ok`` when the transcript is scored, else why not (see the module docstring)."""
    if transcript_status == "no_speech":
        return "no_speech"
    if transcript_status != "ok" or not text.strip():
        return "empty_transcript"
    if settings.english_only and language != "en":
        return "non_english"
    return "ok"


def score_transcript(text: str, language: str | None, transcript_status: str, loaded: LoadedModel,
                     settings: TextEmotionSettings, out_dir: Path, batch_size: int = 1) -> TextEmotion:
    """One transcript; the same numbers as in ``score_transcripts`` with the same ``batch_size``."""
    return score_transcripts([(text, language, transcript_status)], loaded, settings, [out_dir], batch_size)[0]


def score_transcripts(transcripts: Sequence[tuple[str, str | None, str]], loaded: LoadedModel,
                      settings: TextEmotionSettings, out_dirs: Sequence[Path], batch_size: int = 1,
                      ) -> list[TextEmotion]:
    """(text, language, transcription status) per item -> its ``TextEmotion``, its file written to its out_dir.

    Batched across items in fixed-shape batches (``preprocess.run.batching``): each transcript is padded (with its
    attention mask) to a multiple of ``TOKEN_BUCKET`` tokens and runs in a batch of exactly ``batch_size`` rows
    of that length, so its numbers do not depend on which other transcripts were scored with it."""
    model, tokenizer = loaded.model, loaded.processor
    order = class_order(model.config.id2label)
    dim = model.config.hidden_size
    statuses = [scoring_status(text, language, status, settings) for text, language, status in transcripts]
    scored = [index for index, status in enumerate(statuses) if status == "ok"]
    token_ids = [tokenizer(transcripts[index][0], truncation=True, max_length=settings.max_tokens)["input_ids"]
                 for index in scored]
    lengths = [min(math.ceil(len(ids) / TOKEN_BUCKET) * TOKEN_BUCKET, max(settings.max_tokens, len(ids)))
               for ids in token_ids]

    def forward(rows: list[tuple[list[int], int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        inputs = tokenizer.pad({"input_ids": [ids for ids, _ in rows]}, padding="max_length",
                               max_length=rows[0][1], return_tensors="pt").to(loaded.device)
        with torch.inference_mode():
            output = model(**inputs, output_hidden_states=True)
        probs = torch.softmax(output.logits.float(), dim=-1)[:, order].cpu().numpy()
        embeddings = output.hidden_states[-1][:, 0].float().cpu().numpy()
        return list(zip(probs, embeddings, strict=True))

    outputs = run_fixed_shape_batches(list(zip(token_ids, lengths, strict=True)), lengths, batch_size, forward)
    scores = dict(zip(scored, outputs, strict=True))
    results = []
    for index, (status, out_dir) in enumerate(zip(statuses, out_dirs, strict=True)):
        if status != "ok":
            np.save(out_dir / TEXT_EMOTION_FILE, np.zeros(len(order) + dim, np.float32))
            results.append(TextEmotion(status, None, None, dim, TEXT_EMOTION_FILE, loaded.reference))
            continue
        probs, embedding = scores[index]
        np.save(out_dir / TEXT_EMOTION_FILE, np.concatenate([probs, embedding]).astype(np.float32))
        probabilities = {name: float(p) for name, p in zip(TEXT_EMOTION_CLASSES, probs, strict=True)}
        results.append(TextEmotion(status, probabilities, max(probabilities, key=probabilities.get), dim,
                                   TEXT_EMOTION_FILE, loaded.reference))
    return results


# ---------------------------------------------------------------- the stage: on each kept piece's transcript, batched


def _text_emotion_many(pieces: list, settings, workspace, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.text_emotion
    transcripts = [(t["text"], t["language"], t["status"]) for t in (piece.features["transcribe"] for piece in pieces)]
    return [asdict(scored) for scored in score_transcripts(transcripts, load_model("text_emotion", choice),
                                                           settings.audio.text_emotion, out_dirs, choice.batch_size)]


STAGE = Stage(
    name="text_emotion", version=2, group="audio", models=("text_emotion",), run_many=_text_emotion_many,
    key_parts=lambda piece, settings, workspace: [
        piece.features.get("transcribe", {}).get("key"), settings.audio.text_emotion.fingerprint(),
        model_identity(settings.models.text_emotion)],
    run=lambda piece, settings, workspace, out_dir: _text_emotion_many([piece], settings, workspace, [out_dir])[0])
