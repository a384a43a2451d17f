#!/usr/bin/env python
"""Train a LoRA for a CogVideoX model: text- or image-to-video, 1.0 or 1.5.

    accelerate launch train_cogvideox_lora.py --pretrained_model_name_or_path THUDM/CogVideoX-2b \\
        --instance_data_root ~/disney --output_dir cogvideox-lora [--help for every flag]

The recipe, one function a step: check the inputs (all that needs no model), plan memory, encode clips and
prompts once (cached on disk), build the transformer with LoRA adapters, run the steps (checkpointing and
validating), finish (the LoRA for the model's stock diffusers pipeline, a summary and a model card).
"""

import contextlib
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from cogvideox_lora import (attention, charts, checkpoints, compile_cache, device_memory, disk, distributed,
                            fp8_compute, heldout, host_memory, hub, launcher, lora, memory, models, run_record,
                            settings, transformer, writable)
from cogvideox_lora.args import parse_args, tracker_config
from cogvideox_lora.clip_index import ClipIndex
from cogvideox_lora.decoded import DecodedFrames
from cogvideox_lora.data import (DatasetError, EpochOrder, FrameSettings, check_dataset, clip_settings, first_few,
                                 long_prompts, unfillable_batch)
from cogvideox_lora.latent_cache import LatentCache, encode_prompts, encode_videos
from cogvideox_lora.lora import TrainedOn, save_lora, trainable_parameters
from cogvideox_lora.loss import (caption_dropped, compute_loss, draw_batch, draw_image_latents, sample_seed,
                                 transformer_inputs)
from cogvideox_lora.model_card import Results, write_model_card
from cogvideox_lora.optim import make_optimizer, make_schedule
from cogvideox_lora.placement import Placement, hold_to
from cogvideox_lora.validation import PipelineParts, Validator

logger = logging.getLogger("train_cogvideox_lora")


def main(argv=None):
    started = time.perf_counter()
    # First of all: under a single-process accelerate launch on a terminal, Ctrl-C reaches the trainer alone from
    # here on, and the launcher waits for it to stop instead of dying of it.
    with launcher.holding_the_terminal(), objects_kept_out_of_full_collections():
        _main(argv, started)


@contextlib.contextmanager
def objects_kept_out_of_full_collections():
    """What the imports made (half a million objects of torch, diffusers...) lives as long as the run: kept out of
    the garbage collector's full passes, each of which walked all of it (a warm start of 20,000 clips makes enough
    new objects for two such passes: 0.8 s of its 3 s). Given back at the end, for a caller that goes on (the tests
    run the trainer in their process, many times)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _main(argv, started: float):
    args = parse_args(argv)
    compile_cache.keep_on_disk()
    device_memory.note_others()  # before this process's CUDA context: what the GPUs hold that is not this run's
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with launcher.last_words(), attention.preferred_sdpa(args.attention_backend), checkpoints.StopSignal() as stop:
        try:
            train(args, started, stop)
        except (DatasetError, models.ModelError, checkpoints.CheckpointError, attention.AttentionError,
                memory.DoesNotFit, disk.DiskFull) as e:
            sys.exit(f"error: {e}")
        except checkpoints.Stopped:
            sys.exit(f"Stopped by a signal before training: nothing was trained; the clips checked and latents "
                     f"encoded so far are kept in {args.latent_cache_dir}. Continue with the same command.")


def train(args, started: float, stop: checkpoints.StopSignal):
    inputs = check_inputs(args, stop)
    accelerator = start_accelerator(inputs.run)
    plan = plan_memory(inputs, accelerator)
    if inputs.run.dry_run:
        return
    encoded = encode_once(inputs, accelerator, plan, stop)
    model = build_transformer(inputs, accelerator, plan, encoded, stop)
    timing = run_steps(inputs, accelerator, model, encoded, stop, started)
    finish(inputs, accelerator, plan, encoded, model, timing)


class Inputs(NamedTuple):
    """All that is known before any model loads: the settings, the model's configs and the checked dataset."""

    run: settings.Settings
    frames: FrameSettings
    transformer_config: dict
    vae_config: dict
    text_encoder_config: dict
    family: models.Family
    clips: list
    per_clip: list  # each clip's FrameSettings: its bucket's, or the run's
    sizes: list  # the (frames, height, width) trained (and held out) at, smallest first
    tokenizer: object
    resume_from: Path | None
    tracker_config: dict
    record: run_record.RunRecord  # written into each checkpoint, checked on resume
    heldout_clips: list  # the held-out loss's clips (none without it)
    heldout_per_clip: list
    index: ClipIndex  # what earlier runs found of each unchanged clip, and its digest
    decoded: DecodedFrames  # the check's frames of clips this process encodes, within a budget, for encoding


