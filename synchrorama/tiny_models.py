"""Tiny models of the very classes the pipeline loads, built offline (random, except the VAE).

``build_tiny_models(directory)`` writes, under ``directory``:

    htdemucs/model.pt            demucs HTDemucs (4 sources, vocals among them), {"class", "kwargs", "state_dict"}
    whisper/tiny-random.pt       openai-whisper checkpoint {"dims", "model_state_dict"} (multilingual vocabulary)
    text-emotion/                RobertaForSequenceClassification, 7 emotion labels, byte-level BPE tokenizer
    speech-emotion/              HubertForSequenceClassification, labels neu/hap/ang/sad, feature extractor
    valence-arousal/             preprocess.va_model.EmotionModel (Wav2Vec2 + regression head, 3 outputs)
    wav2vec2/                    Wav2Vec2Model, feature extractor
    captioner/                   LlavaForConditionalGeneration + LlavaProcessor (a transformers image-text model)
    sd15/                        a Stable Diffusion 1.5 folder layout: tokenizer/ + text_encoder/ (CLIPTextModel)
                                 and vae/ (AutoencoderKL, trained for seconds on the project's own images so that
                                 its latents decode back to the frames)
    README.txt                   says loudly that their outputs mean nothing

They exercise every code path (same classes, same loaders, same shapes apart from widths, the same 320-sample
frame stride of the wav2vec-style feature encoders) in seconds on a CPU, with no network. Their numbers mean
nothing. The weights come from fixed seeds, so two builds hold the same models.

    python -m synchrorama.tiny_models DIR
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

VERSION = 3  # bump when a tiny model changes: it is rebuilt, and the tiny profile's cache keys include it
README = f"""Tiny RANDOM models (synchrorama.tiny_models, version {VERSION}).
They have the classes and shapes of the real models but random weights: every number they produce
(transcripts, emotions, valence/arousal, wav2vec features, descriptions, text embeddings) MEANS NOTHING;
the tiny VAE only learned to reconstruct a few synthetic images. For tests and the offline demo only.
"""
TEXT_EMOTION_LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
SPEECH_EMOTION_LABELS = ("neu", "hap", "ang", "sad")  # superb/hubert-large-superb-er's labels
# The conv feature encoder of wav2vec 2.0 / HuBERT: 7 layers, total stride 320 (50 Hz at 16 kHz).
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

_build_lock = threading.Lock()


def _tiny_wav2vec_config_kwargs() -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16,) * 7, conv_kernel=CONV_KERNEL, conv_stride=CONV_STRIDE,
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)


def _feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=False)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _build_demucs(out: Path) -> None:
    import torch
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    # dconv_mode=0 drops the residual dilated-conv branches: 10x faster on a CPU, same class and code path
    kwargs = {"sources": ["drums", "bass", "other", "vocals"], "channels": 8, "depth": 4, "t_layers": 1,
              "t_heads": 2, "segment": 4, "samplerate": 44100, "audio_channels": 2, "dconv_mode": 0}
    model = HTDemucs(**kwargs)
    out.mkdir(parents=True)
    torch.save({"class": "HTDemucs", "kwargs": kwargs, "state_dict": model.state_dict()}, out / "model.pt")


def _build_whisper(out: Path) -> None:
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    # n_audio_ctx must stay 1500 (Whisper always pads to 30 s = 3000 mel frames); the vocabulary must stay the
    # multilingual one (51865) so that the bundled tokenizer and language detection work.
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=64, n_text_state=32, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    out.mkdir(parents=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, out / "tiny-random.pt")


def _build_roberta_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges (one token per byte): RoBERTa's scheme, built without training
    so that every build is identical."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", sep_token="</s>", cls_token="<s>", pad_token="<pad>",
                                   mask_token="<mask>", model_max_length=512)
    fast.save_pretrained(out)


def _build_text_emotion(out: Path) -> None:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    _build_roberta_tokenizer(out)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(out))
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, num_labels=len(TEXT_EMOTION_LABELS),
                           id2label=dict(enumerate(TEXT_EMOTION_LABELS)),
                           label2id={label: index for index, label in enumerate(TEXT_EMOTION_LABELS)})
    RobertaForSequenceClassification(config).save_pretrained(out)


def _build_speech_emotion(out: Path) -> None:
    import torch
    from transformers import HubertConfig, HubertForSequenceClassification

    torch.manual_seed(1)
    config = HubertConfig(**_tiny_wav2vec_config_kwargs(), classifier_proj_size=16,
                          num_labels=len(SPEECH_EMOTION_LABELS), id2label=dict(enumerate(SPEECH_EMOTION_LABELS)),
                          label2id={label: index for index, label in enumerate(SPEECH_EMOTION_LABELS)})
    HubertForSequenceClassification(config).save_pretrained(out)
    _feature_extractor().save_pretrained(out)


def _build_valence_arousal(out: Path) -> None:
    import torch
    from transformers import Wav2Vec2Config

    from preprocess.va_model import OUTPUTS, EmotionModel

    torch.manual_seed(2)
    config = Wav2Vec2Config(**_tiny_wav2vec_config_kwargs(), num_labels=3, id2label=dict(enumerate(OUTPUTS)),
                            label2id={label: index for index, label in enumerate(OUTPUTS)})
    EmotionModel(config).save_pretrained(out)
    _feature_extractor().save_pretrained(out)


def _build_wav2vec(out: Path) -> None:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(3)
    Wav2Vec2Model(Wav2Vec2Config(**_tiny_wav2vec_config_kwargs())).save_pretrained(out)
    _feature_extractor().save_pretrained(out)


def _build_captioner(out: Path) -> None:
    from synchrorama.tiny_vision_models import build_tiny_captioner

    build_tiny_captioner(out)


def _build_sd15(out: Path) -> None:
    from synchrorama.tiny_vision_models import build_tiny_sd_text_encoder, build_tiny_sd_vae

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
            ignore.write_text("# built by synchrorama.tiny_models\n*\n")
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
        print("usage: python -m synchrorama.tiny_models DIR", file=sys.stderr)
        return 2
    path = build_tiny_models(argv[0])
    print(f"tiny random models in {path} (their outputs mean nothing; for tests and the demo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
