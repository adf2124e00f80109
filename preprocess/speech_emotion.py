"""Stage: speech emotion recognition on the vocals track (E_ser of the paper's eq. 1).

Model: any transformers audio-classification model (default ``superb/hubert-large-superb-er``: classes neu, hap,
ang, sad). The whole clip (at most ``max_clip_s``, 20 s) is classified in one pass, after the checkpoint's
feature extractor (normalisation). Probabilities are the softmax of the logits, in the model's label order;
the embedding is the last hidden state mean-pooled over time (1024 floats for HuBERT large), which is what the
classification head pools too.

A clip without speech gets a row with ``status = "no_speech"`` and no numbers.

Writes ``emotion_ser.npy``: float32 ``(C + D,)``, the C class probabilities in label order then the embedding
(zeros when not valid); ``write_outputs`` splits it into ``speech_probs`` and ``speech_embedding``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio_io import read_mono
from preprocess.stage_models import LoadedModel

SPEECH_EMOTION_FILE = "emotion_ser.npy"


@dataclass(frozen=True)
class SpeechEmotion:
    status: str  # ok / no_speech
    labels: tuple[str, ...]  # the model's classes, in its output order
    probabilities: tuple[float, ...] | None
    top_class: str | None
    embedding_dim: int
    file: str
    model: str


def model_labels(loaded: LoadedModel) -> tuple[str, ...]:
    id2label = loaded.model.config.id2label
    return tuple(str(id2label[index]) for index in sorted(id2label, key=int))


def classify_speech(vocals_path: Path, has_speech: bool, loaded: LoadedModel, out_dir: Path) -> SpeechEmotion:
    labels = model_labels(loaded)
    dim = loaded.model.config.hidden_size
    if not has_speech:
        np.save(out_dir / SPEECH_EMOTION_FILE, np.zeros(len(labels) + dim, np.float32))
        return SpeechEmotion("no_speech", labels, None, None, dim, SPEECH_EMOTION_FILE, loaded.reference)
    audio, sample_rate = read_mono(vocals_path)
    inputs = loaded.processor(audio, sampling_rate=sample_rate, return_tensors="pt")
    values = inputs["input_values"].to(loaded.device, loaded.dtype)
    with torch.inference_mode():
        output = loaded.model(values, output_hidden_states=True)
    probs = torch.softmax(output.logits.float(), dim=-1)[0].cpu().numpy()
    embedding = output.hidden_states[-1][0].float().mean(0).cpu().numpy()
    np.save(out_dir / SPEECH_EMOTION_FILE, np.concatenate([probs, embedding]).astype(np.float32))
    probabilities = tuple(float(p) for p in probs)
    return SpeechEmotion("ok", labels, probabilities, labels[int(np.argmax(probs))], dim, SPEECH_EMOTION_FILE,
                         loaded.reference)