def check_inputs(args, stop: checkpoints.StopSignal) -> Inputs:
    """Everything that needs no model, checked before any loads: the push, the dataset, the model's configs."""
    run = settings.from_args(args)
    unusable = hub.push_problems(run.output.push) + writable.run_problems(run.output, run.latent_cache_dir)
    if unusable:
        sys.exit("error: " + "\n  ".join(unusable))
    model, model_problem = find_model(run)
    # The dataset is checked even where the model is not found, so that one message says all there is to fix.
    try:
        data = hub.resolve_dataset(run.data)
        frames = replace(run.frames, temporal_compression=model.vae["temporal_compression_ratio"]) if model \
            else run.frames
        index, decoded = ClipIndex(run.latent_cache_dir), DecodedFrames.for_this_process()
        with index.kept(create_on=checkpoints.Stopped):
            clips, bad_clips = check_dataset(data.root, data.caption_column, data.video_column, data.dataset_file,
                                             data.id_token, data.image_column, frames, skip_bad=data.skip_bad,
                                             buckets=run.buckets, index=index, stop=stop.check, decoded=decoded)
    except DatasetError as e:
        sys.exit(f"error: {e}" + (f"\nand the model: {model_problem}" if model_problem else ""))
    if model_problem:
        raise models.ModelError(model_problem)
    run = replace(run, data=data, model=model.source)
    clips, heldout_clips = heldout.choose_clips(run.heldout, data, frames, run.buckets, clips)
    per_clip, heldout_per_clip = (clip_settings(c, frames, run.buckets) for c in (clips, heldout_clips))
    sizes = sorted({(s.max_num_frames, s.height, s.width) for s in per_clip + heldout_per_clip},
                   key=lambda s: s[0] * s[1] * s[2])
    problems = model.family.problems(run.model.path, run.validation.prompts, run.validation.images,
                                     run.ignore_learned_positional_embeddings, sizes, frames.temporal_compression)
    problems += lora.target_problems(run.lora.target_modules, model.transformer)
    unfilled = unfillable_batch(per_clip, run.training.batch_size, settings.processes())
    if unfilled:
        problems.append(unfilled)
    if problems:
        sys.exit("error: " + "\n  ".join(problems))
    if not run.validation.prompts:
        logger.info("Validation is off (%s): no validation videos are made.",
                    "--num_validation_videos 0" if args.num_validation_videos == 0 else "no --validation_prompt"
                    if args.validation_prompt is None else f"--validation_prompt {args.validation_prompt!r}")
    if bad_clips:
        logger.warning("Leaving out %d clip(s) (--skip_bad_videos):\n  %s", len(bad_clips), "\n  ".join(bad_clips))
    tokenizer = count_prompt_tokens(run, model, clips + heldout_clips)
    resume_from = checkpoints.checkpoint_to_resume(run.output.output_dir, run.output.resume_from_checkpoint)
    record = record_of(run, model, clips)
    if resume_from is not None:
        problems = run_record.resume_problems(resume_from, record)
        if problems:
            raise checkpoints.CheckpointError("\n  ".join(problems))
    return Inputs(run, frames, model.transformer, model.vae, model.text_encoder, model.family, clips, per_clip,
                  sizes, tokenizer, resume_from, tracker_config(args), record, heldout_clips, heldout_per_clip, index,
                  decoded)


def record_of(run: settings.Settings, model: models.Configs, clips: list) -> run_record.RunRecord:
    training, frames = run.training, run.frames
    return run_record.RunRecord(
        run_record.describe_model(model.family.name, model.transformer),
        run_record.describe_size(frames.max_num_frames, frames.height, frames.width, run.buckets),
        run.lora.rank, run.lora.alpha, settings.processes(), training.batch_size,
        training.gradient_accumulation_steps, run_record.clip_digests(clips, run.data.root))


def find_model(run: settings.Settings) -> tuple[models.Configs | None, str | None]:
    """The model's configs, or why they cannot be read. A dry run needs its configs alone."""
    try:
        model = models.check_model(run.model, loading=not run.dry_run)
    except models.ModelError as e:
        return None, str(e)
    if model.source.files and model.source.files != model.source.path:
        logger.info("Model %s: read from %s", model.source.path, model.source.files)
    return model, None


def count_prompt_tokens(run: settings.Settings, model: models.Configs, clips: list):
    """Warns of prompts the text encoder cuts; returns the tokenizer (None where a dry run has none to read)."""
    if run.dry_run and not model.has_tokenizer:
        logger.warning("Prompt lengths not counted: %s has no tokenizer/ here, and --dry_run reads only the "
                       "configs.", run.model.path)
        return None
    tokenizer = models.load_tokenizer(run.model)
    limit = model.transformer["max_text_seq_length"]
    too_long = long_prompts(clips, tokenizer, limit)
    if too_long:
        logger.warning("%d prompt(s) have more tokens than the text encoder takes (%d); the rest is cut:\n  %s",
                       len(too_long), limit, first_few(too_long))
    return tokenizer


