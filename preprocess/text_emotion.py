"""Stage: text sentiment of the transcript (E_t of the paper's eq. 1).

Model: a ``RobertaForSequenceClassification`` (default ``j-hartmann/emotion-english-distilroberta-base``) with
the 7 classes anger, disgust, fear, joy, neutral, sadness, surprise. The transcript (truncated to
``max_tokens`` tokens) is classified once; the probabilities are the softmax of the logits, and the embedding
is the final hidden state of the ``<s>`` token, which is what the classification head reads (768 floats for
the distilroberta model).

Only real text is scored: an empty transcript, a clip without speech, or (with ``english_only``) a transcript
in another language gets a row with its ``status`` and no numbers, and zeros with ``text_valid = 0`` in the
shard's ``emotion.npz``, never made-up probabilities.

Writes ``emotion_text.npy``: float32 ``(7 + D,)``, the probabilities in ``TEXT_EMOTION_CLASSES`` order then the
embedding (zeros when not valid); ``write_outputs`` splits it into ``text_probs`` and ``text_embedding``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.settings import TextEmotionSettings
from preprocess.stage_models import LoadedModel

TEXT_EMOTION_CLASSES = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
TEXT_EMOTION_FILE = "emotion_text.npy"


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


def score_transcript(text: str, language: str | None, transcript_status: str, loaded: LoadedModel,
                     settings: TextEmotionSettings, out_dir: Path) -> TextEmotion:
    model, tokenizer = loaded.model, loaded.processor
    order = class_order(model.config.id2label)
    dim = model.config.hidden_size
    if transcript_status == "no_speech":
        status = "no_speech"
    elif transcript_status != "ok" or not text.strip():
        status = "empty_transcript"
    elif settings.english_only and language != "en":
        status = "non_english"
    else:
        status = "ok"
    if status != "ok":
        np.save(out_dir / TEXT_EMOTION_FILE, np.zeros(len(order) + dim, np.float32))
        return TextEmotion(status, None, None, dim, TEXT_EMOTION_FILE, loaded.reference)
    inputs = tokenizer(text, truncation=True, max_length=settings.max_tokens, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        output = model(**inputs, output_hidden_states=True)
    probs = torch.softmax(output.logits.float(), dim=-1)[0, order].cpu().numpy()
    embedding = output.hidden_states[-1][0, 0].float().cpu().numpy()
    np.save(out_dir / TEXT_EMOTION_FILE, np.concatenate([probs, embedding]).astype(np.float32))
    probabilities = {name: float(p) for name, p in zip(TEXT_EMOTION_CLASSES, probs, strict=True)}
    return TextEmotion(status, probabilities, max(probabilities, key=probabilities.get), dim, TEXT_EMOTION_FILE,
                       loaded.reference)
