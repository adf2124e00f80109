"""Tiny models for the visual/semantic stages: the default models' real configuration files with only sizes changed.

Each builder starts from the copies of the default model's real files in ``tiny_models/real_configs/`` and changes
only size keys (``tiny_models.real_configs.with_sizes``): widths, depths, head counts, the vocabulary and the
token ids that follow from it, the image processor's pixel budget. Class, processor class, activations, norms,
chat template, generation settings and every other flag stay the real ones, and the files are written in the
layout of the hub repositories, so loading a tiny model runs the code path that loading the real one runs:

- ``build_tiny_captioner``: ``Qwen/Qwen2.5-VL-3B-Instruct`` (``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen2_5_VLProcessor`` with a ``Qwen2VLImageProcessor`` and a ``Qwen2Tokenizer``), 64 wide, 2 + 2 layers;
- ``build_tiny_sd_text_encoder``: SD 1.5's ``text_encoder/`` (``CLIPTextModel``, quick_gelu) and ``tokenizer/``
  (``CLIPTokenizer`` from ``vocab.json`` + ``merges.txt``, as in the hub repository), 32 wide;
- ``build_tiny_sd_vae``: SD 1.5's ``vae/`` (``AutoencoderKL``), 16-32 channels wide, one resnet per block.

The tokenizers are byte-level BPEs learned in milliseconds from a few caption sentences, laid out like the real
vocabularies (byte alphabet first, merges next, special tokens last) so that special-token handling is the real
one. The captioner and the text encoder are RANDOM: their outputs mean nothing. The VAE is trained for seconds on
the project's own synthetic images, so that latents decode back to frames. They let tests and the demo run
offline.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tiny_models.real_configs import load_real_json, renumber_added_tokens, with_sizes

QWEN_VL = "qwen2.5-vl-3b-instruct"  # tiny_models/real_configs/<name>
SD15 = "stable-diffusion-v1-5"

CAPTION_CORPUS = [
    "a woman wearing earrings is talking to the camera and turning her head",
    "a man with glasses nods while speaking, smiling and raising his eyebrows",
    "a person in a suit looks at the camera, wearing a hat, with short hair",
]

# The tiny Qwen2.5-VL. Text: 4 heads of 16 (the real model: 16 of 128), 2 key/value heads (grouped-query attention
# as in the real 16/2), multimodal RoPE sections 2/3/3 of the 8 rotary frequency pairs (the real 16/24/24 of 64).
CAPTIONER_TEXT_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [2, 3, 3]}}
# Vision tower: block 1 uses full attention, block 0 windowed attention (the real 32 blocks: 7, 15, 23, 31 full).
CAPTIONER_VISION_SIZES = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1]}
# Pixel budget: at most 112x112 per image (8x8 patches of 14 px, merged 2x2: 16 tokens), so a few frames cost
# ~100 tokens; the real budget (12845056 px) would let a 512 px frame through at full size (~330 tokens).
CAPTIONER_MAX_PIXELS = 112 * 112
DECODER_WEIGHT_STD = 0.3  # see _widen_decoder_weights
VOCAB_MULTIPLE = 128  # the real embedding has 151936 rows for 151665 tokens: padded up to a multiple of 128


def _bpe_merges(normalizer, pre_tokenizer, *, end_of_word_suffix: str = "") -> list[tuple[str, str]]:
    """BPE merges learned from the caption corpus: the most frequent adjacent pair first (ties: the smaller pair),
    until every word of the corpus is one token. Written out rather than ``tokenizers``' trainer, whose tie order
    varies between runs: two builds must hold the same vocabulary."""
    from collections import Counter

    words = Counter(piece for sentence in CAPTION_CORPUS
                    for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)))
    spelled = {word: [*word[:-1], word[-1] + end_of_word_suffix] for word in words}
    merges = []
    while True:
        pairs = Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in spelled.items():
            merged, index = [], 0
            while index < len(symbols):
                if tuple(symbols[index:index + 2]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            spelled[word] = merged


def _write_vocab(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` and ``merges.txt`` in the GPT-2 / CLIP / Qwen file format."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))


def _byte_alphabet() -> list[str]:
    """The 256 byte symbols in GPT-2's order (ids 0-255 of the real Qwen2 and CLIP vocabularies)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def build_tiny_captioner(out: Path) -> None:
    """``Qwen2_5_VLForConditionalGeneration`` and its processor files, as in the ``Qwen/Qwen2.5-VL-3B-Instruct`` repo.

    Writes ``config.json`` (the real one, sizes and token ids changed), ``generation_config.json`` (real, token
    ids changed), ``preprocessor_config.json`` (real, ``max_pixels`` changed), ``tokenizer_config.json`` (real,
    with its chat template; the added tokens renumbered after the tiny vocabulary), ``chat_template.json`` (real),
    ``vocab.json`` + ``merges.txt`` + ``tokenizer.json`` (tiny byte-level BPE, Qwen2's pre-tokenizer) and the
    random weights. About a second on a CPU.
    """
    import torch
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    out = Path(out)
    # Vocabulary: Qwen2's own normaliser and pre-tokeniser (the ones Qwen2Tokenizer builds), real layout: bytes,
    # merges, then the 22 added tokens (<|endoftext|>, <|im_start|>, ..., <|vision_start|>, <|image_pad|>, ...).
    merges = _bpe_merges(normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    vocab = {symbol: index for index, symbol in enumerate(_byte_alphabet())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    _write_vocab(out, vocab, merges)
    _write_json(out / "tokenizer_config.json",
                renumber_added_tokens(load_real_json(QWEN_VL, "tokenizer_config.json"), first_id=len(vocab)))
    _write_json(out / "chat_template.json", load_real_json(QWEN_VL, "chat_template.json"))
    tokenizer = AutoTokenizer.from_pretrained(out)  # Qwen2Tokenizer, built by its own code from these files
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))  # the hub repository ships one too
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (
        "<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
        "<|video_pad|>")}
    if tokenizer.unk_token_id in ids.values() or len(set(ids.values())) != len(ids):
        raise RuntimeError(f"tiny Qwen tokenizer lost a special token: {ids}")

    sizes = {**CAPTIONER_TEXT_SIZES, "vision_config": CAPTIONER_VISION_SIZES,
             "vocab_size": -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
             "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
             "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
             "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
             "video_token_id": ids["<|video_pad|>"]}
    config = with_sizes(load_real_json(QWEN_VL), sizes)
    config["torch_dtype"] = "float32"  # what the tiny weights are stored in (a bookkeeping key, ignored in checks)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(config)))  # it edits nested dicts
    _widen_decoder_weights(model)
    model.save_pretrained(out)
    # The files as the hub has them (save_pretrained wrote transformers' current layout, and a generation config
    # derived from config.json instead of the model's own).
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", with_sizes(load_real_json(QWEN_VL, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    _write_json(out / "preprocessor_config.json",
                with_sizes(load_real_json(QWEN_VL, "preprocessor_config.json"), {"max_pixels": CAPTIONER_MAX_PIXELS}))


