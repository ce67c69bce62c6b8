"""The preset schema: typed sections with defaults, help text and cross-field checks.

Every field's `description` is the reference text of docs/presets.md (a test keeps the two in step).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lora_cli.adapters.keys import FILE_FORMATS
from lora_cli.adapters.registry import algorithms, get_algorithm
from lora_cli.config.objective_sections import DistillSection, FlowSection, TransferSection
from lora_cli.config.section import Section
from lora_cli.models.quantize import BITSANDBYTES_MODES
from lora_cli.models.quantize import CHOICES as QUANTIZE_CHOICES

PRESET_VERSION = 1
AlgorithmName = Literal[tuple(algorithms())]  # type: ignore[valid-type]
QuantizeMode = Literal[QUANTIZE_CHOICES]  # type: ignore[valid-type]
FileFormat = Literal[FILE_FORMATS]  # type: ignore[valid-type]


class ModelSection(Section):
    path: str = Field(
        description="Base model: a local diffusers folder, a single-file `.safetensors` checkpoint, "
        "a Hugging Face hub id, or `builtin:shapes` / `builtin:shapes-dit` (the small UNet and DiT bases that ship "
        "with lora-cli). "
        "Relative paths are resolved against the preset file's folder."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. `fp16`.")
    config: str | None = Field(
        None,
        description="For a single-file checkpoint: a diffusers folder or hub id that holds the component "
        "configs (needed offline, where diffusers cannot look them up).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="Storage dtype of the frozen base weights. Adapter weights always train in float32.",
    )
    quantize: QuantizeMode = Field(
        "none",
        description="Store the frozen denoiser's Linear layers quantized (QLoRA): `fp8` (float8 e4m3 with a scale "
        "per row, upcast per layer; every adapter algorithm), or via bitsandbytes `nf4`/`fp4` (4-bit) or `int8` "
        "(lora/locon, DoRA). Adapters train beside them. Convolutions stay in `dtype`.",
    )
    max_text_tokens: int | None = Field(
        None,
        gt=0,
        description="Token limit of T5-family and LLM text encoders (Flux, FLUX.2, SD3, PixArt, Wan, HunyuanVideo, "
        "Qwen-Image, Z-Image, LongCat-Image); longer captions are cut. Default: the base's (Flux 512 — use 256 for "
        "FLUX.1 schnell —, SD3 256, PixArt-Sigma 300, HunyuanVideo 256, Wan, Qwen-Image, Z-Image, LongCat-Image and "
        "FLUX.2 512).",
    )
    allow_pickle: bool = Field(
        False,
        description="Accept a pickle-based checkpoint (`.ckpt`, `.pt`, `.bin`), read with restricted unpickling "
        "(tensors only). Pickle files can run code when loaded, so they are refused unless this is set "
        "(`lora-train --allow-pickle` sets it).",
    )


TARGET_PRESETS = ("attention", "attention_ff", "full")


class AdapterSection(Section):
    type: AlgorithmName = Field(
        "lora",
        description="Adapter algorithm: `lora`, `locon` (LoRA that also covers convolutions), `loha` "
        "(Hadamard product of two low-rank pairs) or `lokr` (Kronecker product).",
    )
    rank: int = Field(4, gt=0, description="Rank (dimension) of the low-rank update.")
    alpha: float | None = Field(
        None,
        gt=0,
        description="Scale numerator: the update is multiplied by alpha / rank. Defaults to `rank` (scale 1).",
    )
    conv_rank: int | None = Field(
        None, gt=0, description="Rank for Conv2d layers (LoCon, LoHa, LoKr). Defaults to `rank`."
    )
    conv_alpha: float | None = Field(
        None, gt=0, description="Alpha for Conv2d layers. Defaults to `alpha` (or `conv_rank` if alpha is unset)."
    )
    dora: bool = Field(
        False, description="Weight-decomposed LoRA (DoRA, Liu et al. 2024): learn a magnitude per output channel too."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input during training (lora/locon only)."
    )
    targets: str | list[str] | None = Field(
        None,
        description="What to adapt in the denoiser: a preset (`attention`, `attention_ff`, `full` = every "
        "Linear and Conv2d) or module-name patterns: a name suffix (`to_q`, `attn1.to_out.0`) or a glob "
        "(`down_blocks.*.to_k`). Default: `attention` for lora, `full` for locon/loha/lokr.",
    )
    late: int | None = Field(
        None,
        gt=0,
        description="Adapt only modules inside the last N blocks of the denoiser (Late-Stage LoRA); "
        "UNet blocks count down blocks, the mid block, then up blocks.",
    )
    text_encoder: bool = Field(False, description="Also train an adapter on the text encoder(s).")
    text_encoder_targets: list[str] | None = Field(
        None,
        description="Module-name patterns for the text encoder. Defaults to attention and MLP projections.",
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank or self.rank

    @property
    def effective_conv_alpha(self) -> float:
        if self.conv_alpha is not None:
            return self.conv_alpha
        return float(self.effective_conv_rank) if self.alpha is None else self.alpha

    @property
    def target_spec(self) -> str | list[str]:
        return self.targets if self.targets is not None else get_algorithm(self.type).default_targets

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSection:
        algorithm = get_algorithm(self.type)
        if self.dora and not algorithm.dora:
            raise ValueError(f"`adapter.dora` works with {_with(lambda a: a.dora)}, not {self.type}")
        if self.dropout and not algorithm.dropout:
            raise ValueError(f"`adapter.dropout` is not available for {self.type}; set it to 0")
        if isinstance(self.targets, str) and self.targets not in TARGET_PRESETS:
            raise ValueError(
                f"`adapter.targets` preset `{self.targets}` is unknown; use one of {', '.join(TARGET_PRESETS)} "
                "or a list of module-name patterns"
            )
        return self


class DataSection(Section):
    folder: str | None = Field(
        None,
        description="Folder of images with same-named caption files (`cat.png` + `cat.txt`). Required, except for "
        "a distillation run whose teacher draws its data from `distill.prompts`.",
    )
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (images are resized and cropped).")
    caption_extensions: list[str] = Field(
        [".txt", ".caption"], min_length=1, description="Caption file extensions, tried in order."
    )
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch.")
    caption_dropout: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability of training on an empty caption (keeps the unconditional branch).",
    )
    shuffle: bool = Field(True, description="Shuffle the image order every epoch (seeded).")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated caption tags every time an image is used.")
    keep_tags: int = Field(0, ge=0, description="With `shuffle_tags`, how many leading tags stay in place.")
    frames: int | None = Field(
        None,
        gt=0,
        description="Train on video clips of this many frames (video bases such as Wan): the folder holds video "
        "files (`.mp4`, `.webm`, `.mov`, `.mkv`, `.avi`, `.gif`) or folders of frames, each with a caption file "
        "beside it. Wan's VAE wants 4k+1 frames (e.g. 17, 33, 81).",
    )
    fps: float | None = Field(
        None, gt=0, description="Resample clips to this frame rate (default: each clip's own; frame folders: 16)."
    )


class PriorSection(Section):
    folder: str | None = Field(
        None, description="Folder of class (regularisation) images with captions, trained alongside the data."
    )
    prompts: list[str] = Field(
        [], description="Generate class images from the base for these prompts before training (cached)."
    )
    images_per_prompt: int = Field(8, gt=0, description="Images generated per prior prompt.")
    weight: float = Field(1.0, gt=0, description="Loss weight of class images relative to the training images.")
    steps: int = Field(25, gt=0, description="Denoising steps when generating class images.")
    guidance_scale: float = Field(4.0, ge=0, description="Guidance scale when generating class images.")
    seed: int = Field(1234, description="Seed of the first generated class image (the rest count up).")

    @property
    def enabled(self) -> bool:
        return self.folder is not None or bool(self.prompts)


class TrainSection(Section):
    steps: int | None = Field(None, gt=0, description="Optimizer steps to train. Set either `steps` or `epochs`.")
    epochs: int | None = Field(None, gt=0, description="Epochs to train (converted to steps).")
    batch_size: int = Field(1, gt=0, description="Images per micro-batch (per process).")
    allow_short_batches: bool = Field(
        False,
        description="Train when the dataset (with repeats and prior images) cannot fill one global batch (batch_size "
        "x processes); every batch then holds the whole dataset. Off, such a run is refused.",
    )
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate for the denoiser's adapter.")
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate for the text-encoder adapter. Defaults to `learning_rate`."
    )
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = (
        Field("constant", description="Learning-rate schedule.")
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps at the start of the schedule.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field(
        "adamw",
        description="`adamw` (torch), `adamw8bit` (bitsandbytes, install `lora-cli[bnb]`) or `prodigy` "
        "(adaptive step size; use learning_rate 1.0).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    optimizer_args: dict[str, float | int | bool | str | list[float]] = Field(
        {}, description="Extra keyword arguments for the optimizer, e.g. `{betas: [0.9, 0.99]}`."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null disables.")
    seed: int = Field(42, description="Seed for data order, noise, timesteps and adapter initialisation.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision for the forward pass.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    offload_blocks: int = Field(
        0,
        ge=0,
        description="Keep the frozen weights of this many of a DiT's repeated blocks (the last ones) in host memory "
        "(pinned on CUDA) and copy each to the GPU just before it runs, the next one prefetched on a side stream; "
        "adapters stay on the GPU. Needs `gradient_checkpointing`; not with `compile`, FSDP or an int8 base. "
        "`lora-train --plan` gives the memory saved and the transfer time per step.",
    )
    fused_optimizer: bool | None = Field(
        None,
        description="`adamw` as torch's fused kernel (one kernel for every adapter tensor; several times faster "
        "than a loop over them on CPU and GPU). Default: fused, except under FSDP (foreach there).",
    )
    compile: bool = Field(
        False,
        description="Compile each of the denoiser's repeated blocks with `torch.compile` (regional compilation: the "
        "blocks share one compiled graph, so compiling takes seconds, not minutes). Faster steps on GPUs; the first "
        "steps are slower while it compiles. Needs a C++ compiler on the CPU.",
    )
    channels_last: bool | None = Field(
        None,
        description="Store a UNet's convolution weights channels-last (faster convolutions on NVIDIA GPUs). "
        "Default: on for UNets on CUDA, off elsewhere; DiTs have no convolutions to speak of.",
    )
    tf32: bool = Field(
        True,
        description="Let float32 matrix multiplications and convolutions use TF32 on Ampere and newer GPUs "
        "(about 8x the float32 throughput, 10-bit mantissa); no effect elsewhere.",
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR loss weighting (Hang et al. 2023); 5 is the usual value. null disables.",
    )
    skip_nonfinite: int = Field(
        0,
        ge=0,
        description="Skip up to this many optimizer steps whose loss or gradients are not finite (isolated bad "
        "batches) before stopping; 0 stops at the first. A skipped step changes nothing (the update is undone on "
        "the device) but counts towards `train.steps`. The count restarts when a run is resumed.",
    )
    noise_offset: float = Field(
        0.0, ge=0, description="Add this much per-channel offset noise (helps dark/bright images)."
    )
    objective: Literal["denoise", "distill", "transfer"] = Field(
        "denoise",
        description="`denoise`: learn the data (a style, a subject). `distill`: learn to sample in few steps — the "
        "frozen base is the teacher and base + adapter the student (settings in `distill:`). `transfer`: learn what "
        "another base with its adapter predicts on the data (and what this base predicts on prior images); "
        "`lora-transfer --method distill` sets it up (settings in `transfer:`).",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _plain_no(cls, value: object) -> object:
        """YAML 1.1 reads an unquoted `no` as false; `mixed_precision: no` means the option "no"."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of `train.steps` or `train.epochs`")
        if self.warmup_steps and self.scheduler == "constant":
            raise ValueError("`train.warmup_steps` has no effect with scheduler `constant`; use `constant_with_warmup`")
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ValueError(
                "`train.offload_blocks` needs `train.gradient_checkpointing: true` (without it every block's weights "
                "stay on the GPU from its forward pass to its backward pass, and offloading saves nothing)"
            )
        if self.offload_blocks and self.compile:
            raise ValueError("`train.offload_blocks` and `train.compile` do not mix (the copies break the graphs); "
                             "turn one off")  # fmt: skip
        return self

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_learning_rate is None else self.text_encoder_learning_rate


