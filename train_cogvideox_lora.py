#!/usr/bin/env python
"""Train a LoRA for a CogVideoX model: text- or image-to-video, 1.0 or 1.5.

    accelerate launch train_cogvideox_lora.py --pretrained_model_name_or_path THUDM/CogVideoX-2b \\
        --instance_data_root ~/disney --output_dir cogvideox-lora [--help for every flag]

The recipe: check the data, encode clips and prompts once (cached on disk), load the transformer and
add LoRA adapters, train, checkpoint, validate, save the LoRA for the model's stock diffusers pipeline.
"""

import json
import logging
import math
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from cogvideox_lora import (attention, checkpoints, disk, distributed, hub, launcher, memory, models, offload,
                            recompute)
from cogvideox_lora.args import parse_args, tracker_config, validation_images, validation_prompts
from cogvideox_lora.clip_index import ClipIndex
from cogvideox_lora.data import (Buckets, DatasetError, EpochOrder, FrameSettings, check_dataset, clip_settings,
                                 first_few, long_prompts)
from cogvideox_lora.latent_cache import LatentCache, encode_prompts, encode_videos
from cogvideox_lora.lora import add_lora, save_lora, trainable_parameters, uncast_adapter_inputs
from cogvideox_lora.loss import compute_loss, draw_batch, draw_image_latents, sample_seed, transformer_inputs
from cogvideox_lora.model_card import write_model_card
from cogvideox_lora.optim import make_optimizer
from cogvideox_lora.validation import Validator

logger = logging.getLogger("train_cogvideox_lora")



