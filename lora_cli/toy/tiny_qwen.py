"""Tiny Qwen-family text encoders and an offline Qwen tokenizer, for the tiny pipelines of bases that read an
LLM's hidden states (Z-Image: Qwen3; Qwen-Image, LongCat-Image: Qwen2.5-VL; FLUX.2 Klein: Qwen3)."""

from __future__ import annotations

from lora_cli.toy.tiny_pipeline import VOCAB_WORDS, _byte_level_alphabet

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# The part of Qwen3's chat template one user turn exercises: "<|im_start|>user\n{caption}<|im_end|>\n" and the
# assistant's opening, with an empty think block when thinking is switched off (as Qwen3's own template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def qwen_tokenizer(words: tuple[str, ...] = VOCAB_WORDS, max_length: int = 131072):
    """A real Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer) whose merges make each word of `words` and
    of the prompt templates the pipelines wrap captions in one token, as Qwen's vocabulary does (so Qwen-Image's
    system prefix is the 34 tokens its pipeline drops); other text falls back to byte tokens."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from lora_cli.models.qwen_image import PROMPT_TEMPLATE

    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    text = PROMPT_TEMPLATE.format(" ".join(words)) + " user assistant system " + " ".join(words)
    for special in QWEN_SPECIAL:
        text = text.replace(special, "\n")
    vocab = {char: index for index, char in enumerate(_byte_level_alphabet())}
    merges: list[tuple[str, str]] = []
    for piece in dict.fromkeys(piece for piece, _ in splitter.pre_tokenize_str(text)):
        joined = piece[0]
        for char in piece[1:]:
            if joined + char not in vocab:
                merges.append((joined, char))
                vocab[joined + char] = len(vocab)
            joined += char
    for special in QWEN_SPECIAL:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=max_length,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def qwen3_encoder(
    tokenizer, width: int = 32, layers: int = 3, heads: int = 2, kv_heads: int = 1, causal_lm: bool = False
):
    """A randomly initialised Qwen3Model, or Qwen3ForCausalLM (the class FLUX.2 klein's pipeline requires);
    seed it with torch.manual_seed."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=width // heads, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=causal_lm,
    )  # fmt: skip
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def qwen25_vl_encoder(tokenizer, width: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1):
    """A randomly initialised Qwen2_5_VLForConditionalGeneration: a `width`-wide language model (its M-RoPE
    sections in Qwen2.5-VL-7B's 16:24:24 proportion of half a head) and a one-block vision tower, which
    text-to-image pipelines never run but the class needs."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = width // heads // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    special = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL[:3]))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
            bos_token_id=special[0], eos_token_id=special[2], pad_token_id=special[0], rms_norm_eps=1e-6,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
            fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=len(tokenizer) + 3, video_token_id=len(tokenizer) + 4,
        vision_start_token_id=len(tokenizer) + 1, vision_end_token_id=len(tokenizer) + 2,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)