def start_accelerator(run: settings.Settings) -> Accelerator:
    # The lr scheduler goes through prepare() (so accelerate reads it back with weights_only) and is stepped
    # once per optimizer step, however many processes there are.
    output = run.output
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=run.training.gradient_accumulation_steps,
        log_with=None if output.report_to == "none" else output.report_to,
        project_config=ProjectConfiguration(project_dir=output.output_dir,
                                            logging_dir=os.path.join(output.output_dir, output.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run.nccl_timeout)
                                                if run.nccl_timeout else None)],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        sys.exit(f"error: WORLD_SIZE is {os.environ['WORLD_SIZE']} but this process runs alone; every process would "
                 f"write the same --output_dir. On a machine without GPUs start several processes with "
                 f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "fp16":
        sys.exit("error: under DeepSpeed the trainer runs fp16 without loss scaling, which underflows: use "
                 "--mixed_precision bf16.")
    return accelerator


class MemoryPlan(NamedTuple):
    """How the run uses the GPU: precision, attention kernel, compiled blocks and the placement of its tensors."""

    weight_dtype: torch.dtype
    kernel: attention.Choice
    compile_blocks: bool
    placement: Placement
    needed: memory.MemoryEstimate
    budget_gib: float | None  # what this process may take of the card (device-level), None without a GPU or cap
    host: host_memory.HostEstimate


def plan_memory(inputs: Inputs, accelerator) -> MemoryPlan:
    """The memory plan (--offload auto: the least offloading that fits), logged before any model loads."""
    run, config = inputs.run, inputs.transformer_config
    device, weight_dtype = accelerator.device, models.DTYPES[accelerator.mixed_precision]
    if accelerator.mixed_precision == "fp16" and inputs.family.trained_in_bf16:
        logger.warning("fp16 with this model (rotary position embeddings: the CogVideoX-5B family, trained in bf16) "
                       "is known to give NaN losses: use --mixed_precision bf16.")
    kernel = attention.choose(run.attention_backend, config["attention_head_dim"], weight_dtype)
    logger.info("Attention: %s", kernel.description)
    compile_blocks = torch.cuda.is_available() if run.memory.compile_blocks is None else run.memory.compile_blocks
    plan_compute(run.memory.fp8_linear, device, accelerator.mixed_precision, compile_blocks, kernel.kernel)
    card = device_memory.budget(run.memory.max_gpu_memory, device)
    budget = None if card is None else card.limit_gib
    validation = run.validation
    work, plan, needed = memory.plan_for(
        run.memory, config, latent_size(inputs, *inputs.sizes[-1]),
        latent_size(inputs, validation.num_frames, validation.height, validation.width) if validation.prompts
        else None, run.training.batch_size, run.lora.rank, compile_blocks, weight_dtype.itemsize, budget,
        (memory.CONTEXT_AND_KERNELS_GIB if card is None else card.overhead_gib) + memory.ALLOCATOR_SLACK_GIB,
        lora.adapter_features(run.lora.target_modules, config))
    if plan.blocks_to_swap > config["num_layers"]:
        sys.exit(f"error: --blocks_to_swap {plan.blocks_to_swap}: the model has {config['num_layers']} blocks.")
    logger.info("Memory: %s (%s); offloading: %s. Estimated peak GPU memory: %s%s", plan, plan.flags(),
                memory.cost(work, plan), needed, "" if budget is None else f", of the {budget:.1f} GiB this run may take")
    if budget is not None and needed.total_gib > budget:
        logger.warning("The estimate exceeds the %.1f GiB this run may use: consider --offload auto, "
                       "--base_weights_dtype fp8, --use_8bit_adam or a lower --rank.", budget)
    host = check_host_memory(inputs, work, plan, needed, budget, weight_dtype)
    if not run.dry_run:
        if accelerator.is_main_process:
            os.makedirs(run.output.output_dir, exist_ok=True)
        hold_to(card.allocator_gib if card is not None and card.capped else None, device)
        if run.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    # The card's figure of each part's peak (NVML keeps none): sampled from here on.
    peaks = memory.Peaks() if run.dry_run else \
        memory.Peaks(device_memory.Sampler(device).start(), host_memory.ResidentPeak())
    return MemoryPlan(weight_dtype, kernel, compile_blocks, Placement(plan, device, peaks, card, work, run.memory.plan),
                      needed, budget, host)


def plan_compute(fp8_linear: bool, device, mixed_precision: str, compile_blocks: bool, kernel: str | None) -> None:
    """Logs what the step computes in float8 and when its kernels compile; float8 the GPU cannot run stops here."""
    if fp8_linear:
        unable = fp8_compute.problem(device, mixed_precision)
        if unable:
            sys.exit(f"error: {unable}")
        logger.info("Compute: float8 products for the frozen attention and feed-forward weights (--fp8_compute "
                    "linear); the adapter, norms and attention in %s.", mixed_precision)
    kernels = compile_cache.describe(compile_blocks, kernel == "flash4")
    if kernels:
        logger.info(kernels)


def check_host_memory(inputs: Inputs, work, plan, needed, budget, weight_dtype) -> host_memory.HostEstimate:
    """The host memory the plan needs, logged; a plan that does not fit what the machine has available stops here,
    before anything loads."""
    text_encoder = memory.text_encoder_bytes(inputs.text_encoder_config, weight_dtype.itemsize) / memory.GIB
    on_cpu = text_encoder_on_cpu(inputs, budget, weight_dtype)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = host_memory.estimate(work, plan, needed, text_encoder if on_cpu else 0.0, processes)
    available = host_memory.available_gib()
    logger.info("Host memory: the run needs %s%s.", host,
                "" if available is None else f", of {available:.1f} GiB available")
    refused = host_memory.refusal(work, plan, needed, text_encoder if on_cpu else 0.0, available, processes)
    if refused:
        sys.exit(f"error: {refused}")
    return host


def text_encoder_on_cpu(inputs: Inputs, budget: float | None, weight_dtype) -> bool:
    """T5-XXL (8.9 GiB in bf16) encodes on the CPU where it would not fit the GPU memory this run may take."""
    return budget is not None and memory.text_encoder_bytes(
        inputs.text_encoder_config, weight_dtype.itemsize) / memory.GIB >= 0.9 * budget


def latent_size(inputs: Inputs, frames: int, height: int, width: int) -> tuple[int, int, int]:
    spatial = 2 ** (len(inputs.vae_config["block_out_channels"]) - 1)
    return (frames - 1) // inputs.frames.temporal_compression + 1, height // spatial, width // spatial


class Encoded(NamedTuple):
    """The cached latents of every clip and the T5 embeddings of every prompt (validation's and "" too)."""

    videos: Sequence[dict]  # latent_cache.Entries, each read from the cache when its batch comes
    prompt_entry: Mapping[str, dict]  # prompt -> its cache entry
    heldout_videos: Sequence[dict]  # the held-out clips' entries
    counts: tuple[int, int, int]  # clips, images and prompts this process encoded


def encode_once(inputs: Inputs, accelerator, plan: MemoryPlan, stop: checkpoints.StopSignal) -> Encoded:
    """Each process encodes its share of what the cache lacks; the VAE and T5 are loaded only for that and freed
    before training, so they take no GPU memory while the transformer trains. A signal stops it between entries,
    keeping those encoded."""
    run, device, dtype = inputs.run, accelerator.device, plan.weight_dtype
    cache = LatentCache(run.latent_cache_dir)
    inputs.index.save()
    model_id = {"model": run.model.path, "revision": run.model.revision, "variant": run.model.variant,
                "dtype": str(dtype)}
    # Encoding's peak apart, so that the training peak is the same with a warm cache.
    with plan.placement.peaks.part("encoding"):
        videos, encoded_clips, encoded_images = encode_videos(
            accelerator, cache, inputs.clips + inputs.heldout_clips, inputs.per_clip + inputs.heldout_per_clip,
            encoder_id={**model_id, "vae": inputs.vae_config, "tiling": run.memory.tiled_vae,
                        "slicing": run.memory.sliced_vae},
            with_flipped=run.training.random_flip > 0, with_images=inputs.family.image_to_video,
            num_workers=run.data.num_workers,
            load_vae=lambda: models.load_vae(run.model, dtype, device, run.memory.tiled_vae, run.memory.sliced_vae),
            digest=inputs.index.digest, stop=stop.check, decoded=inputs.decoded)
        inputs.index.save()
        text_device = "cpu" if text_encoder_on_cpu(inputs, plan.budget_gib, dtype) else device
        prompts = list(dict.fromkeys([c.prompt for c in inputs.clips + inputs.heldout_clips]
                                     + list(run.validation.prompts) + [""]))
        embeds, encoded_prompts = encode_prompts(
            accelerator, cache, prompts, inputs.transformer_config["max_text_seq_length"],
            encoder_id={**model_id, "text_encoder": inputs.text_encoder_config},
            load_text_encoder=lambda: (inputs.tokenizer, models.load_text_encoder(run.model, dtype, text_device)),
            stop=stop.check)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trained = len(inputs.clips)
    # Entries read from the cache when asked for: host memory holds keys, not latents.
    return Encoded(videos[:trained], embeds, videos[trained:], (encoded_clips, encoded_images, encoded_prompts))


class Model(NamedTuple):
    """The transformer being trained and what steps it: optimizer, schedule, the step to start from."""

    transformer: torch.nn.Module
    lora_config: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    alphas_cumprod: torch.Tensor
    first_step: int
    max_train_steps: int
    order: EpochOrder  # the batches of each epoch
    batches_per_epoch: int
    validator: Validator
    load_seconds: float
    weight_dtype: torch.dtype
    heldout: heldout.HeldOutLoss | None  # None without the held-out loss
    history: heldout.LossHistory


def build_transformer(inputs: Inputs, accelerator, plan: MemoryPlan, encoded: Encoded,
                      stop: checkpoints.StopSignal) -> Model:
    """The frozen transformer in the training precision with fp32 LoRA adapters (transformer.prepare's order),
    its optimizer and schedule through accelerate, resumed where asked; and the validation videos' maker."""
    run, training = inputs.run, inputs.run.training
    stop.check()
    loading = time.perf_counter()
    spec = transformer.TransformerSpec(
        plan.weight_dtype, run.lora.rank, run.lora.alpha, training.seed, run.memory.fp8_base_weights,
        run.memory.fp8_linear, run.ignore_learned_positional_embeddings and inputs.family.learned_positions,
        plan.kernel.kernel,
        plan.compile_blocks, run.lora.target_modules)
    with plan.placement.peaks.part("loading"):
        model, lora_config = transformer.build(run.model, spec, plan.placement)
    load_seconds = time.perf_counter() - loading
    scheduler = models.load_scheduler(run.model)

    global_batch = training.batch_size * accelerator.num_processes
    order = EpochOrder(encoded.videos.shapes_by(inputs.per_clip), global_batch, training.seed)
    batches_per_epoch = len(order.batches(0))  # > 0: check_inputs made sure
    max_train_steps = training.max_train_steps or math.ceil(
        training.num_train_epochs * batches_per_epoch / training.gradient_accumulation_steps)
    optimizer = make_optimizer(trainable_parameters(model), run.optimizer)
    lr_scheduler = make_schedule(optimizer, run.optimizer, max_train_steps)
    distributed.configure_deepspeed(accelerator, training.batch_size, training.gradient_accumulation_steps,
                                    training.max_grad_norm)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    checkpoints.register_lora_hooks(accelerator, model, lora_config, trained_on(inputs), run.output.comfyui_lora)
    first_step = 0
    if inputs.resume_from is not None:
        logger.info("Resuming from %s", inputs.resume_from)
        first_step = checkpoints.load_checkpoint(accelerator, inputs.resume_from)
        checkpoints.check_room(run.output.output_dir, min(first_step + training.checkpointing_steps, max_train_steps))
    elif run.output.resume_from_checkpoint:
        logger.info("No checkpoint in %s yet: starting a new run.", run.output.output_dir)

    parts = PipelineParts(inputs.family.pipeline_class, scheduler.config,
                          lambda: models.load_vae(run.model, plan.weight_dtype, "cpu", run.memory.tiled_vae,
                                                  run.memory.sliced_vae), plan.weight_dtype)
    validator = Validator(run.validation, [encoded.prompt_entry[p]["prompt_embeds"] for p in run.validation.prompts],
                          encoded.prompt_entry[""]["prompt_embeds"], parts, plan.placement,
                          None if accelerator.distributed_type == DistributedType.DEEPSPEED else optimizer)
    if accelerator.is_main_process:
        accelerator.init_trackers(run.output.tracker_name, config=inputs.tracker_config)
    logger.info("%s model, %d clips, %d batches of %d per epoch, %d optimizer steps (accumulating %d), %s on %d "
                "process(es)", inputs.family.name, len(inputs.clips), batches_per_epoch, global_batch,
                max_train_steps, training.gradient_accumulation_steps, plan.weight_dtype, accelerator.num_processes)
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device, torch.float32)
    return Model(model, lora_config, optimizer, lr_scheduler, alphas_cumprod, first_step, max_train_steps, order,
                 batches_per_epoch, validator, load_seconds, plan.weight_dtype,
                 heldout_loss(inputs, plan, encoded, alphas_cumprod),
                 heldout.LossHistory.resumed(run.output.output_dir, inputs.resume_from))