class DistributedSection(Section):
    """How several processes (`accelerate launch`, `torchrun`) share the work; ignored on one process."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="`ddp`: every process holds the whole base and gradients are averaged. `fsdp`: the denoiser's "
        "frozen weights, adapter, gradients and optimizer state are sharded across the processes (torch FSDP2, "
        "one unit per block), for bases that do not fit one GPU; not with `model.quantize`, fp16, `adamw8bit` or "
        "`prodigy`. An accelerate config with FSDP selects it too.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP: free each block's gathered weights after its forward pass and gather them again for "
        "backward (least memory, like ZeRO-3); `false` keeps them until backward (fewer transfers, more memory).",
    )


class CacheSection(Section):
    latents: bool = Field(False, description="Encode images once to disk (under `output.dir/cache`) and free the VAE.")
    text_embeddings: bool = Field(
        False,
        description="Encode captions once to disk and free the text encoder (not with a text-encoder adapter).",
    )


class OutputSection(Section):
    dir: str = Field("output", description="Run folder: adapter, checkpoints, logs, samples, cache.")
    name: str = Field(
        "lora",
        max_length=120,
        description="Adapter file name (without extension): ASCII letters, digits, `.`, `_` and `-`, so every "
        "tool and file system takes it.",
    )
    format: FileFormat | None = Field(
        None,
        description="Key format: `kohya` (A1111, ComfyUI and diffusers read it) or `diffusers` (peft-style keys). "
        "Default: what the base's community tools read — `kohya` for SD1.x/2 and SDXL, `diffusers` for the DiTs "
        "(SD3, Flux, PixArt, Wan); LoHa/LoKr always use kohya/LyCORIS keys.",
    )
    save_every: int | None = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")

    keep_last: int = Field(3, ge=1, description="How many checkpoints to keep.")

    @field_validator("name")
    @classmethod
    def _portable_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in (".", ".."):
            raise ValueError("use ASCII letters, digits, `.`, `_` and `-` only (e.g. my-style_v2)")
        return value


class SampleSection(Section):
    prompts: list[str] = Field([], description="Prompts for preview images.")
    every: int | None = Field(
        None, gt=0, description="Draw previews every N steps (and at the end) when prompts are set."
    )
    steps: int | None = Field(
        None, gt=0, description="Denoising steps per preview. Default: the base pipeline's (e.g. SD 50, Flux 28)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Guidance scale of previews. Default: the base pipeline's (SD 7.5, SDXL 5, SD3 7, Flux's "
        "embedded guidance 3.5, PixArt 4.5, Wan 5).",
    )
    negative_prompt: str = Field("", description="Negative prompt for previews.")
    seed: int = Field(0, description="Seed for previews (the same every time, so they are comparable).")


class LoggingSection(Section):
    every: int = Field(
        1,
        gt=0,
        description="Write a metrics line every N steps. Loss and gradient norm stay on the device until then (a "
        "step never waits for the GPU), so on a GPU `10` trains faster; checkpoints and the last step are always "
        "read.",
    )
    tensorboard: bool = Field(False, description="Also log to TensorBoard under `output.dir/tensorboard`.")


class Preset(Section):
    version: int = Field(PRESET_VERSION, description="Preset format version.")
    model: ModelSection
    adapter: AdapterSection = AdapterSection()
    data: DataSection = DataSection()
    prior: PriorSection = PriorSection()
    train: TrainSection
    flow: FlowSection = FlowSection()
    distill: DistillSection = DistillSection()
    transfer: TransferSection = TransferSection()
    distributed: DistributedSection = DistributedSection()
    cache: CacheSection = CacheSection()
    output: OutputSection = OutputSection()
    sample: SampleSection = SampleSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _compatible(self) -> Preset:
        if self.cache.text_embeddings and self.adapter.text_encoder:
            raise ValueError(
                "`cache.text_embeddings` cannot be used with `adapter.text_encoder: true` "
                "(the embeddings change while training); turn one off"
            )
        if self.cache.text_embeddings and self.data.shuffle_tags:
            raise ValueError(
                "`cache.text_embeddings` cannot be used with `data.shuffle_tags` (every shuffle is a new caption)"
            )
        algorithm = get_algorithm(self.adapter.type)
        if self.output.format is not None and self.output.format not in algorithm.formats:
            raise ValueError(
                f"`output.format: {self.output.format}` cannot hold {self.adapter.type} adapters; save it as "
                f"{' or '.join(f'`{f}`' for f in algorithm.formats)}"
            )
        if self.model.quantize in BITSANDBYTES_MODES and not algorithm.quantized_base:
            raise ValueError(
                f"`model.quantize: {self.model.quantize}` trains {_with(lambda a: a.quantized_base)} adapters only "
                f"(peft has no bitsandbytes {self.adapter.type} layer); change adapter.type, or use quantize: fp8 "
                "(every algorithm) or none"
            )
        if self.train.offload_blocks and self.distributed.strategy == "fsdp":
            raise ValueError(
                "`train.offload_blocks` cannot offload FSDP shards; use distributed.strategy: ddp, or fsdp without "
                "offloading (sharding already divides the weights between the GPUs)"
            )
        if self.train.offload_blocks and self.model.quantize == "int8":
            raise ValueError(
                "`train.offload_blocks` does not work with `model.quantize: int8` (bitsandbytes' 8-bit layers keep "
                "a device copy of their weights in their own state, so offloaded blocks would stay on the GPU); use "
                "quantize: fp8 (also one byte per weight) or nf4"
            )
        if self.data.frames is not None and self.prior.enabled:
            raise ValueError("prior preservation works on images; turn `prior` off to train on video clips")
        self._check_distillation()
        self._check_transfer()
        if self.data.resolution % 8:
            raise ValueError(f"`data.resolution` must be a multiple of 8, got {self.data.resolution}")
        return self

    def _check_distillation(self) -> None:
        distilling = self.train.objective == "distill"
        if self.data.folder is None and not (distilling and self.distill.prompts and self.distill.teacher_images):
            raise ValueError(
                "`data.folder` is missing: name a folder of images and captions (a distillation run may instead "
                "set distill.prompts and distill.teacher_images)"
            )
        if not distilling:
            return
        if self.adapter.text_encoder:
            raise ValueError("`train.objective: distill` trains the denoiser only; set adapter.text_encoder: false")
        if self.prior.enabled:
            raise ValueError("`train.objective: distill` has no use for prior images; remove the `prior` section")
        if self.data.frames is not None:
            raise ValueError("`train.objective: distill` works on images; video clips are not supported yet")

    def _check_transfer(self) -> None:
        if self.train.objective != "transfer":
            if self.transfer.source is not None or self.transfer.adapter is not None:
                raise ValueError("the `transfer` section is for `train.objective: transfer`; remove it or set that")
            return
        if self.transfer.source is None or self.transfer.adapter is None:
            raise ValueError("`train.objective: transfer` needs `transfer.source` and `transfer.adapter` (the teacher)")
        if self.adapter.text_encoder:
            raise ValueError("`train.objective: transfer` trains the denoiser only; set adapter.text_encoder: false")
        if self.distributed.strategy == "fsdp":
            raise ValueError("`train.objective: transfer` keeps a whole teacher per process; use distributed: ddp")


def fsdp_conflict(quantize: str, mixed_precision: str, optimizer: str) -> str | None:
    """Why FSDP (`distributed.strategy: fsdp` on several processes) cannot shard a run with these settings, with
    the fix; None when it can. Training refuses such runs and the memory planner neither plans nor proposes them."""
    if quantize != "none":
        return (
            f"FSDP cannot shard a quantized base (model.quantize: {quantize}); set model.quantize: none and "
            "model.dtype: bfloat16 to shard it, or train the quantized base with DDP"
        )
    if mixed_precision == "fp16":
        return "train.mixed_precision: fp16 is not supported with FSDP; use bf16"
    if optimizer != "adamw":
        return (
            f"train.optimizer: {optimizer} cannot step sharded parameters (it needs whole tensors: 8-bit blocks, "
            "Prodigy's step size); use adamw — FSDP already splits its state across the processes"
        )
    return None


def _with(capability) -> str:
    """The algorithms that have a capability, for messages: `lora or locon`."""
    return " or ".join(name for name, algorithm in algorithms().items() if capability(algorithm))
