"""Copies of the default models' real configuration files, and the rule that makes a tiny model "the real one, smaller".

``tiny_models/real_configs/<name>/`` holds, for each default model, the small public files that decide its
class and code path (``config.json``, the preprocessor / feature-extractor / tokenizer configs, Demucs' and
Whisper's model arguments), written from the model cards and repositories. The tiny models
(``tiny_models``) are built from these files with only *size* keys changed, so the tests run the
code path that the ``default`` profile runs: same class, same processor class, same flags (weighted layer sum,
normalisation, sampling rate, label maps).

``size_only_differences(real, tiny)`` lists every key path where two configs differ in a key that is not a size
key: the tests assert it is empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REAL_CONFIGS_DIR = Path(__file__).resolve().parent / "real_configs"

# Keys that only set how big a model is (widths, depths, head counts, vocabulary and the token ids that follow from
# it, image/patch grid sizes). Anything else (class, activation, norm placement, weighted layer sum, feature
# extractor normalisation, sampling rate, labels) must match the real config exactly.
SIZE_KEYS = frozenset({
    # transformers text / audio / vision encoders
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "classifier_proj_size", "projection_dim", "conv_dim",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "tdnn_dim", "xvector_output_dim",
    "output_hidden_size", "head_dim", "max_window_layers", "max_source_positions", "max_target_positions",
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins", "sliding_window",
    # token ids follow from the (smaller) vocabulary
    "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "image_token_index", "decoder_start_token_id",
    # vision towers: depth, width, patch grid, which layers use full attention (indices depend on the depth)
    "depth", "embed_dim", "hidden_dim", "out_hidden_size", "num_heads", "fullatt_block_indexes", "window_size",
    "image_size", "patch_size", "temporal_patch_size", "spatial_merge_size", "mrope_section",
    # image processors: pixel budget of the (smaller) vision tower
    "min_pixels", "max_pixels", "shortest_edge", "longest_edge", "height", "width",
    # diffusers UNet / VAE widths and depths
    "block_out_channels", "layers_per_block", "norm_num_groups", "sample_size",
    # tokenizer length limit follows max_position_embeddings
    "model_max_length",
    # Demucs / Whisper model arguments
    "channels", "growth", "nfft", "t_layers", "t_heads", "t_hidden_scale", "bottom_channels",
    "n_audio_state", "n_audio_head", "n_audio_layer", "n_text_state", "n_text_head", "n_text_layer", "n_text_ctx",
})
# Keys of bookkeeping that differ between any two saves (library versions, the names the hub gave the folder).
IGNORED_KEYS = frozenset({"transformers_version", "_name_or_path", "_diffusers_version", "_commit_hash",
                          "torch_dtype", "dtype", "_class_name_hint"})


def real_config_dir(name: str) -> Path:
    path = REAL_CONFIGS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(f"no real configuration files for {name!r} in {REAL_CONFIGS_DIR}")
    return path


def load_real_json(name: str, file: str = "config.json") -> dict[str, Any]:
    """One of the real configuration files of model ``name``."""
    return json.loads((real_config_dir(name) / file).read_text())


def with_sizes(real: Mapping[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
    """``real`` with the size keys in ``sizes`` replaced (nested dicts merge); any other key raises."""
    result = dict(real)
    for key, value in sizes.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = with_sizes(result[key], value)
        elif key in SIZE_KEYS:
            result[key] = value
        else:
            raise KeyError(f"{key!r} is not a size key: a tiny model may only change sizes ({sorted(SIZE_KEYS)})")
    return result


def size_only_differences(real: Any, tiny: Any, *, path: str = "", allowed: Iterable[str] = SIZE_KEYS,
                          ignored: Iterable[str] = IGNORED_KEYS) -> list[str]:
    """Key paths where ``tiny`` differs from ``real`` other than in allowed size keys (empty: same model, smaller).

    Keys present in only one of them count as differences too (a flag the tiny model drops is a different code
    path), except ``ignored`` bookkeeping keys.
    """
    allowed, ignored = frozenset(allowed), frozenset(ignored)
    if isinstance(real, Mapping) and isinstance(tiny, Mapping):
        found = []
        for key in sorted(set(real) | set(tiny)):
            if key in ignored:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in real or key not in tiny:
                if key not in allowed:
                    found.append(f"{where} ({'only in tiny' if key not in real else 'missing in tiny'})")
                continue
            if key in allowed and not isinstance(real[key], Mapping):
                continue
            found += size_only_differences(real[key], tiny[key], path=where, allowed=allowed, ignored=ignored)
        return found
    if _normalised(real) != _normalised(tiny):
        return [f"{path}: real {real!r} != tiny {tiny!r}"]
    return []


def _normalised(value: Any) -> Any:
    """Tuples and lists compare equal (a config saved from Python keeps tuples; JSON has lists)."""
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _normalised(item) for key, item in value.items()}
    return value


def renumber_added_tokens(tokenizer_config: Mapping[str, Any], first_id: int) -> dict[str, Any]:
    """``tokenizer_config`` with its ``added_tokens_decoder`` renumbered from ``first_id`` on, in the real order.

    A tiny vocabulary ends earlier than the real one, so the added tokens (``<|endoftext|>``, ``<|im_start|>``,
    ...) that follow it get smaller ids: the same tokens, in the same order, with the same flags.
    """
    result = dict(tokenizer_config)
    decoder = sorted(tokenizer_config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
    result["added_tokens_decoder"] = {str(first_id + index): dict(token) for index, (_, token) in enumerate(decoder)}
    return result


def added_tokens_in_order(tokenizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """``tokenizer_config`` with ``added_tokens_decoder`` as a list in id order (ids dropped): what a tiny and a real
    tokenizer config must share, since the ids follow from the vocabulary size."""
    result = dict(tokenizer_config)
    decoder = tokenizer_config.get("added_tokens_decoder", {})
    result["added_tokens_decoder"] = [decoder[key] for key in sorted(decoder, key=int)]
    return result
