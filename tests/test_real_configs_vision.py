"""The visual stages' tiny models are the default models made smaller: built from copies of the real configuration
files (``tiny_models/real_configs/``) with only size keys changed, of the same model and processor classes; and the
default captioner's processor builds on this CPU install (no torchvision)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tiny_models import vision as tiny_vision_models
from tiny_models.real_configs import (
    SIZE_KEYS,
    added_tokens_in_order,
    load_real_json,
    real_config_dir,
    size_only_differences,
)
from tiny_models.vision import QWEN_VL, SD15

QWEN_REAL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json",
                   "chat_template.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The captioner and the SD 1.5 text encoder, as ``tiny_models`` builds them (about a second)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_vision_models.build_tiny_captioner(root / "captioner")
    tiny_vision_models.build_tiny_sd_text_encoder(root / "sd15")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """The tiny VAE's folder as its builder writes it, minus the 30 s of training (which changes no file but the
    weights; tests/test_latents.py checks the trained one)."""
    root = tmp_path_factory.mktemp("vae")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_vision_models, "_vae_training_images", lambda: [])
        patch.setattr(tiny_vision_models, "_fine_tune_vae", lambda vae, images: None)
        tiny_vision_models.build_tiny_sd_vae(root)
    return root


def _read(path) -> dict:
    return json.loads(path.read_text())


def _changed_keys(real, tiny, path="") -> set[str]:
    """The (leaf) key names whose values differ: what a tiny model actually changed."""
    if isinstance(real, dict) and isinstance(tiny, dict):
        return set().union(*(_changed_keys(real.get(key), tiny.get(key), key) for key in set(real) | set(tiny)))
    return {path} if json.dumps(real) != json.dumps(tiny) else set()


def _loaded(config: dict) -> dict:
    """A transformers config as loaded, with ``layer_types`` (one entry per layer) reduced to the kinds it holds."""
    text = config.get("text_config", config)
    if "layer_types" in text:
        text["layer_types"] = sorted(set(text["layer_types"]))
    return config


# --- the default captioner: Qwen/Qwen2.5-VL-3B-Instruct -------------------------------------------------------------

def test_the_default_profile_captions_with_the_model_whose_files_are_kept():
    from preprocess.run.settings import load_settings

    assert load_settings("default").models.captioning.model.lower().endswith(QWEN_VL)
    assert load_real_json(QWEN_VL)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert load_real_json(QWEN_VL, "preprocessor_config.json")["processor_class"] == "Qwen2_5_VLProcessor"


def test_the_kept_real_files_describe_the_published_models():
    """Full-size models built on the meta device (no memory) from the kept files have the published parameter
    counts (Qwen2.5-VL-3B-Instruct 3.75 B, SD 1.5's CLIP ViT-L/14 text encoder 123 M, its VAE 83.7 M): a wrong
    width or depth in a copied file would show here."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoModelForImageTextToText, CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig

    with torch.device("meta"):
        captioner = AutoModelForImageTextToText.from_config(Qwen2_5_VLConfig(**load_real_json(QWEN_VL)))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(load_real_json(SD15, "text_encoder/config.json")))
        vae = AutoencoderKL.from_config(load_real_json(SD15, "vae/config.json"))
    count = {name: sum(parameter.numel() for parameter in model.parameters())
             for name, model in (("captioner", captioner), ("text_encoder", text_encoder), ("vae", vae))}
    assert type(captioner).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert count == {"captioner": 3_754_622_976, "text_encoder": 123_060_480, "vae": 83_653_863}


def test_tiny_captioner_files_differ_from_the_real_ones_only_in_sizes(tiny):
    folder = tiny / "captioner"
    for name in QWEN_REAL_FILES:
        real, small = load_real_json(QWEN_VL, name), _read(folder / name)
        if name == "tokenizer_config.json":  # the added tokens' ids follow the (smaller) vocabulary
            real, small = added_tokens_in_order(real), added_tokens_in_order(small)
        assert size_only_differences(real, small) == [], name
    # ... and they do change what makes it tiny (so the check above is not vacuous)
    changed = _changed_keys(load_real_json(QWEN_VL), _read(folder / "config.json"))
    assert {"hidden_size", "num_hidden_layers", "depth", "vocab_size", "image_token_id", "mrope_section"} <= changed
    assert changed - {"torch_dtype"} <= SIZE_KEYS
    assert _read(folder / "preprocessor_config.json")["max_pixels"] == tiny_vision_models.CAPTIONER_MAX_PIXELS


def test_tiny_captioner_loads_as_the_real_config_does(tiny):
    """What transformers makes of the files (its current layout, defaults filled in) differs only in sizes too."""
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLConfig

    real = _loaded(Qwen2_5_VLConfig(**load_real_json(QWEN_VL)).to_dict())
    small = _loaded(AutoConfig.from_pretrained(tiny / "captioner").to_dict())
    assert size_only_differences(real, small) == []
    assert small["text_config"]["hidden_act"] == "silu" and small["tie_word_embeddings"] is True
    real_generation = GenerationConfig.from_dict(load_real_json(QWEN_VL, "generation_config.json")).to_dict()
    small_generation = GenerationConfig.from_pretrained(tiny / "captioner").to_dict()
    assert size_only_differences(real_generation, small_generation) == []
    assert small_generation["repetition_penalty"] == 1.05  # applies to greedy decoding too


