"""Tiny RANDOM models for the visual/semantic stages, of the same classes as the real ones, built locally
and loaded back through the real loading code (``from_pretrained``): a LLaVA captioner and Stable Diffusion
1.5's CLIP text encoder layout. Their outputs mean nothing; they let tests and the demo run offline."""

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
