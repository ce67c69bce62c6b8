"""Diffusers folders of real models' shapes with no weights in them, for `lora-train --plan`.

The planner reads only safetensors headers, so a folder whose files have the real headers (names, shapes,
dtypes, offsets) and a sparse hole where the data would be (no disk used) plans exactly as the downloaded model
would. Each component is instantiated on torch's meta device from its published configuration (FLUX.1-dev:
diffusers' FluxTransformer2DModel defaults, CLIP ViT-L/14's text model, T5-XXL's encoder, the 16-channel VAE;
Wan 2.1 14B: its transformer, UMT5-XXL, Wan's VAE; Qwen-Image: its 20B transformer, Qwen2.5-VL-7B, its VAE;
Z-Image: its 6B transformer, Qwen3-4B, FLUX.1's VAE; FLUX.2 [klein] 4B: its transformer, Qwen3-4B, FLUX.2's
VAE; HunyuanVideo: its 13B transformer, LLaVA-Llama-3-8B's language model, CLIP-L, its VAE; LongCat-Image: its 6B
transformer, Qwen2.5-VL-7B, FLUX.1's VAE).

Run: `python -m benchmarks.shaped_headers OUT_DIR [--models flux-dev,wan-14b,qwen-image,...]` (see MODELS),
then for example `lora-train presets/flux-nf4.yaml --set model.path=OUT_DIR/flux-dev --plan --vram 8GiB`.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch

QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128,
)  # fmt: skip
QWEN_OTHERS = {"scheduler": "FlowMatchEulerDiscreteScheduler", "tokenizer": "Qwen2Tokenizer"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_headers(module: torch.nn.Module, folder: Path, file_name: str, dtype: torch.dtype) -> None:
    """`module`'s state dict as a safetensors file whose data region is a sparse hole."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, tensor in module.state_dict().items():
        size = tensor.numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(folder / file_name, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)


def write_random_weights(
    module: torch.nn.Module, folder: Path, device: str, seed: int = 0, max_shard_size: str = "10GB"
) -> None:
    """Replace the sparse file of a diffusers `module` (built on the meta device) in `folder` with random bfloat16
    weights, made on `device` and saved as diffusers saves them (in shards of `max_shard_size`): matrices and
    kernels from N(0, 0.02), biases 0, norm scales 1. Speed and memory are a real model's; what it draws is noise."""
    module = module.to(torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(0.0 if name.endswith("bias") else 1.0)
    if any(True for _ in module.buffers()):
        raise ValueError(f"{type(module).__name__} has buffers, which to_empty leaves uninitialised")
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    module.save_pretrained(folder, max_shard_size=max_shard_size)


def _save_config(model, folder: Path, name: str = "config.json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    (folder / name).write_text(json.dumps(config, indent=2, default=str))


def _flux_vae():
    """FLUX.1's 16-channel VAE (also Z-Image's); build it under torch.device("meta")."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


FLUX_OTHERS = {"scheduler": "FlowMatchEulerDiscreteScheduler", "tokenizer": "CLIPTokenizer",
               "tokenizer_2": "T5TokenizerFast"}  # fmt: skip


def flux_dev_modules() -> dict[str, torch.nn.Module]:
    """FLUX.1-dev's transformer, VAE, CLIP-L and T5-XXL encoders on the meta device."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        vae = _flux_vae()
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                vocab_size=32128,
                feed_forward_proj="gated-gelu",
                is_gated_act=True,
            )
        )
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


def flux_dev(out: Path) -> Path:
    return write_pipeline(out, "FluxPipeline", flux_dev_modules(), FLUX_OTHERS)


def wan_14b(out: Path) -> Path:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel(
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        vae = AutoencoderKLWan()
        umt5 = UMT5EncoderModel(
            UMT5Config(
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                vocab_size=256384,
                feed_forward_proj="gated-gelu",
                is_gated_act=True,
            )
        )
    modules = {"transformer": transformer, "vae": vae, "text_encoder": umt5}
    return write_pipeline(
        out, "WanPipeline", modules, {"scheduler": "UniPCMultistepScheduler", "tokenizer": "T5TokenizerFast"}
    )


def qwen_image(out: Path) -> Path:
    """Qwen-Image (20B MMDiT, diffusers' defaults are the release's), Qwen2.5-VL-7B-Instruct, its VAE."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel()
        vae = AutoencoderKLQwenImage()
        text_encoder = _qwen25_vl_7b()
    return write_pipeline(
        out, "QwenImagePipeline", {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}, QWEN_OTHERS
    )


def _qwen25_vl_7b():
    """Qwen2.5-VL-7B-Instruct (Qwen-Image's and LongCat-Image's text encoder); build it on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4,
    )  # fmt: skip
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def longcat_image(out: Path) -> Path:
    """LongCat-Image (6B: 10 double- and 20 single-stream blocks of 24 heads), Qwen2.5-VL-7B, FLUX.1's VAE."""
    from diffusers import LongCatImageTransformer2DModel

    with torch.device("meta"):
        transformer = LongCatImageTransformer2DModel(num_layers=10, num_single_layers=20)
        vae = _flux_vae()
        text_encoder = _qwen25_vl_7b()
    modules = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    return write_pipeline(out, "LongCatImagePipeline", modules, QWEN_OTHERS)


def z_image(out: Path) -> Path:
    """Z-Image(-Turbo) (6B single-stream DiT, diffusers' defaults are the release's), Qwen3-4B, FLUX.1's VAE."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
        vae = _flux_vae()
        text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B))
    return write_pipeline(
        out, "ZImagePipeline", {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}, QWEN_OTHERS
    )


def flux2_klein(out: Path) -> Path:
    """FLUX.2 [klein] 4B (5 double and 20 single blocks of 24 heads, no guidance embedding), Qwen3-4B, FLUX.2's
    VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(
            num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
        )
        vae = AutoencoderKLFlux2()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B, tie_word_embeddings=True))
    return write_pipeline(
        out, "Flux2KleinPipeline", {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}, QWEN_OTHERS
    )


def hunyuan_video(out: Path) -> Path:
    """HunyuanVideo 1.0 (13B; diffusers' defaults are the release's), LLaVA-Llama-3-8B's language model, CLIP-L,
    its causal 3D VAE."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    with torch.device("meta"):
        transformer = HunyuanVideoTransformer3DModel()
        vae = AutoencoderKLHunyuanVideo()
        llama = LlamaModel(
            LlamaConfig(
                vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8,
            )
        )  # fmt: skip
        clip = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
    modules = {"transformer": transformer, "vae": vae, "text_encoder": llama, "text_encoder_2": clip}
    return write_pipeline(
        out,
        "HunyuanVideoPipeline",
        modules,
        {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "tokenizer": "PreTrainedTokenizerFast",
            "tokenizer_2": "CLIPTokenizer",
        },
    )


def write_pipeline(out: Path, pipeline: str, modules: dict[str, torch.nn.Module], others: dict[str, str]) -> Path:
    """A diffusers folder of `pipeline`: each module's headers and config in its sub-folder, `others` (tokenizers,
    scheduler: component -> class) named in model_index.json only."""
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, module in modules.items():
        library = type(module).__module__.split(".")[0]
        index[name] = [library, type(module).__name__]
        file_name = "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
        write_headers(module, out / name, file_name, torch.bfloat16)
        _save_config(module, out / name)
    for name, class_name in others.items():
        index[name] = ["diffusers" if name == "scheduler" else "transformers", class_name]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


MODELS = {"flux-dev": flux_dev, "wan-14b": wan_14b, "qwen-image": qwen_image, "z-image": z_image,
          "flux2-klein": flux2_klein, "hunyuan-video": hunyuan_video,
          "longcat-image": longcat_image}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    for name in args.models.split(","):
        print(MODELS[name](args.out / name))


if __name__ == "__main__":
    main()