def test_tiny_tokenizer_keeps_qwens_special_tokens_and_chat_template(tiny):
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "captioner")
    assert type(tokenizer) is Qwen2Tokenizer
    config = _read(tiny / "captioner" / "tokenizer_config.json")
    first = min(map(int, config["added_tokens_decoder"]))
    assert first == len(_read(tiny / "captioner" / "vocab.json"))  # added tokens right after the vocabulary
    for offset, token in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        assert tokenizer.convert_tokens_to_ids(token) == first + offset
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    # special tokens stay whole, text is byte-level BPE: nothing is unknown, everything decodes back
    text = "<|im_start|>user\nA woman wearing earrings, turning her head! 123 é<|im_end|>"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    assert config["chat_template"] == load_real_json(QWEN_VL, "tokenizer_config.json")["chat_template"]


def test_the_default_captioners_processor_builds_here_from_the_real_files(tiny, tmp_path):
    """The real config.json, preprocessor_config.json and chat template (tokenizer: the tiny vocabulary) give the
    default processor class on this CPU install, where AutoProcessor cannot build it for want of torchvision."""
    from transformers import AutoProcessor, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    from preprocess.visual.describe import load_captioning_processor

    for name in ("config.json", "preprocessor_config.json", "chat_template.json"):
        shutil.copy(real_config_dir(QWEN_VL) / name, tmp_path / name)
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(tiny / "captioner" / name, tmp_path / name)
    if not is_torchvision_available():  # the failure this works around: every clip was rejected with it
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            AutoProcessor.from_pretrained(tmp_path)
    processor = load_captioning_processor(str(tmp_path))
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(processor.image_processor).__name__ == (
        "Qwen2VLImageProcessor" if is_torchvision_available() else "Qwen2VLImageProcessorPil")
    image_processor = processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    assert image_processor.size["longest_edge"] == 12845056 and image_processor.size["shortest_edge"] == 3136
    assert list(image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    # two 336 px frames as images, as describe() sends them: 24x24 patches each, merged 2x2 into 144 tokens
    messages = [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2 and text.endswith("<|im_start|>assistant\n")
    frames = [np.full((336, 336, 3), 40 * index, np.uint8) for index in range(2)]
    inputs = processor(images=frames, text=text, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24], [1, 24, 24]]
    assert inputs["pixel_values"].shape == (2 * 24 * 24, 3 * 2 * 14 * 14)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2 * 144


def test_the_tiny_captioner_is_the_default_class_and_describes(tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from preprocess.run.settings import DEFAULT_CAPTION_PROMPT as DEFAULT_PROMPT
    from preprocess.visual.describe import TransformersCaptioner

    captioner = TransformersCaptioner(str(tiny / "captioner"), max_new_tokens=8)
    assert type(captioner.model) is Qwen2_5_VLForConditionalGeneration
    assert isinstance(captioner.processor, Qwen2_5_VLProcessor)
    frames = [np.full((112, 112, 3), (200, 120, 80), np.uint8), np.zeros((112, 112, 3), np.uint8)]
    text = captioner.describe(frames, DEFAULT_PROMPT)
    assert isinstance(text, str) and text  # random weights: some (meaningless) text


# --- Stable Diffusion 1.5: CLIP text encoder and tokenizer, VAE -----------------------------------------------------

def test_tiny_text_encoder_files_differ_from_the_real_ones_only_in_sizes(tiny):
    from transformers import CLIPTextConfig

    folder = tiny / "sd15"
    real = load_real_json(SD15, "text_encoder/config.json")
    small = _read(folder / "text_encoder" / "config.json")
    assert size_only_differences(real, small) == []
    assert {"hidden_size", "num_hidden_layers", "vocab_size"} <= _changed_keys(real, small) <= SIZE_KEYS
    assert small["hidden_act"] == "quick_gelu" and small["eos_token_id"] == 2  # CLIP's legacy end-of-text lookup
    loaded = CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict()
    assert size_only_differences(CLIPTextConfig.from_dict(real).to_dict(), loaded) == []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # unchanged: no size in them differs
        assert _read(folder / "tokenizer" / name) == load_real_json(SD15, f"tokenizer/{name}")


def test_tiny_sd15_folder_holds_the_classes_model_index_names(tiny):
    from transformers import CLIPTextModel, CLIPTokenizer

    index = load_real_json(SD15, "model_index.json")
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "sd15", subfolder="tokenizer")
    model = CLIPTextModel.from_pretrained(tiny / "sd15", subfolder="text_encoder")
    assert model.config.vocab_size == len(tokenizer)
    # CLIP's layout: <|endoftext|> is the highest id (the legacy pooling reads the argmax id), words end in </w>
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == tokenizer.pad_token_id
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    ids = tokenizer("A Woman  wearing earrings!").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<|startoftext|>", "a</w>", "woman</w>"]
    assert ids[-1] == tokenizer.eos_token_id


def test_tiny_vae_files_differ_from_the_real_ones_only_in_sizes(tiny_vae):
    from diffusers import AutoencoderKL

    real = load_real_json(SD15, "vae/config.json")
    small = _read(tiny_vae / "vae" / "config.json")
    assert size_only_differences(real, small) == []
    assert _changed_keys(real, small) == {"block_out_channels", "layers_per_block", "norm_num_groups"}
    vae = AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae")
    assert vae.config.scaling_factor == 0.18215  # diffusers' default, as for the real SD 1.5 VAE (no key in either)
    with_defaults = {key: value for key, value in AutoencoderKL.from_config(real).config.items() if key[0] != "_"}
    loaded = {key: value for key, value in vae.config.items() if key[0] != "_"}
    assert size_only_differences(with_defaults, loaded) == []