def heldout_loss(inputs: Inputs, plan: MemoryPlan, encoded: Encoded, alphas_cumprod) -> heldout.HeldOutLoss | None:
    """What evaluates the held-out loss of the cached held-out clips, or None without it."""
    if not inputs.run.heldout.enabled:
        return None
    return heldout.HeldOutLoss(inputs.run.heldout, encoded.heldout_videos,
                               [encoded.prompt_entry[c.prompt] for c in inputs.heldout_clips], inputs.family,
                               inputs.vae_config["scaling_factor"], alphas_cumprod, plan.weight_dtype,
                               inputs.run.training.batch_size, plan.placement)


def trained_on(inputs: Inputs) -> TrainedOn:
    """What the LoRA is trained on, recorded in every LoRA file it is saved to (cli_demo.py reads it)."""
    run, family = inputs.run, inputs.family
    return TrainedOn(family.name, family.generate_type, family.version, run.model.path, run.frames.height,
                     run.frames.width, run.frames.max_num_frames, run.ignore_learned_positional_embeddings)


class Timing(NamedTuple):
    step_times: list[float]
    seconds_to_first_step: float | None  # from main() to the first step's start
    first_step_done_at: float | None  # wall-clock time (time.time()) when the first step, compilation included, ended


def run_steps(inputs: Inputs, accelerator, model: Model, encoded: Encoded, stop: checkpoints.StopSignal,
              started: float) -> Timing:
    """The optimizer steps, checkpointing and validating on the way; a signal checkpoints and stops the run."""
    run, training, device = inputs.run, inputs.run.training, accelerator.device
    ga, output_dir = training.gradient_accumulation_steps, run.output.output_dir
    data = TrainingData(inputs.clips, encoded.videos, encoded.prompt_entry, model.order,
                        model.batches_per_epoch, inputs.vae_config["scaling_factor"], inputs.family,
                        model.alphas_cumprod, model.weight_dtype, training)
    inputs_of_size = {}  # the transformer's inputs of each latent size
    step_times, first_step_at, first_step_done_at = [], None, None
    clock = checkpoints.CheckpointClock(training.checkpointing_minutes)
    if model.heldout is not None and model.first_step < model.max_train_steps:
        model.history.base = model.heldout.evaluate(accelerator, model.transformer, base=True)
        accelerator.log({"heldout_loss_base": model.history.base}, step=model.first_step)
        logger.info("Held-out loss of the base model: %.6f", model.history.base)
    progress = tqdm(range(model.first_step, model.max_train_steps), initial=model.first_step,
                    total=model.max_train_steps, desc="Steps", disable=not accelerator.is_local_main_process)
    stop.check()
    stop.training = True  # from here a signal checkpoints after the step
    for step in range(model.first_step, model.max_train_steps):
        begun = time.perf_counter()  # a step's time leaves out the evaluations, checkpoints and videos before it
        first_step_at = begun - started if first_step_at is None else first_step_at
        loss_sum, step_clips = accumulate_gradients(accelerator, model.transformer, data, step, inputs_of_size)
        # A float under DeepSpeed, which clipped (and stepped) inside backward.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.transformer.parameters(),
                                                                training.max_grad_norm),
                                    dtype=torch.float32, device=device)
        # The first step has loaded the kernels: the plan against the card's overhead as measured now.
        checked = model.validator.placement.recheck() if step == model.first_step else memory.Recheck()
        if checked.message and not checked.stop:
            logger.info(checked.message)
        # One reduction and one host sync a step: every process learns the mean loss, the gradient norm (the
        # same in all), whether any was signalled or ran short of memory and whether the main process's clock says
        # to checkpoint, so all stop and checkpoint at the same step.
        flags = torch.tensor([float(stop.requested), float(checked.stop),
                              float(accelerator.is_main_process and clock.due())], device=device)
        totals = accelerator.reduce(torch.cat([torch.stack([loss_sum, grad_norm]), flags]), reduction="sum").tolist()
        step_loss, grad_norm = totals[0] / (accelerator.num_processes * ga), totals[1] / accelerator.num_processes
        stopping, timed = totals[2] > 0, totals[4] > 0
        if totals[3] > 0:
            accelerator.end_training()
            sys.exit(f"error: {checked.message or 'another process would run out of GPU memory: its log says why.'}")
        # fp16's grad scaler skips the steps whose gradients overflow (that is how it finds its scale); without
        # it a non-finite gradient would put NaN into the adapter, and into the next checkpoint.
        if not math.isfinite(step_loss) or (accelerator.scaler is None and not math.isfinite(grad_norm)):
            accelerator.end_training()
            fault = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {grad_norm}"
            sys.exit(f"error: {fault} at step {step + 1} (clips: "
                     f"{', '.join(str(inputs.clips[i].video) for i in step_clips)}). This step was not applied and "
                     f"nothing was saved from it; the checkpoints in {output_dir} are intact. Try a lower "
                     f"--learning_rate, or bf16 instead of fp16, or leave the clip out.")
        model.optimizer.step()  # under DeepSpeed a no-op: the engine stepped in backward (skipping non-finite grads)
        model.lr_scheduler.step()
        model.optimizer.zero_grad(set_to_none=True)

        step_times.append(time.perf_counter() - begun)
        first_step_done_at = first_step_done_at or time.time()
        log_step(accelerator, model, progress, step, step_loss, grad_norm, step_times[-1])
        done = step + 1
        checkpointing = (done % training.checkpointing_steps == 0 or stopping or timed) and done < model.max_train_steps
        # A signal's checkpoint goes first: a preempted machine may have seconds left.
        if model.heldout is not None and not stopping and done < model.max_train_steps and (
                checkpointing or run.heldout.steps and done % run.heldout.steps == 0):
            evaluate_heldout(accelerator, model, done)
        if checkpointing:
            save_checkpoint(accelerator, inputs, model, done,
                            None if stopping else min(done + training.checkpointing_steps, model.max_train_steps))
            clock.restart()
        if stopping and done < model.max_train_steps:
            accelerator.end_training()
            sys.exit(f"Stopped by a signal after step {done}; checkpoint-{done} is saved. Continue with the same "
                     f"command and --resume_from_checkpoint latest.")
        if done < model.max_train_steps and validates_after(training, step, model.batches_per_epoch):
            model.validator.run(accelerator, model.transformer, done)
    progress.close()
    return Timing(step_times, first_step_at, first_step_done_at)


