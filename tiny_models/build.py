"""Tiny models of the very classes the pipeline loads, built offline (random, except the VAE).

The audio models are built from copies of the default models' real configuration files
(``tiny_models/real_configs/<name>/``, see ``tiny_models.real_configs``) with only size keys changed (widths,
depths, head counts, vocabulary): same class, same flags (weighted layer sum, layer-norm feature encoder,
feature-extractor normalisation and attention mask, label maps), and their processor files are the real ones,
copied verbatim. ``build_tiny_models(directory)`` writes, under ``directory``:

    htdemucs/                    a local Demucs model repo, as ``demucs.pretrained.get_model(name, repo=...)``
                                 reads it: htdemucs.yaml (the bag, like demucs' own) + one HTDemucs package
                                 tinyhtdemucs-<sha256[:8]>.th {"klass", "args", "kwargs", "state" (fp16)}
                                 (real: htdemucs / 955717e8)
    whisper/tiny-random.pt       openai-whisper checkpoint {"dims", "model_state_dict"} (real: small; multilingual
                                 vocabulary, 80 mel bins, 1500 audio positions)
    text-emotion/                RobertaForSequenceClassification, 7 emotion labels; RobertaTokenizer from a
                                 byte-level vocab.json (no merges) + the real tokenizer_config.json
                                 (real: j-hartmann/emotion-english-distilroberta-base)
    speech-emotion/              HubertForSequenceClassification with the weighted layer sum, labels
                                 neu/hap/ang/sad (real: superb/hubert-large-superb-er)
    valence-arousal/             preprocess.audio.va_model.EmotionModel, layer-norm wav2vec 2.0 + regression head
                                 (real: audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim)
    wav2vec2/                    a Wav2Vec2ForCTC checkpoint, which the stage loads as Wav2Vec2Model
                                 (real: facebook/wav2vec2-base-960h)
    captioner/                   Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor (the default captioner, smaller)
    sd15/                        a Stable Diffusion 1.5 folder layout: tokenizer/ + text_encoder/ (CLIPTextModel)
                                 and vae/ (AutoencoderKL, trained for seconds on the project's own images so that
                                 its latents decode back to the frames)
    syncnet/syncnet_v2_tiny.model  model.syncnet.SyncNetV2 of SyncNetV2Size.tiny() (64 x 64 crops), a state dict
                                 like the released syncnet_v2.model, its sizes in syncnet_v2_tiny.model.json
    README.txt                   says loudly that their outputs mean nothing

They exercise every code path (same classes, same loaders, same shapes apart from widths, the same 320-sample
frame stride of the wav2vec-style feature encoders) in seconds on a CPU, with no network. Their numbers mean
nothing. The weights come from fixed seeds, so two builds hold the same models.

    python -m tiny_models DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

from tiny_models.real_configs import load_real_json, real_config_dir, with_sizes

VERSION = 7  # bump when a tiny model changes: it is rebuilt, and the tiny profile's cache keys include it
README = f"""Tiny RANDOM models (tiny_models.build, version {VERSION}).
They have the classes, flags and processor files of the real default models (built from copies of their
configuration files with only sizes changed) but random weights: every number they produce
(transcripts, emotions, valence/arousal, wav2vec features, descriptions, text embeddings, AV sync) MEANS NOTHING;
the tiny VAE only learned to reconstruct a few synthetic images. For tests and the offline demo only.
"""
TEXT_EMOTION_LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
SPEECH_EMOTION_LABELS = ("neu", "hap", "ang", "sad")  # superb/hubert-large-superb-er's labels

# The real configuration files each audio model is built from (tiny_models/real_configs/<name>/).
REAL_DEMUCS = "htdemucs"
REAL_WHISPER = "whisper-small"
REAL_TEXT_EMOTION = "emotion-english-distilroberta-base"
REAL_SPEECH_EMOTION = "hubert-large-superb-er"
REAL_VALENCE_AROUSAL = "wav2vec2-large-robust-12-ft-emotion-msp-dim"
REAL_WAV2VEC = "wav2vec2-base-960h"

# The only keys the tiny wav2vec 2.0 / HuBERT encoders change (all size keys): everything else, the 7-layer
# convolutional feature encoder with its 320-sample stride included, is the real configuration.
TINY_SPEECH_ENCODER_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 64, "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16,
                             "num_conv_pos_embedding_groups": 4}
# The SER embedding is the classification head's input (classifier_proj_size wide): 32 here, as the tiny training
# model (model.config.tiny_config) expects.
TINY_SPEECH_EMOTION_SIZES = {**TINY_SPEECH_ENCODER_SIZES, "classifier_proj_size": 32}
TINY_VALENCE_AROUSAL_SIZES = {**TINY_SPEECH_ENCODER_SIZES, "classifier_proj_size": 32, "output_hidden_size": 32}
TINY_TEXT_EMOTION_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64}
# n_audio_ctx (1500: Whisper always pads to 30 s), n_mels and n_vocab (the multilingual tokenizer that ships with
# the package) stay real; n_text_ctx is shorter so that a random decoder stops after 32 tokens per window.
TINY_WHISPER_SIZES = {"n_audio_state": 32, "n_audio_head": 2, "n_audio_layer": 1, "n_text_state": 32,
                      "n_text_head": 2, "n_text_layer": 1, "n_text_ctx": 64}
# Channels 8 is the least the real dconv_comp (8) allows; the real dconv_mode (3: residual branches in encoder and
# decoder), segment (7.8 s), nfft and depth stay, so apply_model splits audio as it does for the real model.
TINY_DEMUCS_SIZES = {"channels": 8, "t_layers": 1, "t_heads": 2, "bottom_channels": 16}
TINY_DEMUCS_SIGNATURE = "tinyhtdemucs"  # the real bag names 955717e8

_build_lock = threading.Lock()


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _copy_real_files(name: str, out: Path, files: tuple[str, ...]) -> None:
    """The processor / tokenizer configuration files, verbatim: the tiny model is read exactly as the real one."""
    source = real_config_dir(name)
    for file in files:
        shutil.copyfile(source / file, out / file)


def decode_fractions(value):
    """Demucs' JSON encoding of init arguments (as in its Hugging Face export): ``{"_type": "fraction",
    "numerator": n, "denominator": d}`` is ``Fraction(n, d)`` (HTDemucs' ``segment``, in seconds)."""
    from fractions import Fraction

    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            return Fraction(value["numerator"], value["denominator"])
        return {key: decode_fractions(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_fractions(item) for item in value]
    return value


def real_demucs_package() -> tuple[str, dict]:
    """(class path, init kwargs) of the one model of the real ``htdemucs`` bag, from its real configuration."""
    import yaml

    bag = yaml.safe_load((real_config_dir(REAL_DEMUCS) / f"{REAL_DEMUCS}.yaml").read_text())
    (signature,) = bag["models"]
    package = load_real_json(REAL_DEMUCS, f"{signature}.json")
    return package["klass"], decode_fractions(package["kwargs"])


def _build_demucs(out: Path) -> None:
    """A local Demucs repo: the bag yaml and one HTDemucs package, in demucs' own release format (what
    ``tools/export.py`` writes: the class, its init kwargs and the fp16 state, file named ``<sig>-<sha256[:8]>.th``
    by ``demucs.states.save_with_checksum``), so that ``get_model`` loads, checks and bags it as it does the real
    model."""
    import torch
    import yaml
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state, save_with_checksum

    klass, real_kwargs = real_demucs_package()
    if klass != f"{HTDemucs.__module__}.{HTDemucs.__name__}":
        raise ValueError(f"the real htdemucs configuration names {klass}, not HTDemucs")
    torch.manual_seed(0)
    kwargs = with_sizes(real_kwargs, TINY_DEMUCS_SIZES)
    model = HTDemucs(**kwargs)
    out.mkdir(parents=True)
    package = {"klass": HTDemucs, "args": [], "kwargs": kwargs, "state": get_state(model, None, half=True)}
    save_with_checksum(package, out / f"{TINY_DEMUCS_SIGNATURE}.th")
    (out / f"{REAL_DEMUCS}.yaml").write_text(yaml.safe_dump({"models": [TINY_DEMUCS_SIGNATURE]}))


def _build_whisper(out: Path) -> None:
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(**with_sizes(load_real_json(REAL_WHISPER, "dims.json"), TINY_WHISPER_SIZES))
    model = Whisper(dims)
    # openai-whisper leaves the decoder's positional embedding as torch.empty (the real weights overwrite it): left
    # so, two builds held different bytes (and outputs), against "two builds hold the same models" above
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    out.mkdir(parents=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, out / "tiny-random.pt")


def _build_roberta_tokenizer(out: Path) -> None:
    """RoBERTa's byte-level BPE with a vocabulary of its specials and the 256 byte symbols and no merges (one token
    per byte, identical in every build), in the real model's file layout: vocab.json + merges.txt, read through
    the real tokenizer_config.json (RobertaTokenizer, add_prefix_space, trim_offsets, <mask> lstrip, 512)."""
    from tokenizers import pre_tokenizers

    # The real ids of the specials (<s> 0, <pad> 1, </s> 2, <unk> 3; <mask> is the last token, as in RoBERTa)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "<mask>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    _copy_real_files(REAL_TEXT_EMOTION, out, ("tokenizer_config.json", "special_tokens_map.json"))


def _build_text_emotion(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    _build_roberta_tokenizer(out)
    sizes = {**TINY_TEXT_EMOTION_SIZES, "vocab_size": len(AutoTokenizer.from_pretrained(out))}
    config = RobertaConfig.from_dict(with_sizes(load_real_json(REAL_TEXT_EMOTION), sizes))
    RobertaForSequenceClassification(config).save_pretrained(out)


def _build_speech_emotion(out: Path) -> None:
    import torch
    from transformers import HubertConfig, HubertForSequenceClassification

    torch.manual_seed(1)
    config = HubertConfig.from_dict(with_sizes(load_real_json(REAL_SPEECH_EMOTION), TINY_SPEECH_EMOTION_SIZES))
    HubertForSequenceClassification(config).save_pretrained(out)
    _copy_real_files(REAL_SPEECH_EMOTION, out, ("preprocessor_config.json",))


def _build_valence_arousal(out: Path) -> None:
    import torch
    from transformers import Wav2Vec2Config

    from preprocess.audio.va_model import EmotionModel

    torch.manual_seed(2)
    real = load_real_json(REAL_VALENCE_AROUSAL)
    model = EmotionModel(Wav2Vec2Config.from_dict(with_sizes(real, TINY_VALENCE_AROUSAL_SIZES)))
    model.save_pretrained(out)
    # save_pretrained writes the saving class (EmotionModel) as "architectures"; the real checkpoint names the class
    # audEERING trained with. Nothing reads it (the stage loads EmotionModel), so the tiny config keeps the real one.
    model.config.architectures = list(real["architectures"])
    model.config.save_pretrained(out)
    _copy_real_files(REAL_VALENCE_AROUSAL, out, ("preprocessor_config.json",))


def _build_wav2vec(out: Path) -> None:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(3)
    # The real checkpoint is a CTC model (encoder + lm_head) that the stage loads as a bare Wav2Vec2Model: the tiny
    # one is saved the same way, so the "wav2vec2." prefix handling and the dropped lm_head are exercised too.
    config = Wav2Vec2Config.from_dict(with_sizes(load_real_json(REAL_WAV2VEC), TINY_SPEECH_ENCODER_SIZES))
    Wav2Vec2ForCTC(config).save_pretrained(out)
    _copy_real_files(REAL_WAV2VEC, out, ("preprocessor_config.json",))


def _build_syncnet(out: Path) -> None:
    import torch

    from model.syncnet import SyncNetV2, SyncNetV2Size, save_sync_expert

    torch.manual_seed(4)
    save_sync_expert(SyncNetV2(**vars(SyncNetV2Size.tiny())).eval(), out / "syncnet_v2_tiny.model")


def _build_captioner(out: Path) -> None:
    from tiny_models.vision import build_tiny_captioner

    build_tiny_captioner(out)


def _build_sd15(out: Path) -> None:
    from tiny_models.vision import build_tiny_sd_text_encoder, build_tiny_sd_vae

    build_tiny_sd_text_encoder(out)
    build_tiny_sd_vae(out)


BUILDERS = {
    "htdemucs": _build_demucs,
    "whisper": _build_whisper,
    "text-emotion": _build_text_emotion,
    "speech-emotion": _build_speech_emotion,
    "valence-arousal": _build_valence_arousal,
    "wav2vec2": _build_wav2vec,
    "captioner": _build_captioner,
    "sd15": _build_sd15,
    "syncnet": _build_syncnet,
}


def is_built(directory: Path) -> bool:
    """Whether ``directory`` holds a complete build of this version."""
    try:
        return json.loads((Path(directory) / "manifest.json").read_text())["version"] == VERSION
    except (OSError, ValueError, KeyError):
        return False


def build_tiny_models(directory: str | Path) -> Path:
    """Build every tiny model into ``directory`` (atomically: in a temporary sibling, then renamed) and return it.

    Does nothing when ``directory`` already holds a complete build. Safe to call from several threads or
    processes at once: the first rename wins, the others discard their copy.
    """
    directory = Path(directory)
    with _build_lock:
        if is_built(directory):
            return directory
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _quiet()
        directory.parent.mkdir(parents=True, exist_ok=True)
        # A .gitignore one level up keeps the built weights out of git without touching the project's own.
        ignore = directory.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# built by tiny_models.build\n*\n")
        tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, build in BUILDERS.items():
                build(tmp / name)
            (tmp / "README.txt").write_text(README)
            (tmp / "manifest.json").write_text(json.dumps({"version": VERSION, "models": sorted(BUILDERS)}, indent=1))
            if directory.exists() and not is_built(directory):  # an older version: move it out of the way
                stale = directory.parent / f".stale-{directory.name}-{uuid.uuid4().hex[:8]}"
                os.rename(directory, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, directory)
            except OSError:
                if not is_built(directory):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m tiny_models DIR", file=sys.stderr)
        return 2
    path = build_tiny_models(argv[0])
    print(f"tiny random models in {path} (their outputs mean nothing; for tests and the demo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
