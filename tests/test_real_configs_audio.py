"""The tiny audio models are the default models, smaller: built from copies of the real configuration files
(tiny_models/real_configs) with only size keys changed, loaded by the stages' own loaders as the default models
are (Demucs through get_model as a BagOfModels); the SER embedding is what its classification head reads; a
model revision is honoured or refused, never ignored."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from preprocess.audio.speech_emotion import SPEECH_EMOTION_FILE, classify_speech, head_input_dim, model_labels
from preprocess.pipeline import load_model
from preprocess.run.model_loading import TINY_DIR, LoadedModel, ModelNotFoundError
from preprocess.run.settings import ModelChoice, load_settings
from tiny_models.build import (
    REAL_DEMUCS,
    REAL_SPEECH_EMOTION,
    REAL_TEXT_EMOTION,
    REAL_VALENCE_AROUSAL,
    REAL_WAV2VEC,
    REAL_WHISPER,
    real_demucs_package,
)
from tiny_models.real_configs import IGNORED_KEYS, load_real_json, real_config_dir, size_only_differences

RATE = 16000
# stage kind -> (real configuration folder, class the stage's loader returns)
TRANSFORMERS_STAGES = {
    "text_emotion": (REAL_TEXT_EMOTION, "RobertaForSequenceClassification"),
    "speech_emotion": (REAL_SPEECH_EMOTION, "HubertForSequenceClassification"),
    # audEERING's head is not in transformers: the stage loads the model card's classes (preprocess.audio.va_model)
    "valence_arousal": (REAL_VALENCE_AROUSAL, "EmotionModel"),
    # the real checkpoint is a Wav2Vec2ForCTC; the stage reads its encoder as a Wav2Vec2Model
    "wav2vec": (REAL_WAV2VEC, "Wav2Vec2Model"),
}


@pytest.fixture(scope="module")
def tiny():
    return load_settings("tiny")


def _tiny_dir(tiny, kind: str) -> Path:
    return TINY_DIR / Path(getattr(tiny.models, kind).model).relative_to(".models/tiny")


def _saved_differences(real_dir: Path, tiny_dir: Path, file: str = "config.json") -> list[str]:
    """Non-size differences between the real file and the tiny model's saved one. Keys only the tiny file has are
    accepted when they hold what loading the real file gives too (transformers writes its defaults out)."""
    from transformers import AutoConfig

    real, saved = (json.loads((folder / file).read_text()) for folder in (real_dir, tiny_dir))
    real_loaded = AutoConfig.from_pretrained(real_dir).to_dict()
    defaults = {key for key in set(saved) - set(real) if key in real_loaded and real_loaded[key] == saved[key]}
    return size_only_differences(real, saved, ignored=IGNORED_KEYS | defaults)


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_STAGES))
def test_tiny_transformers_model_is_the_real_config_with_only_sizes_changed(tiny, kind):
    from transformers import AutoConfig

    real_name, loaded_class = TRANSFORMERS_STAGES[kind]
    loaded = load_model(kind, getattr(tiny.models, kind))  # builds the tiny models on first use
    folder, real_dir = _tiny_dir(tiny, kind), real_config_dir(real_name)
    assert _saved_differences(real_dir, folder) == []
    # what the model code reads: both files loaded as transformers loads them
    real_config = AutoConfig.from_pretrained(real_dir)
    assert size_only_differences(real_config.to_dict(), loaded.model.config.to_dict()) == []
    assert type(loaded.model).__name__ == loaded_class
    assert loaded.model.config.architectures == load_real_json(real_name)["architectures"]
    assert loaded.model.config.hidden_size < real_config.hidden_size  # it is the small one


def test_tiny_feature_extractors_are_the_real_ones(tiny):
    from transformers import AutoFeatureExtractor

    for kind in ("speech_emotion", "valence_arousal", "wav2vec"):
        real_name, _ = TRANSFORMERS_STAGES[kind]
        loaded = load_model(kind, getattr(tiny.models, kind))
        real = AutoFeatureExtractor.from_pretrained(real_config_dir(real_name))
        assert type(loaded.processor) is type(real)
        assert loaded.processor.to_dict() == real.to_dict()
    # the flags that decide what the models see: SUPERB's port normalises nothing and masks; audEERING's
    # normalises and masks; the base model normalises without a mask
    flags = {kind: (load_model(kind, getattr(tiny.models, kind)).processor.do_normalize,
                    load_model(kind, getattr(tiny.models, kind)).processor.return_attention_mask)
             for kind in ("speech_emotion", "valence_arousal", "wav2vec")}
    assert flags == {"speech_emotion": (False, True), "valence_arousal": (True, True), "wav2vec": (True, False)}


def test_tiny_tokenizer_has_the_real_class_and_flags(tiny):
    loaded = load_model("text_emotion", tiny.models.text_emotion)
    folder, real_dir = _tiny_dir(tiny, "text_emotion"), real_config_dir(REAL_TEXT_EMOTION)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((folder / file).read_text()) == json.loads((real_dir / file).read_text())
    real = json.loads((real_dir / "tokenizer_config.json").read_text())
    tokenizer = loaded.processor
    assert type(tokenizer).__name__ == real["tokenizer_class"]
    assert (tokenizer.add_prefix_space, tokenizer.trim_offsets, tokenizer.model_max_length) == (
        real["add_prefix_space"], real["trim_offsets"], real["model_max_length"])
    ids = tokenizer("Hi there")["input_ids"]
    assert ids[0] == loaded.model.config.bos_token_id == 0 and ids[-1] == loaded.model.config.eos_token_id == 2
    assert tokenizer.pad_token_id == loaded.model.config.pad_token_id == 1
    assert len(tokenizer) == loaded.model.config.vocab_size


def test_tiny_speech_emotion_model_has_superbs_weighted_layer_sum(tiny):
    model = load_model("speech_emotion", tiny.models.speech_emotion).model
    config = model.config
    assert config.use_weighted_layer_sum and model.layer_weights.shape == (config.num_hidden_layers + 1,)
    assert (config.feat_extract_norm, config.do_stable_layer_norm) == ("layer", True)
    assert model_labels(load_model("speech_emotion", tiny.models.speech_emotion)) == ("neu", "hap", "ang", "sad")
    assert head_input_dim(model) == config.classifier_proj_size


def test_wav2vec_encoder_weights_come_from_the_ctc_checkpoint(tiny):
    from safetensors.torch import load_file

    model = load_model("wav2vec", tiny.models.wav2vec).model
    saved = load_file(_tiny_dir(tiny, "wav2vec") / "model.safetensors")
    assert "lm_head.weight" in saved  # a CTC checkpoint, as facebook/wav2vec2-base-960h
    for name, tensor in model.state_dict().items():
        if f"wav2vec2.{name}" in saved:
            assert torch.equal(tensor.cpu(), saved[f"wav2vec2.{name}"]), name
    assert torch.equal(model.encoder.layers[0].attention.k_proj.weight.cpu(),
                       saved["wav2vec2.encoder.layers.0.attention.k_proj.weight"])


def test_tiny_whisper_is_small_with_only_sizes_changed(tiny):
    checkpoint = torch.load(TINY_DIR / "whisper" / "tiny-random.pt", map_location="cpu", weights_only=True)
    real = load_real_json(REAL_WHISPER, "dims.json")
    assert size_only_differences(real, checkpoint["dims"]) == []
    model = load_model("transcription", tiny.models.transcription).model
    assert (model.dims.n_mels, model.dims.n_audio_ctx, model.dims.n_vocab) == (80, 1500, 51865)
    assert model.is_multilingual


def test_tiny_demucs_loads_through_get_model_as_the_real_bag(tiny):
    from demucs.apply import BagOfModels, apply_model
    from demucs.htdemucs import HTDemucs
    from demucs.pretrained import get_model

    loaded = load_model("separation", tiny.models.separation)
    bag = loaded.model
    assert isinstance(bag, BagOfModels) and len(bag.models) == 1 and isinstance(bag.models[0], HTDemucs)
    klass, real_kwargs = real_demucs_package()
    assert klass == "demucs.htdemucs.HTDemucs"
    _, tiny_kwargs = bag.models[0]._init_args_kwargs
    assert size_only_differences(real_kwargs, tiny_kwargs) == []
    assert (bag.sources, bag.samplerate, bag.audio_channels) == (["drums", "bass", "other", "vocals"], 44100, 2)
    assert float(bag.models[0].segment) == 7.8 and bag.max_allowed_segment == 7.8
    # the bag file has the real one's structure (one model, no weights or segment override)
    real_bag = yaml.safe_load((real_config_dir(REAL_DEMUCS) / "htdemucs.yaml").read_text())
    tiny_bag = yaml.safe_load(Path(_tiny_dir(tiny, "separation")).read_text())
    assert set(tiny_bag) == set(real_bag) and len(tiny_bag["models"]) == len(real_bag["models"])
    # demucs' own loader reads the tiny repo folder (checksum in the file name checked) the same way
    again = get_model("htdemucs", repo=Path(_tiny_dir(tiny, "separation")).parent)
    assert isinstance(again, BagOfModels)
    mix = torch.randn(1, 2, 44100 * 2)
    with torch.inference_mode():
        separated = apply_model(bag, mix, shifts=0, split=True, overlap=0.25)
    assert separated.shape == (1, 4, 2, 44100 * 2)


def _local_demucs_repo(root: Path, package: dict) -> Path:
    from demucs.states import save_with_checksum

    root.mkdir()
    save_with_checksum(package, root / "mine.th")
    (root / "bag.yaml").write_text("models: ['mine']\n")
    return root / "bag.yaml"


def test_local_demucs_package_is_checked_before_demucs_unpickles_it(tmp_path):
    from demucs.htdemucs import HTDemucs

    kwargs = {"sources": ["drums", "bass", "other", "vocals"], "channels": 8, "depth": 4, "t_layers": 1,
              "t_heads": 2, "segment": 4, "samplerate": 44100, "audio_channels": 2}
    state = HTDemucs(**kwargs).state_dict()
    good = _local_demucs_repo(tmp_path / "good", {"klass": HTDemucs, "args": [], "kwargs": kwargs, "state": state})
    assert load_model("separation", ModelChoice(model=str(good))).model.sources[-1] == "vocals"
    # a package that references any other callable (here os.getcwd: it could as well be os.system) is refused
    # before demucs' torch.load(weights_only=False) could run it
    bad = _local_demucs_repo(tmp_path / "bad", {"klass": HTDemucs, "args": [], "kwargs": kwargs, "state": state,
                                                "extra": os.getcwd})
    with pytest.raises(ModelNotFoundError, match=r"mine-\w{8}\.th cannot be read safely"):
        load_model("separation", ModelChoice(model=str(bad)))
    with pytest.raises(ModelNotFoundError, match=r"not a Demucs bag \(\.yaml\) or model package.*bag\.yaml"):
        load_model("separation", ModelChoice(model=str(good.parent)))


def test_default_demucs_name_missing_gives_one_clear_error(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    # empty caches and no network: what a machine without the model sees (and no 80 MB download where there is one)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(ModelNotFoundError, match=r"'htdemucs' \(Demucs\) not found: .*adefossez/HTDemucs.*get_model"):
        load_model("separation", ModelChoice(model="htdemucs"))


def _speech(path: Path, seconds: float = 3.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(len(t))
    soundfile.write(path, audio.astype(np.float32), RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def ser(tiny):
    """The tiny SER model with uneven layer weights (a fresh copy, not the shared cached one): a stored vector that
    skipped the weighted sum, or weighted it wrongly, would then differ."""
    from transformers import AutoFeatureExtractor, HubertForSequenceClassification

    folder = _tiny_dir(tiny, "speech_emotion")
    load_model("speech_emotion", tiny.models.speech_emotion)  # built
    model = HubertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        model.layer_weights.copy_(torch.linspace(-1.0, 2.0, model.layer_weights.numel()))
    return LoadedModel("speech_emotion", "test-ser", model, torch.device("cpu"), torch.float32,
                       AutoFeatureExtractor.from_pretrained(folder))


def test_ser_embedding_is_the_vector_the_classifier_reads(ser, tmp_path):
    from preprocess.audio.audio_io import read_mono

    vocals = _speech(tmp_path / "vocals.wav")
    result = classify_speech(vocals, True, ser, tmp_path)
    stored = np.load(tmp_path / SPEECH_EMOTION_FILE)
    probs, embedding = stored[:len(result.labels)], stored[len(result.labels):]
    model = ser.model
    assert result.embedding_dim == embedding.shape[0] == model.config.classifier_proj_size
    with torch.no_grad():
        logits = model.classifier(torch.from_numpy(embedding))
    assert np.allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-6)
    # the same vector computed by hand from the hidden states: the feature extractor as configured (no
    # normalisation, an attention mask), softmax-weighted sum of all hidden states, projector, mean over time
    audio, _ = read_mono(vocals)
    inputs = ser.processor(audio, sampling_rate=RATE, return_tensors="pt")
    assert "attention_mask" in inputs and np.allclose(inputs["input_values"][0].numpy(), audio)
    with torch.no_grad():
        hidden = model.hubert(**inputs, output_hidden_states=True).hidden_states
        weights = torch.softmax(model.layer_weights, -1)
        summed = (torch.stack(hidden, 1) * weights.view(-1, 1, 1)).sum(1)
        expected = model.projector(summed).mean(1)[0]
        last_state_path = model.projector(hidden[-1]).mean(1)[0]
    assert np.allclose(embedding, expected.numpy(), rtol=1e-4, atol=1e-7)
    # the weighted sum matters: the last hidden state alone gives another vector (the tiny random layers are
    # near-identity residual blocks, so the difference is small in absolute terms but far above float error)
    assert np.abs(embedding - last_state_path.numpy()).max() > 100 * np.abs(embedding - expected.numpy()).max()
    assert np.abs(embedding - last_state_path.numpy()).max() > 1e-5


def test_ser_embedding_is_per_thread_when_threads_share_the_model(ser, tmp_path):
    files = [_speech(tmp_path / f"v{seed}.wav", 2.0 + seed / 2, seed) for seed in range(4)]
    outs = [tmp_path / f"alone{seed}" for seed in range(4)] + [tmp_path / f"threaded{seed}" for seed in range(4)]
    for out in outs:
        out.mkdir()
    for seed, file in enumerate(files):
        classify_speech(file, True, ser, outs[seed])
    threads = [threading.Thread(target=classify_speech, args=(file, True, ser, outs[4 + seed]))
               for seed, file in enumerate(files)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in range(4):
        assert np.allclose(np.load(outs[seed] / SPEECH_EMOTION_FILE), np.load(outs[4 + seed] / SPEECH_EMOTION_FILE),
                           atol=1e-6)


def _hub_cache_with_two_revisions(root: Path, source: Path) -> None:
    """A Hugging Face hub cache holding one SER repo at two commits: main (the tiny model) and tag v1 (the same
    weights with its classes renamed)."""
    repo = root / "models--synchrorama-test--ser"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        snapshot = repo / "snapshots" / commit
        shutil.copytree(source, snapshot)
        if ref == "v1":
            config = json.loads((snapshot / "config.json").read_text())
            config["id2label"] = {index: f"v1-{label}" for index, label in config["id2label"].items()}
            config["label2id"] = {label: int(index) for index, label in config["id2label"].items()}
            (snapshot / "config.json").write_text(json.dumps(config))


def test_revision_reaches_the_transformers_loaders(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    load_model("speech_emotion", tiny.models.speech_emotion)  # built
    _hub_cache_with_two_revisions(tmp_path, _tiny_dir(tiny, "speech_emotion"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    labels = {revision: model_labels(load_model("speech_emotion", ModelChoice(model="synchrorama-test/ser",
                                                                             revision=revision)))
              for revision in (None, "v1", "b" * 40)}
    assert labels[None] == ("neu", "hap", "ang", "sad")
    assert labels["v1"] == labels["b" * 40] == ("v1-neu", "v1-hap", "v1-ang", "v1-sad")
    with pytest.raises(ModelNotFoundError, match=r"revision v9\).*--revision v9"):
        load_model("speech_emotion", ModelChoice(model="synchrorama-test/ser", revision="v9"))


@pytest.mark.parametrize(("kind", "model", "why"), [
    ("separation", "htdemucs", "Demucs loads its models by name"),
    ("separation", ".models/tiny/htdemucs/htdemucs.yaml", "Demucs loads its models by name"),
    ("transcription", "small", "openai-whisper"),
    ("wav2vec", ".models/tiny/wav2vec2", "a local folder has no revisions"),
    ("vae", ".models/tiny/sd15", "a local folder has no revisions"),
    ("captioning", "videollama2:DAMO-NLP-SG/VideoLLaMA2-7B", "VideoLLaMA2 runs in its own environment"),
])
def test_revision_that_cannot_be_honoured_is_refused(kind, model, why):
    with pytest.raises(ValueError, match=rf"models\.{kind}\.revision is 'v1' but cannot be honoured.*{why}"):
        load_model(kind, ModelChoice(model=model, revision="v1"))
