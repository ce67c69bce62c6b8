"""Tiny, randomly initialised pipelines of the DiTs that read an LLM's hidden states (Z-Image, ...), saved as
normal diffusers folders: the same classes and loading path as the full-size models, a few MB each."""

from __future__ import annotations

from pathlib import Path

from lora_cli.toy.tiny_qwen import qwen3_encoder, qwen_tokenizer


def flux_vae(width: int = 16):
    """The 16-channel 8x AutoencoderKL of Flux (also Z-Image's), no quant convs, latents (z - 0.1159) * 0.3611."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        latent_channels=16, block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        norm_num_groups=width, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip


def build_tiny_z_image(
    folder: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 16, layers: int = 2, text_width: int = 32
) -> Path:
    """A small Z-Image-shaped pipeline: a Qwen3 encoder `text_width` wide read through the chat template, the
    16-channel VAE, and a ZImageTransformer2DModel of `layers` joint blocks (and one noise- and one
    context-refiner block) of `heads` x `head_dim` over 2x2 patches; Z-Image-Turbo's scheduler (shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder = Path(folder)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen3_encoder(tokenizer, width=text_width)
    side = 2 * round(3 * head_dim / 16)  # RoPE axes (caption index, row, column) in Z-Image's 32:48:48 ratio
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=heads * head_dim, n_layers=layers,
        n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, qk_norm=True, cap_feat_dim=text_width,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[head_dim - 2 * side, side, side], axes_lens=[1536, 512, 512],
    )  # fmt: skip
    with torch.no_grad():  # diffusers starts the pad tokens at zero; random ones make wrong padding visible
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).save_pretrained(folder)
    return folder


# Qwen/Qwen-Image's scheduler_config: the dynamic shift exp(mu), mu from 0.5 at 256 to 0.9 at 8192 image tokens.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
    time_shift_type="exponential", use_dynamic_shifting=True,
)  # fmt: skip


def build_tiny_qwen_image(
    folder: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 16, blocks: int = 2, text_width: int = 32
) -> Path:
    """A small Qwen-Image-shaped pipeline: a Qwen2.5-VL text encoder `text_width` wide, Qwen-Image's causal
    video VAE (8x, per-channel latent mean and std; 4 channels here) and a QwenImageTransformer2DModel of
    `blocks` double-stream blocks of `heads` x `head_dim` over 2x2-packed latents."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from lora_cli.toy.tiny_qwen import qwen25_vl_encoder

    folder = Path(folder)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen25_vl_encoder(tokenizer, width=text_width)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=blocks, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_width,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.3, -0.2, 0.1, 0.0], latents_std=[1.8, 2.2, 1.3, 2.6],
    )  # fmt: skip
    QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).save_pretrained(folder)
    return folder


def build_tiny_flux2_klein(
    folder: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 16, blocks: tuple[int, int] = (1, 2)
) -> Path:
    """A small FLUX.2 [klein]-shaped pipeline: a 27-layer Qwen3 32 wide (the pipeline stacks hidden states 9, 18
    and 27, so the transformer's text input is 96 wide), FLUX.2's VAE (4 latent channels here, batch-norm
    statistics over the 2x2-patched channels made non-trivial) and a Flux2Transformer2DModel of `blocks` (double,
    single) blocks of `heads` x `head_dim`, no guidance embedding (as klein)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    folder = Path(folder)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen3_encoder(tokenizer, width=32, layers=27, causal_lm=True)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=blocks[0], num_single_layers=blocks[1], attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=96, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4, rope_theta=2000, guidance_embeds=False,
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=64,
    )  # fmt: skip
    statistics = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.num_features, generator=statistics))
    vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.num_features, generator=statistics))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )  # fmt: skip
    Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    ).save_pretrained(folder)
    return folder


def build_tiny_hunyuan_video(folder: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 16) -> Path:
    """A small HunyuanVideo (1.0)-shaped text-to-video pipeline: a 3-layer LlamaModel 32 wide with a Llama-3
    tokenizer, CLIP (pooled), the causal 3D VAE (8x space, 4x time, 4 channels here) and a
    HunyuanVideoTransformer3DModel of one double-stream, one single-stream and one token-refiner block of `heads`
    x `head_dim`, 1x2x2 patches and a guidance embedding (HunyuanVideo is guidance-distilled)."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTokenizer

    from lora_cli.toy.tiny_llama import llama3_tokenizer, llama_encoder
    from lora_cli.toy.tiny_pipeline import VOCAB_WORDS, clip_text_encoder, write_clip_tokenizer

    folder = Path(folder)
    tokenizer = llama3_tokenizer()
    write_clip_tokenizer(folder / "tokenizer_2", VOCAB_WORDS, 77)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = llama_encoder(tokenizer)
    clip = clip_text_encoder(clip_tokenizer, hidden_size=32, layers=2, heads=2, max_length=77)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_theta=256.0,
        rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )  # fmt: skip
    HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=clip_tokenizer,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def build_tiny_longcat_image(folder: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 16) -> Path:
    """A small LongCat-Image-shaped pipeline: a Qwen2.5-VL text encoder 32 wide, FLUX.1's 16-channel VAE and a
    LongCatImageTransformer2DModel of one double- and one single-stream block of `heads` x `head_dim`. The
    Qwen tokenizer stands in for the prompt-rewriting processor (which needs torchvision; lora-cli never rewrites)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    from lora_cli.toy.tiny_qwen import qwen25_vl_encoder

    folder = Path(folder)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen25_vl_encoder(tokenizer, width=32)
    axis = head_dim // 8  # rotary axes (modality, row, column) in LongCat's 16:56:56 proportion
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[2 * axis, 3 * axis, 3 * axis],
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    LongCatImagePipeline(
        scheduler=scheduler, vae=flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer, text_processor=tokenizer,
        transformer=transformer,
    ).save_pretrained(folder)  # fmt: skip
    return folder