def _widen_decoder_weights(model, std: float = DECODER_WEIGHT_STD) -> None:
    """Redraw the text decoder's linear weights with a larger spread (weights only: the config is untouched).

    Drawn at the config's ``initializer_range`` (0.02), a tiny random model with tied embeddings echoes the last
    prompt token ("\\n") whatever the frames are, since the residual stream is that token's embedding. At 0.3
    the layers dominate, so the (meaningless) text depends on the frames and tests can see the images reach it.
    """
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".language_model.layers." in f".{name}":
                module.weight.normal_(0.0, std)


def build_tiny_sd_text_encoder(out: Path, hidden_size: int = 32) -> None:
    """``tokenizer/`` (CLIPTokenizer) and ``text_encoder/`` (CLIPTextModel), as in the SD 1.5 repository.

    ``tokenizer/`` holds the real ``tokenizer_config.json`` and ``special_tokens_map.json`` with a tiny
    ``vocab.json`` + ``merges.txt`` in CLIP's layout (256 bytes, the same with ``</w>``, merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids, as 49406 and 49407 are in the real one).
    ``text_encoder/config.json`` is the real one with width, depth, heads and vocabulary changed; its token ids
    (bos 0, eos 2, pad 1) stay the real ones, which keeps CLIP's legacy end-of-text lookup (the highest token id,
    i.e. ``<|endoftext|>``) that SD 1.5's encoder uses.
    """
    import torch
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    # CLIPTokenizer's own normaliser and pre-tokeniser (what it builds from vocab.json + merges.txt)
    merges = _bpe_merges(
        normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]),
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                       r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        end_of_word_suffix="</w>")
    alphabet = _byte_alphabet()
    vocab = {symbol: index for index, symbol in enumerate(alphabet + [symbol + "</w>" for symbol in alphabet])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    _write_vocab(out / "tokenizer", vocab, merges)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        _write_json(out / "tokenizer" / name, load_real_json(SD15, f"tokenizer/{name}"))
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")  # fail at build time, not at use
    if tokenizer.eos_token_id != max(vocab.values()):
        raise RuntimeError(f"tiny CLIP vocabulary: <|endoftext|> must be the highest id, got {tokenizer.eos_token_id}")

    config = with_sizes(load_real_json(SD15, "text_encoder/config.json"), {
        "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": 2,
        "num_attention_heads": 2, "vocab_size": len(vocab)})
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig.from_dict(config)).save_pretrained(out / "text_encoder")
    _write_json(out / "text_encoder" / "config.json", config)  # the hub file, not transformers' current layout


