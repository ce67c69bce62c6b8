"""A tiny, randomly initialised Stable-Diffusion-shaped pipeline saved as a normal diffusers folder.

It is what tests and the benchmark train on: same classes and loading path as SD1.5, a few MB in size.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.toy.shapes import COLOURS, SHAPES

VOCAB_WORDS = ("a", "an", "photo", "of", "sks", *COLOURS, *SHAPES)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(folder: Path, words: tuple[str, ...], max_length: int) -> None:
    """A real CLIPTokenizer whose vocabulary makes every word in `words` a single token."""
    chars = _byte_level_alphabet()
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{current} {piece}")
            current += piece
            if current not in vocab:
                vocab.append(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    config = {
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def clip_text_encoder(tokenizer, hidden_size: int, layers: int, heads: int, max_length: int):
    """A randomly initialised CLIP text encoder sized for `tokenizer` (seed it with torch.manual_seed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def eight_x_vae(channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int):
    """An SD-style AutoencoderKL with four blocks (8x downsampling) and 4 latent channels, random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def save_sd_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon") -> Path:
    """Save the components as a StableDiffusionPipeline folder with SD1.5's DDIM sampling schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon", max_length: int = 77) -> Path:
    """Build and save a tiny SD1.5-shaped pipeline (UNet 32/64 channels, 8x VAE, 2-layer CLIP)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tokenizer_dir = folder / "tokenizer"
    write_clip_tokenizer(tokenizer_dir, VOCAB_WORDS, max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = eight_x_vae((8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, layers=2, heads=4, max_length=max_length)
    save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet, prediction_type)
    return folder


def build_sd15_shaped(folder: str | Path, seed: int = 0) -> Path:
    """Random weights in SD1.5's shapes (860M-parameter UNet, CLIP-L-sized text encoder, SD VAE), saved as a
    diffusers folder of about 4 GB: what benchmarks use to measure at the size users load."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer", VOCAB_WORDS, 77)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = eight_x_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=768, layers=12, heads=12, max_length=77)
    return save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet)


def build_tiny_sdxl(folder: str | Path, seed: int = 0, max_length: int = 77) -> Path:
    """A tiny SDXL-shaped pipeline: two CLIP encoders (the second with a projection), a UNet with text-time
    micro-conditioning and linear attention projections, the 8x VAE, Euler sampling."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name, VOCAB_WORDS, max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, layers=2, heads=2, max_length=max_length)
    config = text_encoder.config.to_dict()
    # A wider second encoder, as in SDXL (diffusers' single-file loader tells the two apart by width).
    config.update(hidden_size=48, intermediate_size=96, num_attention_heads=3, projection_dim=32, hidden_act="gelu")
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=16,
    )
    vae = eight_x_vae((16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder
