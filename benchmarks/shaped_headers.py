"""Diffusers folders of real models' shapes with no weights in them, for `lora-train --plan`.

The planner reads only safetensors headers, so a folder whose files have the real headers (names, shapes,
dtypes, offsets) and a sparse hole where the data would be (no disk used) plans exactly as the downloaded model
would. Each component is instantiated on torch's meta device from its published configuration (FLUX.1-dev:
diffusers' FluxTransformer2DModel defaults, CLIP ViT-L/14's text model, T5-XXL's encoder, the 16-channel VAE;
Wan 2.1 14B: its transformer, UMT5-XXL, Wan's VAE).

Run: `python -m benchmarks.shaped_headers OUT_DIR [--models flux-dev,wan-14b]`, then for example
`lora-train presets/flux-nf4.yaml --set model.path=OUT_DIR/flux-dev --plan --vram 8GiB`.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch

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


def _save_config(model, folder: Path, name: str = "config.json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    (folder / name).write_text(json.dumps(config, indent=2, default=str))


def flux_dev(out: Path) -> Path:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        vae = AutoencoderKL(
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
    components = {
        "transformer": (transformer, "diffusion_pytorch_model.safetensors"),
        "vae": (vae, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (clip, "model.safetensors"),
        "text_encoder_2": (t5, "model.safetensors"),
    }
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
    }
    return _write(out, index, components)


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
    components = {
        "transformer": (transformer, "diffusion_pytorch_model.safetensors"),
        "vae": (vae, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (umt5, "model.safetensors"),
    }
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
    }
    return _write(out, index, components)


def _write(out: Path, index: dict, components: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, (module, file_name) in components.items():
        dtype = torch.bfloat16
        write_headers(module, out / name, file_name, dtype)
        _save_config(module, out / name)
    return out


MODELS = {"flux-dev": flux_dev, "wan-14b": wan_14b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    for name in args.models.split(","):
        print(MODELS[name](args.out / name))


if __name__ == "__main__":
    main()