# The tiny VAE: SD's AutoencoderKL layout (four down blocks = 8x, 4 latent channels, mid-block attention), narrow.
VAE_CHANNELS = (16, 32, 32, 32)
VAE_NORM_GROUPS = 4  # at least 3 channels per group: a colour channel and its two constants (see _box_filter_init)
VAE_LAYERS_PER_BLOCK = 1
VAE_TRAIN_STEPS, VAE_CROP, VAE_BATCH, VAE_LR = 300, 64, 8, 1e-4
_LATENT_GAIN = 5.0  # raw latent = 5 x mean colour, so scaled latents (x 0.18215) have about unit scale, as in SD
_CONSTANT = 20.0  # the constant channels that carry colour through GroupNorm
_SILU_LINEAR_AT = 10.0  # SiLU(x) ~ x within 0.1% around here


def tiny_vae_config() -> dict[str, Any]:
    """SD 1.5's real ``vae/config.json`` with the tiny widths, depth and norm groups."""
    return with_sizes(load_real_json(SD15, "vae/config.json"), {
        "block_out_channels": list(VAE_CHANNELS), "layers_per_block": VAE_LAYERS_PER_BLOCK,
        "norm_num_groups": VAE_NORM_GROUPS})


def build_tiny_sd_vae(out: Path) -> None:
    """``vae/`` (AutoencoderKL from SD 1.5's real config, 16-32 channels wide) that actually reconstructs.

    Unlike the other tiny models it is trained, briefly: latents must decode back to frames close to the input
    for the tests to show that the latent cache is right. It starts as a box-filter autoencoder (latent = 5 x
    the 8x8 mean colour, decoded by three bilinear x2 upsamplings; see ``_box_filter_init``), then is fine-tuned
    for 300 steps (~30 s on 2 CPU cores, reproducible) on 64 px crops of scikit-image photos (astronaut,
    chelsea, coffee) and of frames rendered by ``tiny_models.scenes.render_frames`` (what
    ``make_talking_video`` encodes). On 512x512 frames of a generated talking video it reaches about 26 dB PSNR
    (random weights of the same config: about 11 dB). It has seen nothing but these synthetic images for seconds:
    its latents mean nothing beyond the tests. Run it in float32: in bfloat16 its large constant channels cost
    precision (about 22 dB). ``vae/config.json`` is written as the real file with the sizes changed (no
    ``scaling_factor`` key: diffusers' default 0.18215 applies, as for the real SD 1.5 VAE).
    """
    import torch
    from diffusers import AutoencoderKL

    out = Path(out)
    config = tiny_vae_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # with the fixed seeds: the same bytes on every build on a machine
    try:
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(config)
        _box_filter_init(vae)
        _fine_tune_vae(vae, _vae_training_images())
    finally:
        torch.set_num_threads(threads)
    vae.eval().save_pretrained(out / "vae")
    _write_json(out / "vae" / "config.json", config)  # the hub file (save_pretrained spells out every default)


def _vae_training_images() -> list:
    """uint8 RGB images: three scikit-image photos and frames of the generated talking-face scenes."""
    from skimage import data as skimage_data

    from tiny_models.scenes import render_frames

    images = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    for layout, variant in (("single", 0), ("pair", 1), ("single", 3)):
        images += list(render_frames(layout, 512, 512, 40, 25.0, variant))[::20]
    images += list(render_frames("none", 640, 360, 1, 25.0, 2))
    return images