def log_step(accelerator, model: Model, progress, step: int, loss: float, grad_norm: float, seconds: float) -> None:
    model.history.train.append((step + 1, loss))
    logs = {"loss": loss, "lr": model.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm, "step_time_s": seconds}
    if torch.cuda.is_available():
        logs["peak_memory_allocated_gib"] = max(model.validator.placement.peaks.gib["training"][0],
                                                torch.cuda.max_memory_allocated() / memory.GIB)
    accelerator.log(logs, step=step + 1)
    heldout_shown = {"heldout": f"{model.history.heldout[-1][1]:.4f}"} if model.history.heldout else {}
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.2e}", **heldout_shown)
    progress.update()


def evaluate_heldout(accelerator, model: Model, step: int) -> None:
    """The held-out loss after optimizer step `step`: into the history, the trackers and the log."""
    loss = model.heldout.evaluate(accelerator, model.transformer)
    model.history.heldout.append((step, loss))
    accelerator.log({"heldout_loss": loss}, step=step)
    logger.info("Held-out loss after step %d: %.6f (base model: %.6f)", step, loss, model.history.base)


def save_checkpoint(accelerator, inputs: Inputs, model: Model, step: int, next_step: int | None = None) -> None:
    """checkpoint-`step` with what the run trains with (checked on resume) and its losses; pruning old ones leaves
    the best. next_step: the next checkpoint's, whose room on the disk is checked now."""
    checkpoints.save_checkpoint(accelerator, inputs.run.output.output_dir, step,
                                inputs.run.training.checkpoints_total_limit, inputs.record,
                                model.history.checkpointed(step), model.history.best and model.history.best[0],
                                next_step)


