"""Tiny models for the visual/semantic stages, of the same classes as the real ones, built locally and loaded
back through the real loading code (``from_pretrained``): a LLaVA captioner and Stable Diffusion 1.5's CLIP text
encoder (RANDOM: their outputs mean nothing) and SD 1.5's VAE (trained for seconds on the project's own
synthetic images, so that latents decode back to frames). They let tests and the demo run offline."""

from __future__ import annotations

from pathlib import Path

CAPTION_CORPUS = [
    "a woman wearing earrings is talking to the camera and turning her head",
    "a man with glasses nods while speaking, smiling and raising his eyebrows",
    "a person in a suit looks at the camera, wearing a hat, with short hair",
]


def _byte_level_tokenizer(special_tokens: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CAPTION_CORPUS * 10, trainer)
    return tokenizer


def build_tiny_captioner(out: Path) -> None:
    """LlavaForConditionalGeneration (CLIP vision tower + Llama text model) with its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"]),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(out)


def build_tiny_sd_text_encoder(out: Path, hidden_size: int = 32) -> None:
    """``tokenizer/`` (CLIPTokenizer) and ``text_encoder/`` (CLIPTextModel), as in an SD 1.5 folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder(suffix="</w>")
    bpe.train_from_iterator(CAPTION_CORPUS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                                      end_of_word_suffix="</w>"))
    start, end = bpe.token_to_id(specials[0]), bpe.token_to_id(specials[1])
    bpe.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A {specials[1]}",
                                                       special_tokens=[(specials[0], start), (specials[1], end)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1],
                                      unk_token=specials[1], pad_token=specials[1], model_max_length=77)
    wrapped.save_pretrained(out / "tokenizer")
    CLIPTokenizer.from_pretrained(out / "tokenizer")  # fail at build time, not at use, if it does not load
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=start, eos_token_id=end, pad_token_id=end)
    CLIPTextModel(config).save_pretrained(out / "text_encoder")


# The tiny VAE: SD's AutoencoderKL layout (four down blocks = 8x, 4 latent channels, mid-block attention), narrow.
VAE_CHANNELS = (16, 32, 32, 32)
VAE_NORM_GROUPS = 4  # at least 3 channels per group: a colour channel and its two constants (see _box_filter_init)
VAE_TRAIN_STEPS, VAE_CROP, VAE_BATCH, VAE_LR = 300, 64, 8, 1e-4
_LATENT_GAIN = 5.0  # raw latent = 5 x mean colour, so scaled latents (x 0.18215) have about unit scale, as in SD
_CONSTANT = 20.0  # the constant channels that carry colour through GroupNorm
_SILU_LINEAR_AT = 10.0  # SiLU(x) ~ x within 0.1% around here


def build_tiny_sd_vae(out: Path) -> None:
    """``vae/`` (AutoencoderKL of the SD 1.5 layout, 16-32 channels wide) that actually reconstructs.

    Unlike the other tiny models it is trained, briefly: latents must decode back to frames close to the input
    for the tests to show that the latent cache is right. It starts as a box-filter autoencoder (latent = 5 x
    the 8x8 mean colour, decoded by three bilinear x2 upsamplings; see ``_box_filter_init``), then is fine-tuned
    for 300 steps (~30 s on 2 CPU cores, reproducible) on 64 px crops of scikit-image photos (astronaut,
    chelsea, coffee) and of frames rendered by ``synchrorama.sample_data.render_frames`` (what
    ``make_talking_video`` encodes). On 512x512 frames of a generated talking video it reaches about 26 dB PSNR
    (random weights of the same config: about 11 dB). It has seen nothing but these synthetic images for seconds:
    its latents mean nothing beyond the tests. Run it in float32: in bfloat16 its large constant channels cost
    precision (about 22 dB).
    """
    import torch
    from diffusers import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # with the fixed seeds: the same bytes on every build on a machine
    try:
        torch.manual_seed(0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=VAE_CHANNELS, layers_per_block=1, latent_channels=4,
                            norm_num_groups=VAE_NORM_GROUPS, sample_size=512, scaling_factor=0.18215)
        _box_filter_init(vae)
        _fine_tune_vae(vae, _vae_training_images())
    finally:
        torch.set_num_threads(threads)
    vae.eval().save_pretrained(out / "vae")


def _vae_training_images() -> list:
    """uint8 RGB images: three scikit-image photos and frames of the generated talking-face scenes."""
    from skimage import data as skimage_data

    from synchrorama.sample_data import render_frames

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
