"""The run's settings as plain values, built once from the command line: the only place that reads it.

Every other module takes one of these small dataclasses (or plain arguments), so each can be called from a
test, a benchmark or another program without an argparse namespace, and nothing changes after it is built.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from .data import Buckets, FrameSettings
from .memory import Plan, Request


@dataclass(frozen=True)
class ModelSource:
    """Where the model's parts are loaded from: a hub id or a local folder in diffusers layout."""

    path: str
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    files: str | None = None  # the folder holding its files, a hub cache's snapshot for an id (models.locate)

    @property
    def location(self) -> str:
        """What the loaders read: the local files where they were found, else the hub id."""
        return self.files or self.path

    def hub_kwargs(self) -> dict:
        return {"revision": self.revision, "cache_dir": self.cache_dir}


@dataclass(frozen=True)
class DataSource:
    """The dataset as given: a local folder and its index files, or a hub dataset (dataset_name) that
    hub.resolve_dataset turns into a local snapshot with the same fields filled in."""

    root: str | None
    caption_column: str | None
    video_column: str | None
    dataset_file: str | None = None
    image_column: str | None = None
    id_token: str | None = None
    skip_bad: bool = False
    num_workers: int = 0
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_revision: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adamw"
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    epsilon: float = 1e-8
    weight_decay: float = 1e-4
    use_8bit: bool = False
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = False
    prodigy_use_bias_correction: bool = False
    prodigy_safeguard_warmup: bool = False
    scheduler: str = "constant"
    warmup_steps: int = 0
    num_cycles: int = 1
    power: float = 1.0


@dataclass(frozen=True)
class TrainingSettings:
    """What the steps do, and when they checkpoint and validate."""

    seed: int
    batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: int | None
    num_train_epochs: int
    random_flip: float
    noised_image_dropout: float
    max_grad_norm: float
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int | None
    validation_epochs: int | None
    caption_dropout: float = 0.0  # the share of samples trained on the empty prompt's embedding
    checkpointing_minutes: float | None = None  # also checkpoint when this long has passed since the last


# The LoRA targets of the seed trainer (and of the CogVideoX and diffusers examples): the attention projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    # Module names (peft's: a name matches modules whose path ends with it) or the preset lora.ALL_LINEAR.
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS


@dataclass(frozen=True)
class HeldOutSettings:
    """The held-out loss, on the clips of `dataset` (a folder in the training data's format) or on a `split` share of
    the training clips (neither: off), at every checkpoint, at the end and every `steps` optimizer steps (None: no
    more), at `timesteps` timesteps spread over the schedule, with noise drawn from `seed`."""

    steps: int | None = None
    dataset: str | None = None
    split: float | None = None
    timesteps: int = 4
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.dataset is not None or self.split is not None


@dataclass(frozen=True)
class ValidationSettings:
    """The validation videos: one per prompt and video number, at the training size unless buckets vary it."""

    prompts: tuple[str, ...]
    images: tuple[Path, ...]
    num_videos: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    num_frames: int
    height: int
    width: int
    fps: int
    seed: int
    output_dir: str


@dataclass(frozen=True)
class HubPush:
    enabled: bool = False
    model_id: str | None = None
    token: str | None = None
    checkpoints: bool = False


@dataclass(frozen=True)
class OutputSettings:
    output_dir: str
    logging_dir: str
    report_to: str
    tracker_name: str
    resume_from_checkpoint: str | None
    push: HubPush
    comfyui_lora: bool = True  # a copy of each saved LoRA in core ComfyUI's format

    def repo_id(self) -> str:
        return self.push.model_id or Path(self.output_dir).absolute().name


@dataclass(frozen=True)
class Settings:
    model: ModelSource
    data: DataSource
    frames: FrameSettings  # temporal_compression is the VAE's, set once its config is read
    buckets: Buckets | None
    training: TrainingSettings
    lora: LoraSettings
    optimizer: OptimizerSettings
    validation: ValidationSettings
    memory: Request
    output: OutputSettings
    mixed_precision: str | None
    attention_backend: str
    ignore_learned_positional_embeddings: bool
    allow_tf32: bool
    nccl_timeout: int | None
    latent_cache_dir: str
    dry_run: bool
    heldout: HeldOutSettings = HeldOutSettings()


def split(text: str | None, separator: str) -> list[str]:
    return [p.strip() for p in text.split(separator) if p.strip()] if text else []