def validates_after(training: settings.TrainingSettings, step: int, batches_per_epoch: int) -> bool:
    """Whether optimizer step `step` (0-based) ends where --validation_steps or --validation_epochs validate."""
    done, ga = step + 1, training.gradient_accumulation_steps
    epochs_before, epochs_after = step * ga // batches_per_epoch, done * ga // batches_per_epoch
    return bool((training.validation_steps and done % training.validation_steps == 0)
                or (training.validation_epochs and epochs_after > epochs_before
                    and epochs_after % training.validation_epochs == 0))


def finish(inputs: Inputs, accelerator, plan: MemoryPlan, encoded: Encoded, model: Model, timing: Timing) -> None:
    """The last checkpoint, the LoRA for inference, a last validation, a summary of the run and its model card."""
    run, output_dir, steps = inputs.run, inputs.run.output.output_dir, model.max_train_steps
    if model.first_step < steps:
        if model.heldout is not None:
            evaluate_heldout(accelerator, model, steps)
        save_checkpoint(accelerator, inputs, model, steps)
    if accelerator.is_main_process:
        lora_path = save_lora(accelerator.unwrap_model(model.transformer), output_dir, model.lora_config,
                              trained_on(inputs), run.output.comfyui_lora)
        logger.info("LoRA saved to %s", lora_path)
    # A row per process: what it encoded and its GPU's peak memory in training. Gathered before the last
    # validation, whose wait is the last one: a collective followed by processes ending at different
    # moments can leave gloo hanging in its shutdown.
    peaks = plan.placement.peaks
    per_process = accelerator.gather(torch.tensor([[*encoded.counts, *peaks.training()]], dtype=torch.float64,
                                                  device=accelerator.device))
    video_paths = model.validator.run(accelerator, model.transformer, steps)
    if accelerator.is_main_process:
        summary = run_summary(inputs, accelerator, plan, model, timing, per_process.T.tolist())
        summary.update(measured_memory(plan))
        gib = lambda key: "unknown" if summary[key] is None else f"{summary[key]:.2f} GiB"  # noqa: E731
        logger.info("Peak memory on the card (NVML): training %s, validation %s; PyTorch's allocated: training %s, "
                    "validation %s; host: %s (resident %s, pinned %s)", gib("peak_device_memory_gib"),
                    gib("peak_device_memory_validation_gib"), gib("peak_memory_allocated_gib"),
                    gib("peak_memory_validation_gib"), gib("peak_host_memory_gib"), gib("peak_host_rss_gib"),
                    gib("host_pinned_gib"))
        summary.update(lora=str(lora_path), validation_videos=[str(p) for p in video_paths],
                       heldout_clips=[str(c.video) for c in inputs.heldout_clips], **model.history.summary(),
                       heldout_seconds=model.heldout and model.heldout.seconds)
        disk.write_text(Path(output_dir, "train_summary.json"), json.dumps(summary, indent=2))
        history = model.history
        chart = charts.loss_chart(Path(output_dir, "loss.png"), history.train, history.heldout, history.base) \
            if history.train else None
        write_model_card(run, inputs.family, steps, video_paths,
                         Results(tuple(model.validator.base_videos or ()), chart, summary["heldout_loss"],
                                 history.base, history.best_checkpoint, summary["best_heldout_loss"]),
                         accelerator.num_processes)
        if run.output.push.enabled:
            hub.push(run.output)
        for path in video_paths:
            logger.info("Validation video: %s", path)
    accelerator.end_training()