def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
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
    # 1. Data and settings: all is checked before any model is loaded (the settings alone in parse_args).
    hub.resolve_dataset(args)
    transformer_config, vae_config, text_encoder_config, family = models.read_configs(args)
    settings = FrameSettings.from_args(args, vae_config["temporal_compression_ratio"])
    buckets = Buckets.from_args(args)
    index = ClipIndex(args.latent_cache_dir)  # what earlier runs found of each unchanged clip
    with index.kept(create_on=checkpoints.Stopped):
        clips, bad_clips = check_dataset(args.instance_data_root, args.caption_column, args.video_column,
                                         args.dataset_file, args.id_token, args.image_column, settings,
                                         skip_bad=args.skip_bad_videos, buckets=buckets, index=index, stop=stop.check)
    # Each clip's own size and length: its bucket's, or --height, --width and --max_num_frames.
    per_clip = clip_settings(clips, settings, buckets)
    sizes = sorted({(s.max_num_frames, s.height, s.width) for s in per_clip}, key=lambda s: s[0] * s[1] * s[2])
    problems = family.problems(args, sizes, settings.temporal_compression)
    if problems:
        sys.exit("error: " + "\n  ".join(problems))
    if bad_clips:
        logger.warning("Leaving out %d clip(s) (--skip_bad_videos):\n  %s", len(bad_clips), "\n  ".join(bad_clips))
    tokenizer = models.load_tokenizer(args)
    too_long = long_prompts(clips, tokenizer, transformer_config["max_text_seq_length"])
    if too_long:
        logger.warning("%d prompt(s) have more tokens than the text encoder takes (%d); the rest is cut:\n  %s",
                       len(too_long), transformer_config["max_text_seq_length"], first_few(too_long))
    resume_from = checkpoints.checkpoint_to_resume(args.output_dir, args.resume_from_checkpoint)

    # The lr scheduler goes through prepare() (so accelerate reads it back with weights_only) and is stepped
    # once per optimizer step, however many processes there are.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout)
                                                if args.nccl_timeout else None)],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        sys.exit(f"error: WORLD_SIZE is {os.environ['WORLD_SIZE']} but this process runs alone; every process would "
                 f"write the same --output_dir. On a machine without GPUs start several processes with "
                 f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "fp16":
        sys.exit("error: under DeepSpeed the trainer runs fp16 without loss scaling, which underflows: use "
                 "--mixed_precision bf16.")
    device, weight_dtype = accelerator.device, models.DTYPES[accelerator.mixed_precision]
    if accelerator.mixed_precision == "fp16" and family.trained_in_bf16:
        logger.warning("fp16 with this model (rotary position embeddings: the CogVideoX-5B family, trained in bf16) "
                       "is known to give NaN losses: use --mixed_precision bf16.")
    val_prompts = validation_prompts(args)
    kernel = attention.choose(args.attention_backend, transformer_config["attention_head_dim"], weight_dtype)
    logger.info("Attention: %s", kernel.description)
    compile_blocks = torch.cuda.is_available() if args.compile_blocks is None else args.compile_blocks
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)

    def latent(frames, height, width):
        return (frames - 1) // settings.temporal_compression + 1, height // spatial, width // spatial

    available = torch.cuda.get_device_properties(device).total_memory / memory.GIB if torch.cuda.is_available() \
        else None
    budget = args.max_gpu_memory or available
    work, plan, needed = memory.from_args(
        args, transformer_config, latent(*sizes[-1]),
        latent(args.max_num_frames, args.height, args.width) if val_prompts else None, compile_blocks,
        weight_dtype.itemsize, budget)
    if plan.blocks_to_swap > transformer_config["num_layers"]:
        sys.exit(f"error: --blocks_to_swap {plan.blocks_to_swap}: the model has {transformer_config['num_layers']} "
                 f"blocks.")
    logger.info("Memory: %s (%s); offloading: %s. Estimated peak GPU memory: %s", plan, plan.flags(),
                memory.cost(work, plan), needed)
    if budget is not None and needed.total_gib > budget:
        logger.warning("The estimate exceeds the %.1f GiB this run may use: consider --offload auto, "
                       "--base_weights_dtype fp8, --use_8bit_adam or a lower --rank.", budget)
    if args.dry_run:
        return
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.max_gpu_memory and available:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_gpu_memory / available),
                                                   torch.cuda.current_device())
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 2. Encode once: each process encodes its share of what the cache lacks; the VAE and T5 are loaded
    #    only for that and freed before training, so they take no GPU memory while the transformer trains.
    cache = LatentCache(args.latent_cache_dir)
    index.save()
    peaks = memory.Peaks()  # encoding's peak apart, so that the training peak is the same with a warm cache
    model_id = {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
                "dtype": str(weight_dtype)}
    with peaks.part("encoding"):
        videos, encoded_clips, encoded_images = encode_videos(
            accelerator, cache, clips, per_clip,
            encoder_id={**model_id, "vae": vae_config, "tiling": args.enable_tiling, "slicing": args.enable_slicing},
            with_flipped=args.random_flip > 0, with_images=family.image_to_video,
            num_workers=args.dataloader_num_workers, load_vae=lambda: models.load_vae(args, weight_dtype, device),
            digest=index.digest, stop=stop.check)
        index.save()
        # T5-XXL (8.9 GiB in bf16) encodes on the CPU where it would not fit the GPU memory this run may use.
        text_device = device if budget is None or memory.text_encoder_bytes(
            text_encoder_config, weight_dtype.itemsize) / memory.GIB < 0.9 * budget else "cpu"
        prompts = list(dict.fromkeys([c.prompt for c in clips] + val_prompts + [""]))  # "" is the negative prompt
        embeds, encoded_prompts = encode_prompts(
            accelerator, cache, prompts, transformer_config["max_text_seq_length"],
            encoder_id={**model_id, "text_encoder": text_encoder_config},
            load_text_encoder=lambda: (tokenizer, models.load_text_encoder(args, weight_dtype, text_device)),
            stop=stop.check)
    prompt_entry = embeds  # read from the cache by prompt when asked for
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 3. The transformer, frozen in the training precision, with fp32 LoRA adapters.
    stop.check()
    loading = time.perf_counter()
    transformer = models.load_transformer(args, weight_dtype).requires_grad_(False)
    if args.ignore_learned_positional_embeddings and family.learned_positions:
        models.drop_learned_positional_embeddings(transformer)
    if args.base_weights_dtype == "fp8":
        models.store_base_weights_in_fp8(transformer, weight_dtype, device)
    set_seed(args.seed)  # the same fresh adapter in every process and every run with this seed
    lora_config = add_lora(transformer, args.rank, args.lora_alpha)
    uncast_adapter_inputs(transformer, weight_dtype)
    attention.use(transformer, kernel)
    swap = offload.BlockSwap(transformer.transformer_blocks, plan.blocks_to_swap, device) \
        if plan.blocks_to_swap else None
    if plan.checkpointing:
        recompute.enable(transformer, plan.checkpointing,
                         offload.ActivationOffload(device) if plan.offload_activations else None, swap)
    transformer.to(device)
    if compile_blocks:
        models.compile_blocks(transformer)
    model_load_seconds = time.perf_counter() - loading
    noise_scheduler = models.load_scheduler(args)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device, torch.float32)

    # 4. Steps, optimizer and schedule.
    shapes = [videos.shape(i) for i in range(len(videos))]
    global_batch = args.train_batch_size * accelerator.num_processes
    order = EpochOrder(shapes, global_batch, args.seed)
    batches_per_epoch = len(order.batches(0))
    if batches_per_epoch == 0:
        sys.exit(f"error: {len(clips)} clip(s) cannot fill one batch of {global_batch} "
                 f"(--train_batch_size x processes) from clips of one size ({len(sizes)} size(s)): lower "
                 f"--train_batch_size, add clips, or use fewer buckets.")
    ga = args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * batches_per_epoch / ga)
    optimizer = make_optimizer(trainable_parameters(transformer), args)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=args.lr_num_cycles,
                                 power=args.lr_power)
    distributed.configure_deepspeed(accelerator, args)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    checkpoints.register_lora_hooks(accelerator, transformer, lora_config)

    first_step = 0
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
        first_step = checkpoints.load_checkpoint(accelerator, resume_from)
        checkpoints.check_room(args.output_dir, min(first_step + args.checkpointing_steps, max_train_steps))
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s yet: starting a new run.", args.output_dir)

    validator = Validator(args, val_prompts, [prompt_entry[p]["prompt_embeds"] for p in val_prompts],
                          prompt_entry[""]["prompt_embeds"], noise_scheduler.config,
                          lambda: models.load_vae(args, weight_dtype, "cpu"), weight_dtype, family.pipeline_class,
                          validation_images(args) if family.image_to_video else None, swap=swap,
                          optimizer=None if accelerator.distributed_type == DistributedType.DEEPSPEED else optimizer,
                          peaks=peaks)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name, config=tracker_config(args))
    logger.info("%s model, %d clips, %d batches of %d per epoch, %d optimizer steps (accumulating %d), %s on %d "
                "process(es)", family.name, len(clips), batches_per_epoch, global_batch, max_train_steps, ga,
                weight_dtype, accelerator.num_processes)

    # 5. Train.
    data = TrainingData(clips, videos, prompt_entry, order, batches_per_epoch, vae_config["scaling_factor"], family,
                        alphas_cumprod)
    inputs = {}  # the transformer's inputs of each latent size
    step_times, first_step_at, last = [], None, time.perf_counter()
    progress = tqdm(range(first_step, max_train_steps), initial=first_step, total=max_train_steps, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    stop.check()
    stop.training = True
    for step in range(first_step, max_train_steps):
        if first_step_at is None:
            first_step_at = time.perf_counter() - started
        loss_sum, step_clips = accumulate_gradients(accelerator, transformer, args, data, step, weight_dtype, inputs)
        # A float under DeepSpeed, which clipped (and stepped) inside backward.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm),
                                    dtype=torch.float32, device=device)
        # One reduction and one host sync a step: every process learns the mean loss, the gradient norm (the
        # same in all) and whether any was signalled, so all stop at the same step.
        totals = accelerator.reduce(torch.stack([loss_sum, grad_norm,
                                                 torch.tensor(float(stop.requested), device=device)]),
                                    reduction="sum").tolist()
        step_loss, grad_norm = totals[0] / (accelerator.num_processes * ga), totals[1] / accelerator.num_processes
        stopping = totals[2] > 0
        # fp16's grad scaler skips the steps whose gradients overflow (that is how it finds its scale); without
        # it a non-finite gradient would put NaN into the adapter, and into the next checkpoint.
        if not math.isfinite(step_loss) or (accelerator.scaler is None and not math.isfinite(grad_norm)):
            accelerator.end_training()
            fault = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {grad_norm}"
            sys.exit(f"error: {fault} at step {step + 1} (clips: {', '.join(str(clips[i].video) for i in step_clips)})."
                     f" This step was not applied and nothing was saved from it; the checkpoints in "
                     f"{args.output_dir} are intact. Try a lower --learning_rate, or bf16 instead of fp16, or leave "
                     f"the clip out.")
        optimizer.step()  # under DeepSpeed a no-op: the engine stepped in backward (skipping non-finite gradients)
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "step_time_s": step_times[-1]}
        if torch.cuda.is_available():
            logs["peak_memory_allocated_gib"] = max(peaks.gib["training"][0],
                                                    torch.cuda.max_memory_allocated() / memory.GIB)
        accelerator.log(logs, step=step + 1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
        progress.update()

        done = step + 1
        if (done % args.checkpointing_steps == 0 or stopping) and done < max_train_steps:
            checkpoints.save_checkpoint(accelerator, args.output_dir, done, args.checkpoints_total_limit,
                                        None if stopping else min(done + args.checkpointing_steps, max_train_steps))
        if stopping and done < max_train_steps:
            accelerator.end_training()
            sys.exit(f"Stopped by a signal after step {done}; checkpoint-{done} is saved. Continue with the same "
                     f"command and --resume_from_checkpoint latest.")
        epochs_before, epochs_after = step * ga // batches_per_epoch, done * ga // batches_per_epoch
        if done < max_train_steps and (
                (args.validation_steps and done % args.validation_steps == 0)
                or (args.validation_epochs and epochs_after > epochs_before
                    and epochs_after % args.validation_epochs == 0)):
            validator.run(accelerator, transformer, done)
    progress.close()

    # 6. Save: the last checkpoint, the LoRA for inference, a summary of the run; then a last validation.
    if first_step < max_train_steps:
        checkpoints.save_checkpoint(accelerator, args.output_dir, max_train_steps, args.checkpoints_total_limit)
    if accelerator.is_main_process:
        lora_path = save_lora(accelerator.unwrap_model(transformer), args.output_dir, lora_config)
        logger.info("LoRA saved to %s", lora_path)
    # A row per process: what it encoded and its GPU's peak memory in training. Gathered before the last
    # validation, whose wait is the last one: a collective followed by processes ending at different
    # moments can leave gloo hanging in its shutdown.
    cuda = torch.cuda.is_available()
    per_process = accelerator.gather(torch.tensor(
        [[encoded_clips, encoded_images, encoded_prompts, *peaks.training()]], dtype=torch.float64, device=device))
    clips_encoded, images_encoded, prompts_encoded, allocated, reserved = per_process.T.tolist()
    video_paths = validator.run(accelerator, transformer, max_train_steps)
    if accelerator.is_main_process:
        timed = step_times[2:] if len(step_times) > 3 else step_times  # the first steps warm up kernels
        step_time = statistics.median(timed) if timed else None
        summary = {
            "steps": max_train_steps, "resumed_at_step": first_step, "clips": len(clips),
            "processes": accelerator.num_processes, "samples_per_step": global_batch * ga,
            "encoded_clips": int(sum(clips_encoded)), "encoded_images": int(sum(images_encoded)),
            "encoded_prompts": int(sum(prompts_encoded)), "encoded_clips_per_process": [int(n) for n in clips_encoded],
            "seconds_to_first_step": first_step_at, "model_load_seconds": model_load_seconds,
            "median_step_time_s": step_time,
            "samples_per_second": global_batch * ga / step_time if step_time else None,
            # Training steps alone (validation apart): the fullest GPU's, and each process's.
            "peak_memory_allocated_gib": max(allocated) if cuda else None,
            "peak_memory_reserved_gib": max(reserved) if cuda else None,
            "peak_memory_allocated_gib_per_process": allocated if cuda else None,
            # This process's: what its validation videos took, against its training steps.
            "peak_memory_validation_gib": peaks.validation()[0] if cuda and val_prompts else None,
            "peak_memory_decode_gib": peaks.gib["decoding"][0] if cuda and val_prompts else None,
            "peak_memory_encoding_gib": peaks.gib["encoding"][0] if cuda else None,
            "memory_plan": plan.flags(), "estimated_peak_gib": needed.total_gib,
            "estimated_training_gib": needed.training_gib, "estimated_validation_gib": needed.validation_gib,
            "attention": kernel.description,
            "lora": str(lora_path), "validation_videos": [str(p) for p in video_paths],
        }
        disk.write_text(Path(args.output_dir, "train_summary.json"), json.dumps(summary, indent=2))
        write_model_card(args, family, max_train_steps, video_paths)
        if args.push_to_hub:
            hub.push(args)
        for path in video_paths:
            logger.info("Validation video: %s", path)
    accelerator.end_training()


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


def accumulate_gradients(accelerator, transformer, args, data: TrainingData, step: int, weight_dtype, inputs: dict):
    """The forward and backward passes of the batches that optimizer step `step` accumulates; returns this process's
    summed loss and the clips of the step (all processes').

    The order of batches is a function of (seed, epoch), so a step number says which batch comes next, in one
    process or many. inputs caches the transformer's inputs of each latent size.
    """
    rank, batch_size, ga = accelerator.process_index, args.train_batch_size, args.gradient_accumulation_steps
    family, alphas_cumprod, device = data.family, data.alphas_cumprod, accelerator.device
    loss_sum, step_clips = torch.zeros((), device=device), []
    for micro_step in range(step * ga, (step + 1) * ga):
        epoch, index = divmod(micro_step, data.batches_per_epoch)
        global_ids = data.order.batches(epoch)[index]
        step_clips += global_ids
        mine = global_ids[rank * batch_size:(rank + 1) * batch_size]
        seeds = [sample_seed(args.seed, micro_step, rank * batch_size + j) for j in range(batch_size)]
        entries = [data.videos[i] for i in mine]
        batch = draw_batch(entries, [data.prompt_entry[data.clips[i].prompt] for i in mine], seeds,
                           data.scaling_factor, args.random_flip, len(alphas_cumprod), device, family.patch_size_t)
        size = tuple(batch[0].shape[i] for i in (1, 3, 4))  # latent frames, height, width
        if size not in inputs:
            inputs[size] = transformer_inputs(accelerator.unwrap_model(transformer).config, *size, device)
        # Image-to-video models also take each clip's first-frame latent (or nothing, at times).
        image_latents = draw_image_latents(
            entries, seeds, family.image_latent_scale, args.random_flip, len(alphas_cumprod),
            args.noised_image_dropout, size[0], device) if family.image_to_video else None
        # accelerate counts the batches: backward divides the loss by ga, and only the last batch of a
        # step all-reduces the gradients (DDP) or steps the optimizer inside backward (DeepSpeed).
        with accelerator.accumulate(transformer):
            loss = compute_loss(transformer, batch, alphas_cumprod, weight_dtype, inputs[size], image_latents)
            accelerator.backward(loss)
        loss_sum += loss.detach()
    return loss_sum, step_clips


if __name__ == "__main__":
    main()
