"""Tiny, randomly initialised DiT pipelines (Flux-shaped) saved as normal diffusers folders, for tests and
benchmarks: the same classes and loading path as the full-size models, a few MB in size."""

from __future__ import annotations

from pathlib import Path

from lora_cli.toy.tiny_pipeline import VOCAB_WORDS, clip_text_encoder, eight_x_vae, write_clip_tokenizer

T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def t5_tokenizer(words: tuple[str, ...] = VOCAB_WORDS):
    """A T5 tokenizer whose vocabulary makes each word one piece (unigram scores, no sentencepiece file)."""
    from transformers import T5TokenizerFast

    pieces = [*T5_SPECIAL, *(f"\u2581{word}" for word in words), "\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    vocab = [(piece, 0.0 if piece in T5_SPECIAL else -1.0 - index / 100) for index, piece in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def t5_encoder(vocab_size: int, width: int, layers: int, heads: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=width // heads, num_layers=layers, num_heads=heads
    )
    return T5EncoderModel(config)


def build_tiny_flux(
    folder: str | Path,
    seed: int = 0,
    guidance_embeds: bool = True,
    heads: int = 2,
    head_dim: int = 16,
    blocks: tuple[int, int] = (1, 1),
    text_widths: tuple[int, int] = (32, 32),
    vae_width: int = 16,
) -> Path:
    """A small Flux-shaped pipeline: CLIP (pooled) + T5 text encoders of `text_widths`, a FluxTransformer2DModel
    with `blocks` (double-stream, single-stream) blocks of `heads` x `head_dim` (and a guidance embedding, as in
    Flux dev), and a VAE with a latent shift, as Flux's has. The defaults are tiny; 4 heads of 16 give 64-wide
    layers that 4-bit quantization takes (its blocks are 64 values), and benchmarks ask for larger sizes."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer", VOCAB_WORDS, 77)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = t5_tokenizer()
    clip_width, t5_width = text_widths
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=blocks[0],
        num_single_layers=blocks[1],
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    channels = (vae_width, *[2 * vae_width] * 3)
    vae = eight_x_vae(channels, layers_per_block=1, norm_num_groups=min(vae_width, 32), sample_size=64)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_text_encoder(clip_tokenizer, hidden_size=clip_width, layers=2, heads=2, max_length=77),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5_encoder(len(tokenizer_2), width=t5_width, layers=2, heads=max(2, t5_width // 64)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SD3-shaped pipeline: CLIP-L and CLIP-G (with projections, different widths) + T5, and a
    two-block SD3Transformer2DModel over 2x2 patches."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name, VOCAB_WORDS, 77)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5 = t5_tokenizer()
    torch.manual_seed(seed)
    clip_config = clip_text_encoder(clip_tokenizer, hidden_size=32, layers=2, heads=2, max_length=77).config.to_dict()
    encoders = []
    for width in (32, 48):
        clip_config.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, projection_dim=32)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**clip_config)))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )  # fmt: skip
    vae = eight_x_vae((16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=clip_tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=t5_encoder(len(t5), width=96, layers=2, heads=2),
        tokenizer_3=t5,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_pixart(folder: str | Path, seed: int = 0) -> Path:
    """A tiny PixArt-Sigma-shaped pipeline: T5 text, a two-block PixArtTransformer2DModel with learned variance
    (8 output channels for 4 latent ones), the 8x VAE, DPM-Solver sampling."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    folder = Path(folder)
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=32, caption_channels=32, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False,
    )  # fmt: skip
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), width=32, layers=2, heads=2),
        vae=eight_x_vae((16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_wan(
    folder: str | Path,
    seed: int = 0,
    heads: int = 2,
    head_dim: int = 16,
    blocks: int = 2,
    ffn_dim: int = 64,
    text_width: int = 32,
    rope_length: int = 32,
    vae_width: int = 8,
    vae_mult: tuple[int, ...] = (1, 2, 2, 2),
    vae_resnets: int = 1,
) -> Path:
    """A small Wan-2.x-shaped text-to-video pipeline: a UMT5 encoder `text_width` wide, a causal video VAE (8x
    space, 4x time; widths `vae_width` x `vae_mult`, `vae_resnets` ResNets per level) and a WanTransformer3DModel
    of `blocks` blocks of `heads` x `head_dim` over 1x2x2 patches. The defaults are tiny."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    text_heads = max(2, text_width // 64)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=text_width, d_ff=2 * text_width, d_kv=text_width // text_heads,
            num_layers=2, num_heads=text_heads,
        )
    )  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=vae_width, z_dim=4, dim_mult=list(vae_mult), num_res_blocks=vae_resnets, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.5, 0.8, 1.0, 1.2],
    )  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=text_width, freq_dim=text_width, ffn_dim=ffn_dim, num_layers=blocks, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=rope_length,
    )  # fmt: skip
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def write_clips(folder: Path, count: int, frames: int, size: int = 64, seed: int = 0) -> Path:
    """Captioned clips of a coloured shape moving across the frame: half as folders of PNG frames, half as
    MP4 files (PyAV), so both clip kinds are exercised."""
    import random

    import av
    from PIL import Image, ImageDraw

    from lora_cli.toy.shapes import COLOURS, shape_polygon

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        start, speed = rng.uniform(0.25, 0.4) * size, rng.uniform(1.0, 2.0) * size / 32
        images = []
        for step in range(frames):
            image = Image.new("RGB", (size, size), (240, 240, 240))
            outline = shape_polygon("circle", start + step * speed, size / 2, size * 0.2, 0.0)
            ImageDraw.Draw(image).polygon(outline, fill=COLOURS[colour])
            images.append(image)
        name = f"clip{index:02d}"
        (folder / f"{name}.txt").write_text(f"a {colour} circle moving right")
        if index % 2:
            clip = folder / name
            clip.mkdir()
            for number, image in enumerate(images):
                image.save(clip / f"{number:04d}.png")
            continue
        with av.open(str(folder / f"{name}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=16)
            stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
            for image in images:
                container.mux(stream.encode(av.VideoFrame.from_image(image)))
            container.mux(stream.encode())
    return folder