def run_summary(inputs: Inputs, accelerator, plan: MemoryPlan, model: Model, timing: Timing, per_process) -> dict:
    """train_summary.json's figures; per_process: the columns of each process's counts and training peaks."""
    clips_encoded, images_encoded, prompts_encoded, allocated, reserved = per_process
    cuda, validates, peaks = torch.cuda.is_available(), bool(inputs.run.validation.prompts), plan.placement.peaks
    samples = inputs.run.training.batch_size * accelerator.num_processes * inputs.run.training.gradient_accumulation_steps
    timed = timing.step_times[2:] if len(timing.step_times) > 3 else timing.step_times  # the first warm up kernels
    step_time = statistics.median(timed) if timed else None
    return {
        "steps": model.max_train_steps, "resumed_at_step": model.first_step, "clips": len(inputs.clips),
        "processes": accelerator.num_processes, "samples_per_step": samples,
        "encoded_clips": int(sum(clips_encoded)), "encoded_images": int(sum(images_encoded)),
        "encoded_prompts": int(sum(prompts_encoded)), "encoded_clips_per_process": [int(n) for n in clips_encoded],
        "seconds_to_first_step": timing.seconds_to_first_step, "first_step_done_at": timing.first_step_done_at,
        "model_load_seconds": model.load_seconds,
        "median_step_time_s": step_time, "samples_per_second": samples / step_time if step_time else None,
        # Training steps alone (validation apart): the fullest GPU's, and each process's.
        "peak_memory_allocated_gib": max(allocated) if cuda else None,
        "peak_memory_reserved_gib": max(reserved) if cuda else None,
        "peak_memory_allocated_gib_per_process": allocated if cuda else None,
        # This process's: what its validation videos took, against its training steps.
        "peak_memory_validation_gib": peaks.validation()[0] if cuda and validates else None,
        "peak_memory_decode_gib": peaks.gib["decoding"][0] if cuda and validates else None,
        "peak_memory_encoding_gib": peaks.gib["encoding"][0] if cuda else None,
        "peak_memory_heldout_gib": peaks.gib["heldout"][0] if cuda and model.heldout is not None else None,
        "memory_plan": plan.placement.plan.flags(), "estimated_peak_gib": plan.needed.total_gib,
        "estimated_training_gib": plan.needed.training_gib, "estimated_validation_gib": plan.needed.validation_gib,
        "attention": plan.kernel.description,
    }