def _fine_tune_vae(vae, images: list) -> None:
    """Adam on random crops, MSE on a posterior sample plus SD's tiny KL weight (1e-6)."""
    import numpy as np
    import torch

    rng, noise = np.random.default_rng(0), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=VAE_LR, total_steps=VAE_TRAIN_STEPS,
                                                   pct_start=0.1)
    vae.train()
    for _ in range(VAE_TRAIN_STEPS):
        crops = []
        for index in rng.integers(len(images), size=VAE_BATCH):
            image = images[index]
            y, x = (rng.integers(image.shape[axis] - VAE_CROP + 1) for axis in (0, 1))
            crops.append(image[y:y + VAE_CROP, x:x + VAE_CROP])
        pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=noise)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean() / pixels[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def _box_filter_init(vae) -> None:
    """Weights that make ``vae`` a box-filter autoencoder before any training (~25 dB on our frames).

    From random weights, 30 s of training reach only 14-20 dB: colour comes last, because every GroupNorm
    removes each image's mean and scale. So the network starts as a known linear map and training adds detail:
    * residual blocks are identities (``conv2`` and the attention output zeroed, the usual zero-init residual);
    * colours ride on three channels; each shares its norm group with two constant channels, +K and -K, whose
      spread sets the group's std (about K sqrt(2/g), nearly independent of the image); the group mean is
      cancelled by reading ``colour - (plus + minus) / 2`` after the norm, whose SiLU runs where it is linear;
    * encoder: stride-2 convs average 2x2, so latent channels 0-2 = 5 x the 8x8 mean colour, log-variance -10;
    * decoder: nearest x2 then a [1 2 1]/4 blur (= bilinear x2) on the colours; constants pass unchanged.
    Latent channel 3 keeps its random encoder weights and is unused by the decoder until training.
    """
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    def channels(width: int) -> tuple[list[int], list[int], list[int]]:
        group = width // VAE_NORM_GROUPS  # colour c, +K and -K are channels c*group, +1, +2: one group each
        return [0, group, 2 * group], [1, group + 1, 2 * group + 1], [2, group + 2, 2 * group + 2]

    def copy_1x1(conv, pairs) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for source, target in pairs:
            conv.weight[target, source, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = 1.0

    def colours_in(conv, gain: float) -> None:  # input channels 0-2 -> colour channels; constants from the bias
        colours, plus, minus = channels(conv.out_channels)
        conv.weight.zero_()
        conv.bias.zero_()
        for source, target in enumerate(colours):
            conv.weight[target, source, 1, 1] = gain
        conv.bias[plus], conv.bias[minus] = _CONSTANT, -_CONSTANT

    def colours_out(norm, conv, gain: float) -> None:  # GroupNorm -> SiLU -> conv, linear in the colours
        colours, plus, minus = channels(norm.num_channels)
        per_group = norm.num_channels // norm.num_groups
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.weight[colours + plus + minus] = _CONSTANT * (2 / per_group) ** 0.5  # undoes the group's std
        norm.bias[colours] = _SILU_LINEAR_AT
        norm.bias[plus], norm.bias[minus] = _SILU_LINEAR_AT - _CONSTANT, _SILU_LINEAR_AT + _CONSTANT
        for target, (colour, high, low) in enumerate(zip(colours, plus, minus, strict=True)):
            conv.weight[target] = 0.0
            conv.weight[target, colour, 1, 1] = gain
            conv.weight[target, high, 1, 1] = conv.weight[target, low, 1, 1] = -gain / 2
            conv.bias[target] = 0.0

    encoder, decoder = vae.encoder, vae.decoder
    blur = torch.tensor([1.0, 2.0, 1.0]) / 4
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.conv_shortcut is not None:
                    shortcut = module.conv_shortcut  # where the width changes: same roles, new positions
                    copy_1x1(shortcut, zip(sum(channels(shortcut.in_channels), []),
                                           sum(channels(shortcut.out_channels), []), strict=True))
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        colours_in(encoder.conv_in, 1.0)
        for block in encoder.down_blocks:
            for downsampler in block.downsamplers or []:
                conv = downsampler.conv  # pads right and bottom by one, then 3x3 stride 2: taps 0-1 = one 2x2
                conv.weight.zero_()
                conv.bias.zero_()
                for channel in range(conv.out_channels):
                    conv.weight[channel, channel, :2, :2] = 0.25
        colours_out(encoder.conv_norm_out, encoder.conv_out, _LATENT_GAIN)
        encoder.conv_out.weight[4:] = 0.0  # log-variance: a narrow posterior
        encoder.conv_out.bias[4:] = -10.0
        copy_1x1(vae.quant_conv, [(channel, channel) for channel in range(8)])
        copy_1x1(vae.post_quant_conv, [(channel, channel) for channel in range(4)])
        colours_in(decoder.conv_in, 1.0 / _LATENT_GAIN)
        for block in decoder.up_blocks:
            for upsampler in block.upsamplers or []:
                conv = upsampler.conv
                colours, plus, minus = channels(conv.out_channels)
                copy_1x1(conv, [(channel, channel) for channel in plus + minus])
                for channel in colours:
                    conv.weight[channel, channel] = blur[:, None] * blur[None, :]
        colours_out(decoder.conv_norm_out, decoder.conv_out, 1.0)
