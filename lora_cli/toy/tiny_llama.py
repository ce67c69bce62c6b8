"""A tiny Llama text encoder and an offline tokenizer in Llama 3's layout, for the tiny HunyuanVideo pipeline."""

from __future__ import annotations

import re

from lora_cli.toy.tiny_pipeline import VOCAB_WORDS

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama3_tokenizer(words: tuple[str, ...] = VOCAB_WORDS):
    """A tokenizer in Llama 3's layout (its split regex, byte-level pieces, a BOS post-processor, the header and
    end-of-turn special tokens, right padding) over a word-level vocabulary in which every piece of HunyuanVideo's
    prompt template and of `words` is one token, as in Llama 3's: the template's system prompt is the 95 tokens
    the pipeline crops. Saved as transformers' PreTrainedTokenizerFast (a LlamaTokenizer would be rebuilt by
    transformers 5 as a Llama-2 tokenizer)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    special = "(" + "|".join(re.escape(token) for token in LLAMA3_SPECIAL) + ")"
    parts = [part for part in re.split(special, DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", "")) if part]
    pieces = [piece for part in parts if part not in LLAMA3_SPECIAL for piece, _ in splitter.pre_tokenize_str(part)]
    pieces += [piece for word in words for piece in (word, "\u0120" + word)]  # "Ġ": a leading space
    backend = Tokenizer(
        WordLevel(vocab={t: i for i, t in enumerate(dict.fromkeys(["<unk>", *pieces]))}, unk_token="<unk>")
    )
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA3_SPECIAL])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>", unk_token="<unk>", padding_side="right", model_max_length=8192,
    )  # fmt: skip


def llama_encoder(tokenizer, width: int = 32, layers: int = 3, heads: int = 2):
    """A randomly initialised LlamaModel (HunyuanVideo reads hidden_states[-3]: three layers at least)."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