def measured_memory(plan: MemoryPlan) -> dict:
    """train_summary.json's device-level and host figures of this process: the card's peaks as NVML counts them
    (None without a GPU or NVML), the context and kernels beside the allocator, and the host's peak resident and
    pinned memory (pinned pages may be counted in the resident ones too: their sum is an upper bound), the
    resident peak of each part of the run too."""
    placement = plan.placement
    rss, pinned = placement.peaks.host_peak() or host_memory.peak_rss_gib(), placement.pinned_gib()
    return {
        "peak_device_memory_gib": placement.peaks.device_gib["training"],
        "peak_device_memory_validation_gib": placement.peaks.device_validation(),
        "peak_device_memory_loading_gib": placement.peaks.device_gib["loading"],
        "peak_host_rss_gib_by_part": placement.peaks.host_gib,
        "device_overhead_gib": device_memory.overhead_gib(placement.device),
        "gpu_memory_limit_gib": plan.budget_gib,
        "estimated_allocator_gib": plan.needed.allocator_gib, "estimated_host_gib": plan.host.peak_gib,
        "peak_host_rss_gib": rss, "host_pinned_gib": pinned, "peak_host_memory_gib": rss + pinned,
    }


class TrainingData(NamedTuple):
    """What the steps draw their batches from: the clips, their cached latents and prompt embeddings."""

    clips: list
    videos: Sequence[dict]  # latent_cache.Entries: each read from the cache when its batch comes
    prompt_entry: Mapping[str, dict]
    order: EpochOrder
    batches_per_epoch: int
    scaling_factor: float
    family: models.Family
    alphas_cumprod: torch.Tensor
    weight_dtype: torch.dtype
    training: settings.TrainingSettings


def accumulate_gradients(accelerator, transformer, data: TrainingData, step: int, inputs: dict):
    """The forward and backward passes of the batches that optimizer step `step` accumulates; returns this process's
    summed loss and the clips of the step (all processes').

    The order of batches is a function of (seed, epoch), so a step number says which batch comes next, in one
    process or many. inputs caches the transformer's inputs of each latent size.
    """
    training, family, alphas_cumprod, device = data.training, data.family, data.alphas_cumprod, accelerator.device
    rank, batch_size, ga = accelerator.process_index, training.batch_size, training.gradient_accumulation_steps
    loss_sum, step_clips = torch.zeros((), device=device), []
    for micro_step in range(step * ga, (step + 1) * ga):
        epoch, index = divmod(micro_step, data.batches_per_epoch)
        global_ids = data.order.batches(epoch)[index]
        step_clips += global_ids
        mine = global_ids[rank * batch_size:(rank + 1) * batch_size]
        seeds = [sample_seed(training.seed, micro_step, rank * batch_size + j) for j in range(batch_size)]
        entries = [data.videos[i] for i in mine]
        # --caption_dropout: the empty prompt's embedding for some samples, drawn from each sample's seed.
        prompts = [data.prompt_entry["" if caption_dropped(s, training.caption_dropout) else data.clips[i].prompt]
                   for i, s in zip(mine, seeds)]
        batch = draw_batch(entries, prompts, seeds, data.scaling_factor, training.random_flip, len(alphas_cumprod),
                           device, family.patch_size_t)
        size = tuple(batch[0].shape[i] for i in (1, 3, 4))  # latent frames, height, width
        if size not in inputs:
            inputs[size] = transformer_inputs(accelerator.unwrap_model(transformer).config, *size, device)
        # Image-to-video models also take each clip's first-frame latent (or nothing, at times).
        image_latents = draw_image_latents(
            entries, seeds, family.image_latent_scale, training.random_flip, len(alphas_cumprod),
            training.noised_image_dropout, size[0], device) if family.image_to_video else None
        # accelerate counts the batches: backward divides the loss by ga, and only the last batch of a
        # step all-reduces the gradients (DDP) or steps the optimizer inside backward (DeepSpeed).
        with accelerator.accumulate(transformer):
            loss = compute_loss(transformer, batch, alphas_cumprod, data.weight_dtype, inputs[size], image_latents)
            accelerator.backward(loss)
        loss_sum += loss.detach()
    return loss_sum, step_clips


if __name__ == "__main__":
    main()