def resume_path(resume: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint, with the diffusers example's form (a name inside --output_dir) made a path."""
    if resume and resume != "latest" and not Path(resume).is_dir() and (Path(output_dir) / resume).is_dir():
        return str(Path(output_dir) / resume)
    return resume


def _data(args) -> DataSource:
    # A hub dataset's defaults depend on the layout it holds: hub.resolve_dataset fills them in.
    captions, videos = args.caption_column, args.video_column
    if not args.dataset_name:
        table = bool(args.dataset_file)
        captions = captions or ("caption" if table else "prompts.txt")
        videos = videos or ("video" if table else "videos.txt")
    return DataSource(args.instance_data_root, captions, videos, args.dataset_file, args.image_column, args.id_token,
                      args.skip_bad_videos, args.dataloader_num_workers, args.dataset_name, args.dataset_config_name,
                      args.dataset_revision, args.cache_dir)


def _buckets(args) -> Buckets | None:
    if not (args.height_buckets or args.width_buckets or args.frame_buckets or args.auto_buckets):
        return None
    return Buckets(tuple(args.height_buckets or [args.height]), tuple(args.width_buckets or [args.width]),
                   tuple(sorted(args.frame_buckets or [args.max_num_frames])),
                   args.height * args.width if args.auto_buckets else None)


def processes() -> int:
    """The processes of the run, as `accelerate launch` (or torchrun) tells each before accelerate starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _optimizer(args) -> OptimizerSettings:
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * processes()
    return OptimizerSettings(args.optimizer, learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                             args.adam_weight_decay, args.use_8bit_adam, args.prodigy_beta3, args.prodigy_decouple,
                             args.prodigy_use_bias_correction, args.prodigy_safeguard_warmup, args.lr_scheduler,
                             args.lr_warmup_steps, args.lr_num_cycles, args.lr_power)


def from_args(args) -> Settings:
    """Every setting of the run, from the parsed command line (which it leaves as it is)."""
    separator = args.validation_prompt_separator
    # --num_validation_videos 0 turns validation off, as --validation_prompt "" does (the wrapper scripts' way).
    validates = args.num_validation_videos > 0
    fp8_compute = split(args.fp8_compute, ",")
    return Settings(
        model=ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir),
        data=_data(args),
        frames=FrameSettings(args.height, args.width, args.fps, args.max_num_frames, args.skip_frames_start,
                             args.skip_frames_end, args.video_reshape_mode),
        buckets=_buckets(args),
        training=TrainingSettings(args.seed, args.train_batch_size, args.gradient_accumulation_steps,
                                  args.max_train_steps, args.num_train_epochs, args.random_flip,
                                  args.noised_image_dropout, args.max_grad_norm, args.checkpointing_steps,
                                  args.checkpoints_total_limit, args.validation_steps, args.validation_epochs,
                                  args.caption_dropout, args.checkpointing_minutes),
        lora=LoraSettings(args.rank, args.lora_alpha, tuple(split(args.lora_target_modules, ","))),
        optimizer=_optimizer(args),
        validation=ValidationSettings(
            tuple(split(args.validation_prompt, separator)) if validates else (),
            tuple(Path(p).expanduser() for p in split(args.validation_images, separator)) if validates else (),
            args.num_validation_videos, args.validation_num_inference_steps, args.guidance_scale,
            args.use_dynamic_cfg, args.max_num_frames, args.height, args.width, args.fps, args.seed, args.output_dir),
        memory=Request(
            Plan(args.checkpointing_policy if args.gradient_checkpointing else None, args.offload == "activations",
                 args.blocks_to_swap),
            args.offload == "auto", args.max_gpu_memory, args.compile_blocks,
            args.base_weights_dtype == "fp8" or "linear" in fp8_compute, "linear" in fp8_compute,
            args.use_8bit_adam, args.enable_tiling, args.enable_slicing),
        output=OutputSettings(args.output_dir, args.logging_dir, args.report_to, args.tracker_name,
                              resume_path(args.resume_from_checkpoint, args.output_dir),
                              HubPush(args.push_to_hub, args.hub_model_id, args.hub_token, args.push_checkpoints),
                              not args.no_comfyui_lora),
        mixed_precision=args.mixed_precision,
        attention_backend=args.attention_backend,
        ignore_learned_positional_embeddings=args.ignore_learned_positional_embeddings,
        allow_tf32=args.allow_tf32,
        nccl_timeout=args.nccl_timeout,
        latent_cache_dir=args.latent_cache_dir,
        dry_run=args.dry_run,
        heldout=HeldOutSettings(args.validation_loss_steps, args.validation_dataset, args.validation_split,
                                args.validation_loss_timesteps, args.seed),
    )
