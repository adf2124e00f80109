"""Stage: speech emotion recognition on the vocals track (E_ser of the paper's eq. 1).

Model: a transformers audio-classification model whose head is a ``classifier`` module reading one pooled vector
per clip (default ``superb/hubert-large-superb-er``, classes neu, hap, ang, sad). Its head follows SUPERB's
recipe (``HubertForSequenceClassification`` with ``use_weighted_layer_sum``): a softmax-weighted sum of the 25
hidden states (CNN projection + 24 transformer layers) -> ``projector`` (1024 -> 256) -> mean over the valid
frames -> ``classifier`` (256 -> 4).

Input: the whole clip (at most ``max_clip_s``, 20 s) in one pass, prepared by the checkpoint's own feature
extractor exactly as its ``preprocessor_config.json`` says: zero-mean unit-variance normalisation only when
``do_normalize`` (the SUPERB port says false; see docs/audio_features.md), and the attention mask, passed to the
model, when ``return_attention_mask`` (it says true).

Outputs: probabilities are the softmax of the logits, in the model's label order. The embedding is the vector the
classification head reads (the pooled projection, ``classifier_proj_size`` = 256 floats for the default model),
recorded by a forward pre-hook on ``model.classifier`` during that same forward pass, so that
``classifier(embedding)`` gives the logits.

A clip without speech gets a row with ``status = "no_speech"`` and no numbers.

Writes ``emotion_ser.npy``: float32 ``(C + D,)``, the C class probabilities in label order then the D-float
embedding (zeros when not valid); ``preprocess.run.outputs`` splits it into ``speech_probs`` and ``speech_embedding``.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.audio.audio_io import read_mono
from preprocess.audio.separate import vocals_path
from preprocess.run.model_loading import LoadedModel, load_model, model_identity
from preprocess.run.stage import Stage

SPEECH_EMOTION_FILE = "emotion_ser.npy"

_recorder_lock = threading.Lock()
_SLOT = "_synchrorama_head_input"  # attribute of the model holding its thread-local head-input slot


@dataclass(frozen=True)
class SpeechEmotion:
    status: str  # ok / no_speech
    labels: tuple[str, ...]  # the model's classes, in its output order
    probabilities: tuple[float, ...] | None
    top_class: str | None
    embedding_dim: int  # width of the classification head's input
    file: str
    model: str


def model_labels(loaded: LoadedModel) -> tuple[str, ...]:
    id2label = loaded.model.config.id2label
    return tuple(str(id2label[index]) for index in sorted(id2label, key=int))


def classification_head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"speech emotion model {type(model).__name__} has no `classifier` head module: the stage "
                         "stores the head's input as the embedding, so it needs a transformers "
                         "*ForSequenceClassification / *ForAudioClassification model")
    return head


def head_input_dim(model: torch.nn.Module) -> int:
    """Width of the vector the classification head reads (the input size of its first linear layer)."""
    for module in classification_head(model).modules():
        if isinstance(module, torch.nn.Linear):
            return module.in_features
    raise ValueError(f"the classifier of {type(model).__name__} has no linear layer to read its input width from")


def _head_input_slot(model: torch.nn.Module) -> threading.local:
    """A thread-local slot that each forward pass fills with the input of ``model.classifier``.

    The hook is registered once per model. The slot is thread-local because the stage threads of a worker share
    one model (``preprocess.run.model_loading`` caches it) and may run it at the same time: each thread reads its own forward's
    vector.
    """
    with _recorder_lock:
        slot = model.__dict__.get(_SLOT)
        if slot is None:
            slot = threading.local()

            def record(_module, args):
                slot.value = args[0]

            classification_head(model).register_forward_pre_hook(record)
            model.__dict__[_SLOT] = slot  # a plain attribute, not a submodule or buffer
    return slot


def classify_speech(vocals_path: Path, has_speech: bool, loaded: LoadedModel, out_dir: Path) -> SpeechEmotion:
    labels = model_labels(loaded)
    dim = head_input_dim(loaded.model)
    if not has_speech:
        np.save(out_dir / SPEECH_EMOTION_FILE, np.zeros(len(labels) + dim, np.float32))
        return SpeechEmotion("no_speech", labels, None, None, dim, SPEECH_EMOTION_FILE, loaded.reference)
    audio, sample_rate = read_mono(vocals_path)
    # The feature extractor applies do_normalize and builds the attention mask as its config says (and refuses
    # audio at another sampling rate).
    inputs = loaded.processor(audio, sampling_rate=sample_rate, return_tensors="pt")
    model_inputs = {"input_values": inputs["input_values"].to(loaded.device, loaded.dtype)}
    if "attention_mask" in inputs:
        model_inputs["attention_mask"] = inputs["attention_mask"].to(loaded.device)
    slot = _head_input_slot(loaded.model)
    slot.value = None
    with torch.inference_mode():
        output = loaded.model(**model_inputs)
    pooled = slot.value
    if pooled is None or tuple(pooled.shape) != (1, dim):
        raise RuntimeError(f"the classifier of {loaded.reference!r} was not run on one ({dim},) vector "
                           f"({None if pooled is None else tuple(pooled.shape)})")
    probs = torch.softmax(output.logits.float(), dim=-1)[0].cpu().numpy()
    embedding = pooled[0].float().cpu().numpy()
    np.save(out_dir / SPEECH_EMOTION_FILE, np.concatenate([probs, embedding]).astype(np.float32))
    probabilities = tuple(float(p) for p in probs)
    return SpeechEmotion("ok", labels, probabilities, labels[int(np.argmax(probs))], dim, SPEECH_EMOTION_FILE,
                         loaded.reference)


# ---------------------------------------------------------------- the stage: on each kept piece's vocals
# Not batched: its input is the whole clip, whose length is rarely shared, and a fixed batch shape for it would cost
# batch_size forward passes of a whole clip per piece.


STAGE = Stage(
    name="speech_emotion", version=2, group="audio", models=("speech_emotion",),
    key_parts=lambda piece, settings, workspace: [piece.features.get("separate", {}).get("key"),
                                                  model_identity(settings.models.speech_emotion)],
    run=lambda piece, settings, workspace, out_dir: asdict(classify_speech(
        vocals_path(piece), piece.features["separate"]["has_speech"],
        load_model("speech_emotion", settings.models.speech_emotion), out_dir)))
