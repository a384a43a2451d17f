"""How much GPU memory training (and its validation videos) will take, from the configs alone, before anything is
loaded; and the least offloading that fits a budget."""

import contextlib
from dataclasses import dataclass, replace

import torch

GIB = 2**30

# Activations a transformer block keeps for its backward pass, in units of one [tokens, width] bf16
# tensor. Fitted to peaks measured at 49x480x720 (BENCHMARKS.md): eager 2B without checkpointing kept ~19 such
# tensors a block on an H100, compiled blocks ~13.6 on the H200 (fused elementwise ops keep fewer).
ACTIVATIONS_PER_BLOCK = {False: 19.4, True: 13.6}
# What a block's backward holds beyond that with full checkpointing inside the compiled block (recompute.inside:
# no offloading, no swapping), where the recompute runs within the compiled backward: fitted to the H200 peaks
# of 2B, 5B and 1.5-5B, 3.5, 1.1 and 5.8 such tensors above the estimate without it (BENCHMARKS.md). With
# keep_attention, inside the blocks, the peaks are within 2 % of the estimate without it.
RECOMPUTED_INSIDE = 4
# Checkpointed inputs on the GPU at once with activation offloading: the block's own, the prefetched one and
# those whose copy to the host is still under way (fitted to the 2B, 5B and 1.5-5B rows on the H200).
INPUTS_IN_FLIGHT = 6
# What one block's forward pass without gradients holds at once, per sample, in the same units (eager, as
# validation runs: fp32 norms and rotary products, the 4x feed-forward): fitted to the validation peaks of 2B,
# 5B and 1.5-5B on the H200, measured apart from the VAE's decode (19.4 to 23.4, BENCHMARKS.md).
INFERENCE_PER_BLOCK = 21.0
# The VAE's tiled decode: its weights (CogVideoX's VAEs: 216 M parameters), its working set at the default tiles
# (240x360 pixels, two latent frames at a time; with them the decode took about 4.3 GiB at 49x480x720 whatever
# the transformer, BENCHMARKS.md, as diffusers' own estimate in tiled_decode says), which scales with a tile's
# area, and the decoded tiles and video, about three times the video in bf16.
VAE_WEIGHTS_GIB = 0.4
VAE_TILE_WORKING_GIB = 3.6
VAE_TILE = (240, 360)
DECODED_VIDEO_COPIES = 3
TILE_SCALES = (1.0, 0.5, 0.25)
OVERHEAD_GIB = 0.4  # cuBLAS/cuDNN workspaces, the loss and the small tensors around the blocks
# What the card holds beyond the allocator's reservations (device-level, as nvidia-smi counts it): the CUDA context and
# the kernels cuDNN, cuBLAS, Triton and FlashAttention load, 757-762 MiB (device - memory_reserved) in every
# uncapped row on an H100 (issue 27), rounded up. Before the first CUDA work part of it is not loaded yet: the
# plan assumes the larger of this and what is measured then plus KERNELS_TO_LOAD_GIB, and measures again after
# the first step (recheck). KERNELS_TO_LOAD_GIB and ALLOCATOR_SLACK_GIB are not measured yet: starting values for
# benchmarks/card_rows.sh's rows (device peak, overhead after the first step) to correct.
CONTEXT_AND_KERNELS_GIB = 0.76
KERNELS_TO_LOAD_GIB = 0.25
# Room between the tensors' peak and what the allocator reserves for them (rounding to its blocks, fragments
# that expandable segments leave): the plan keeps it free under the cap.
ALLOCATOR_SLACK_GIB = 0.25
# Pinned host-to-GPU copies measured on the H200 machine (51.6 GiB/s, BENCHMARKS.md); a PCIe 4 x16 card gets
# about half, which is what is assumed.
HOST_LINK_GIB_PER_S = 25.0


@dataclass(frozen=True)
class Plan:
    """Where a step keeps what it needs: gradient checkpointing (None, "full" or "keep_attention"), the checkpointed
    inputs on the host, and how many blocks' frozen weights stream in from the host."""

    checkpointing: str | None = None
    offload_activations: bool = False
    blocks_to_swap: int = 0

    def __str__(self) -> str:
        parts = [f"gradient checkpointing ({self.checkpointing})" if self.checkpointing else "no gradient checkpointing"]
        if self.offload_activations:
            parts.append("activations offloaded")
        if self.blocks_to_swap:
            parts.append(f"{self.blocks_to_swap} blocks swapped")
        return ", ".join(parts)

    def flags(self) -> str:
        """The command-line flags that give this plan."""
        flags = [] if not self.checkpointing else ["--gradient_checkpointing"] + (
            [f"--checkpointing_policy {self.checkpointing}"] if self.checkpointing != "full" else [])
        flags += ["--offload activations"] if self.offload_activations else []
        flags += [f"--blocks_to_swap {self.blocks_to_swap}"] if self.blocks_to_swap else []
        return " ".join(flags) or "(none)"


@dataclass(frozen=True)
class Request:
    """What the command line asks of memory: a plan, or (auto) the least offloading under max_gpu_memory."""

    plan: Plan
    auto: bool = False
    max_gpu_memory: float | None = None
    compile_blocks: bool | None = None  # None: on with a GPU
    fp8_base_weights: bool = False
    fp8_linear: bool = False  # --fp8_compute linear (which stores the weights as fp8_base_weights does)
    use_8bit_adam: bool = False
    tiled_vae: bool = False
    sliced_vae: bool = False


@dataclass(frozen=True)
class Workload:
    """What is trained, at which size (latent frames, height, width of the largest batch), and what is validated
    (the validation videos' latent size, or None)."""

    config: dict
    latent: tuple[int, int, int]
    batch_size: int
    rank: int
    compiled: bool
    weight_bytes: float
    optimizer_state_bytes: float  # per adapter weight: 8 for Adam, 2 for 8-bit Adam
    float8_blocks: bool = False  # the attention and feed-forward weights (12 w^2 a block) take one byte each
    float8_products: bool = False  # and their products run in float8 (fp8_compute): no bf16 copy of them is made
    validation_latent: tuple[int, int, int] | None = None
    tiled_vae: bool = True
    overhead_gib: float = 0.0  # what the card holds beyond the tensors: context, kernels, the allocator's slack
    # A block's adapter parameters per unit of rank (lora.adapter_features); None: the default targets q, k, v, out.
    adapter_features: int | None = None


@dataclass
class MemoryEstimate:
    weights_gib: float
    adapter_gib: float
    activations_gib: float
    validation_gib: float | None  # the whole peak while validation videos are made
    overhead_gib: float = 0.0  # Workload.overhead_gib: on the card, beside the allocator's tensors
    weights_to_host_gib: float = 0.0  # frozen weights that wait in host memory while validation videos decode

    @property
    def training_gib(self) -> float:
        return self.weights_gib + self.adapter_gib + self.activations_gib + OVERHEAD_GIB

    @property
    def allocator_gib(self) -> float:
        """The peak of PyTorch's allocated tensors, training or validation (what torch.cuda counts)."""
        return max(self.training_gib, self.validation_gib or 0.0)

    @property
    def total_gib(self) -> float:
        """The device-level peak (as nvidia-smi counts it), context and kernels included."""
        return self.allocator_gib + self.overhead_gib

    def __str__(self) -> str:
        text = (f"about {self.total_gib:.1f} GiB: training {self.training_gib:.1f} (frozen weights "
                f"{self.weights_gib:.1f}, LoRA with gradients and optimizer states {self.adapter_gib:.1f}, "
                f"activations {self.activations_gib:.1f}, other {OVERHEAD_GIB:.1f})")
        text += f", validation videos {self.validation_gib:.1f}" if self.validation_gib else ""
        return text + (f", CUDA context, kernels and allocator slack {self.overhead_gib:.1f}" if self.overhead_gib
                       else "")


def _width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def transformer_parameters(config: dict) -> int:
    """Parameter count of a CogVideoXTransformer3DModel from its config (blocks, embeddings, output)."""
    width = _width(config)
    time_dim, text_dim = config["time_embed_dim"], config["text_embed_dim"]
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    embeddings = config["in_channels"] * p * p * p_t * width + text_dim * width + 2 * time_dim * width
    output = width * p * p * p_t * config["out_channels"] + 2 * width * time_dim
    return config["num_layers"] * _block_parameters(config) + embeddings + output


def _block_parameters(config: dict) -> int:
    # q, k, v, out (4 w^2), a 4x feed-forward (8 w^2), two adaptive norms of 6 w from the time embedding.
    width = _width(config)
    return 12 * width**2 + 12 * width * config["time_embed_dim"]


def block_bytes(config: dict, weight_bytes: float, float8_blocks: bool) -> float:
    """One block's frozen weights, as stored."""
    width = _width(config)
    return _block_parameters(config) * weight_bytes - (12 * width**2 * (weight_bytes - 1) if float8_blocks else 0)


def _tokens(config: dict, latent: tuple[int, int, int]) -> int:
    frames, height, width = latent
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    # 1.5 patches latent frames in pairs, after the pipelines pad an odd count with one frame.
    return config["max_text_seq_length"] + -(-frames // p_t) * (height // p) * (width // p)


def estimate(work: Workload, plan: Plan) -> MemoryEstimate:
    config, layers = work.config, work.config["num_layers"]
    width = _width(config)
    tokens = _tokens(config, work.latent)
    one_tensor = work.batch_size * tokens * width * 2
    block = ACTIVATIONS_PER_BLOCK[work.compiled] * one_tensor
    if plan.checkpointing is None:
        activations = layers * block
    else:
        # Each block's input, on the GPU or (a few in flight) on the host; one block's activations at a time.
        kept_inputs = INPUTS_IN_FLIGHT if plan.offload_activations else layers
        activations = kept_inputs * one_tensor + block
        if plan.checkpointing == "full" and not plan.offload_activations and not plan.blocks_to_swap:
            activations += RECOMPUTED_INSIDE * one_tensor
        if plan.checkpointing == "keep_attention":
            heads = config["num_attention_heads"]
            activations += layers * (one_tensor + work.batch_size * heads * tokens * 4)  # output and fp32 lse
    one_block = block_bytes(config, work.weight_bytes, work.float8_blocks)
    weights = transformer_parameters(config) * work.weight_bytes - (
        layers * (work.weight_bytes * _block_parameters(config) - one_block))
    swapped = min(plan.blocks_to_swap, layers)
    weights -= (swapped - min(2, swapped)) * one_block  # two slots stay on the GPU
    # With fp8 storage, the dequantized weights of the block being run, in training and in validation alike;
    # with fp8 products, the backward's transposed float8 copies of them instead.
    dequantized = 12 * width**2 * (1 if work.float8_products else work.weight_bytes) if work.float8_blocks else 0
    activations += dequantized
    adapter = layers * (work.adapter_features or 4 * 2 * width) * work.rank  # A and B of each targeted layer
    adapter_gib = adapter * (4 + 4 + work.optimizer_state_bytes) / GIB
    training = weights / GIB + adapter_gib + activations / GIB + OVERHEAD_GIB
    validation, to_host = None, 0.0
    # The held-out loss (heldout.py) needs no room of its own: a forward pass of a training batch in eval mode
    # without gradients, which holds one block's activations at a time, less than the training forward keeps.
    if work.validation_latent is not None:
        # The optimizer states wait on the host meanwhile and the gradients are freed: the adapter's weights stay.
        # Guidance's two samples go through the transformer one at a time (validation.py).
        with_weights = (weights + adapter * 4) / GIB + OVERHEAD_GIB
        denoising = with_weights + (INFERENCE_PER_BLOCK * _tokens(config, work.validation_latent) * width * 2
                                    + dequantized) / GIB
        without_weights = with_weights - (weights - min(2, swapped) * one_block) / GIB  # the slots stay
        decoding = decode_plan(with_weights, without_weights, work.validation_latent, training,
                               1.0 if work.tiled_vae else untiled_scale(work.validation_latent))
        validation = max(denoising, decoding.peak_gib)
        to_host = with_weights - without_weights if decoding.weights_on_host else 0.0
    return MemoryEstimate(weights_gib=weights / GIB, adapter_gib=adapter_gib, activations_gib=activations / GIB,
                          validation_gib=validation, overhead_gib=work.overhead_gib,
                          weights_to_host_gib=to_host)


def vae_decode_gib(latent: tuple[int, int, int], tile_scale: float = 1.0) -> float:
    """GPU memory of the VAE's tiled decode of a video of this latent size (frames, height, width), with tiles of
    tile_scale times the default's sides."""
    frames, height, width = latent
    video_bytes = ((frames - 1) * 4 + 1) * 3 * height * 8 * width * 8 * 2
    return VAE_WEIGHTS_GIB + VAE_TILE_WORKING_GIB * tile_scale**2 + DECODED_VIDEO_COPIES * video_bytes / GIB


def untiled_scale(latent) -> float:
    """The tile scale (against VAE_TILE) of a decode in one tile, as a VAE without tiling decodes."""
    _, height, width = latent
    return max(1.0, height * 8 / VAE_TILE[0], width * 8 / VAE_TILE[1])


@dataclass(frozen=True)
class DecodePlan:
    weights_on_host: bool
    tile_scale: float
    peak_gib: float


def decode_plan(with_weights_gib: float, without_weights_gib: float, latent, limit_gib: float,
                configured_scale: float = 1.0) -> DecodePlan:
    """How a validation video decodes under limit_gib (training's peak), given what the GPU holds before the decode
    with the transformer's frozen weights and without them, and the tile scale the VAE is set to (untiled_scale()
    without tiling): as it is, if that fits; else with the weights on the host, at that scale or, if need be,
    smaller tiles (the first that fits, else the smallest)."""
    if with_weights_gib + vae_decode_gib(latent, configured_scale) <= limit_gib:
        return DecodePlan(False, configured_scale, with_weights_gib + vae_decode_gib(latent, configured_scale))
    scales = [configured_scale] + [s for s in TILE_SCALES if s < configured_scale]
    scale = next((s for s in scales if without_weights_gib + vae_decode_gib(latent, s) <= limit_gib), scales[-1])
    return DecodePlan(True, scale, without_weights_gib + vae_decode_gib(latent, scale))


def plan_for(request: "Request", config: dict, latent, validation_latent, batch_size: int, rank: int,
             compiled: bool, weight_bytes: float, budget_gib: float | None,
             overhead_gib: float = CONTEXT_AND_KERNELS_GIB + ALLOCATOR_SLACK_GIB,
             adapter_features: int | None = None) -> tuple[Workload, Plan, MemoryEstimate]:
    """The workload of a run (what is trained at its largest latent size, and what is validated, or None) and the
    plan it asks for (with auto: the first whose device-level peak, overhead_gib beside the tensors, fits
    budget_gib); adapter_features: Workload's."""
    work = Workload(config, latent, batch_size, rank, compiled, weight_bytes=weight_bytes,
                    optimizer_state_bytes=2 if request.use_8bit_adam else 8, float8_blocks=request.fp8_base_weights,
                    float8_products=request.fp8_linear,
                    validation_latent=validation_latent, tiled_vae=request.tiled_vae, overhead_gib=overhead_gib,
                    adapter_features=adapter_features)
    plan, needed = fit(work, request.plan, budget_gib, auto=request.auto)
    if budget_gib is not None and budget_gib <= overhead_gib:
        raise DoesNotFit(f"{budget_gib:.2f} GiB of GPU memory leaves nothing for PyTorch's tensors beside the CUDA "
                         f"context, kernels and allocator slack ({overhead_gib:.2f} GiB): allow more with "
                         f"--max_gpu_memory (the card's size, as nvidia-smi counts it), or free GPU memory.")
    return work, plan, needed


def text_encoder_bytes(config: dict, weight_bytes: float) -> float:
    """A T5 encoder's weights, from its config (T5-XXL: 4.7 B parameters)."""
    inner = config["num_heads"] * config["d_kv"]
    feed_forward = (3 if "gated" in config.get("feed_forward_proj", "") else 2) * config["d_model"] * config["d_ff"]
    layer = 4 * config["d_model"] * inner + feed_forward
    return (config["vocab_size"] * config["d_model"] + config["num_layers"] * layer) * weight_bytes


def pinned_bytes(work: Workload, plan: Plan) -> tuple[float, float]:
    """The pinned host memory of the plan's offloading: the checkpointed activations' buffers and the swapped
    blocks' frozen weights."""
    config, layers = work.config, work.config["num_layers"]
    one_tensor = work.batch_size * _tokens(config, work.latent) * _width(config) * 2
    activations = layers * one_tensor if plan.offload_activations else 0.0
    return activations, block_bytes(config, work.weight_bytes, work.float8_blocks) * min(plan.blocks_to_swap, layers)


def cost(work: Workload, plan: Plan) -> str:
    """What the plan's offloading takes: pinned host memory and copies per step."""
    activations, swapped = pinned_bytes(work, plan)
    # Activations go out and back; swapped weights come in for the forward pass and again for the recompute.
    host, copied = activations + swapped, 2 * (activations + swapped)
    if not copied:
        return "no offloading"
    return (f"{host / GIB:.1f} GiB of pinned CPU memory; {copied / GIB:.1f} GiB copied a step (about "
            f"{copied / GIB / HOST_LINK_GIB_PER_S:.2f} s at {HOST_LINK_GIB_PER_S:g} GiB/s, on a side stream behind the "
            f"blocks' compute)")


def ladder(plan: Plan, layers: int) -> list[Plan]:
    """The given plan, then ever more offloading: checkpointing, the activations, then 1 to all blocks swapped."""
    plans = [plan]
    if plan.checkpointing is None:
        plans.append(replace(plan, checkpointing="full"))
    if not plans[-1].offload_activations:
        plans.append(replace(plans[-1], offload_activations=True))
    plans += [replace(plans[-1], blocks_to_swap=n) for n in range(plans[-1].blocks_to_swap + 1, layers + 1)]
    return plans


class DoesNotFit(Exception):
    """No offloading makes the run fit the GPU memory it may use."""


def fit(work: Workload, plan: Plan, budget_gib: float | None, auto: bool) -> tuple[Plan, MemoryEstimate]:
    """The plan to train with and its estimate: `plan`, or with auto the first of its ladder that fits budget_gib."""
    if not auto or budget_gib is None:
        return plan, estimate(work, plan)
    plans = ladder(plan, work.config["num_layers"])
    for candidate in plans:
        needed = estimate(work, candidate)
        if needed.total_gib <= budget_gib:
            return candidate, needed
    raise DoesNotFit(
        f"--offload auto: nothing fits in {budget_gib:.1f} GiB; the least, {plans[-1]}, needs {needed}. Lower the "
        f"need with --base_weights_dtype fp8, --use_8bit_adam, a lower --rank, or smaller --height/--width/"
        f"--max_num_frames (and validation sizes), or allow more with --max_gpu_memory.")


def assumed_overhead(measured_gib: float | None) -> float:
    """The context and kernels to plan for, before the first step: CONTEXT_AND_KERNELS_GIB, or what is measured
    (the context, before most kernels load) and KERNELS_TO_LOAD_GIB, whichever is more."""
    return max(CONTEXT_AND_KERNELS_GIB, (measured_gib or 0.0) + KERNELS_TO_LOAD_GIB)


@dataclass(frozen=True)
class Budget:
    """The card memory a run may take, device-level (--max_gpu_memory, or what was free at start, whichever is
    less), and the context and kernels it planned for beside the allocator."""

    limit_gib: float
    overhead_gib: float
    capped: bool  # --max_gpu_memory given: the allocator is held to allocator_gib

    @property
    def allocator_gib(self) -> float:
        """What PyTorch's allocator may reserve: the limit but the context and kernels."""
        return self.limit_gib - self.overhead_gib


@dataclass(frozen=True)
class Recheck:
    """What the overhead measured after the first step means for the run: budget, the one to hold the allocator
    to from now on (None: as it is); message, a line to log; stop, whether the run must end with it as an error."""

    budget: Budget | None = None
    message: str | None = None
    stop: bool = False


def recheck(work: Workload, asked: Plan, plan: Plan, budget: Budget, measured_gib: float) -> Recheck:
    """The plan against the context and kernels measured after the first step (measured_gib), where it was made with
    budget.overhead_gib: as it was if that was enough (or if the plan never fitted: the start said so); the
    allocator held tighter if it still fits; else a stop naming the plan that would fit, from `asked` on."""
    if measured_gib <= budget.overhead_gib:
        return Recheck()
    planned = estimate(work, plan)
    measured = replace(work, overhead_gib=work.overhead_gib - budget.overhead_gib + measured_gib)
    needed = estimate(measured, plan)
    tighter = replace(budget, overhead_gib=measured_gib)
    said = (f"After the first step the CUDA context and kernels take {measured_gib:.2f} GiB, not the "
            f"{budget.overhead_gib:.2f} planned for")
    if planned.total_gib > budget.limit_gib:
        return Recheck()
    if needed.total_gib <= budget.limit_gib:
        return Recheck(tighter if budget.capped else None,
                       f"{said}: the plan still fits the {budget.limit_gib:.1f} GiB (about {needed.total_gib:.1f}).")
    try:
        fits, fitted = fit(measured, asked, budget.limit_gib, auto=True)
        advice = (f"{fits.flags()} would fit (about {fitted.total_gib:.1f} GiB): rerun with those flags in place of "
                  f"--offload auto or the plan's")
    except DoesNotFit as e:
        advice = str(e)
    return Recheck(message=f"{said}: {plan} needs about {needed.total_gib:.1f} GiB of the {budget.limit_gib:.1f} "
                           f"this run may take, and would run out of memory; {advice}.", stop=True)


class Peaks:
    """Peak GPU memory (allocated, reserved) of each part of a run: "encoding" (what the cache lacked, before
    training), "loading" (the transformer), "training", "validation" and, within it, "decoding" (the VAE's), and
    "heldout" (the held-out loss). PyTorch keeps one peak, so it is read and reset as a part begins and ends. With a
    sampler (device_memory.Sampler), the process's device-level peak of each part too, and with a host reader
    (host_memory.ResidentPeak), its resident host memory's (None where unknown)."""

    def __init__(self, sampler=None, host=None):
        self.gib = {part: (0.0, 0.0) for part in ("encoding", "loading", "training", "validation", "decoding",
                                                   "heldout")}
        self.device_gib: dict[str, float | None] = dict.fromkeys(self.gib)
        # The host's since the process started (the dataset check, its decoded frames kept) apart from training's.
        self.host_gib: dict[str, float | None] = {"starting": host and host.take(), **dict.fromkeys(self.gib)}
        self.sampler, self.host = sampler, host
        self.current = "training"

    def _read(self, part: str) -> tuple[float, float]:
        if torch.cuda.is_available():
            now = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
            self.gib[part] = tuple(map(max, self.gib[part], now))
            torch.cuda.reset_peak_memory_stats()
        for counts, reader in ((self.device_gib, self.sampler), (self.host_gib, self.host)):
            now = None if reader is None else reader.take()
            if now is not None:
                counts[part] = max(counts[part] or 0.0, now)
        return self.gib[part]

    @contextlib.contextmanager
    def part(self, name: str):
        outer = self.current
        self._read(outer)
        self.current = name
        try:
            yield
        finally:
            self._read(name)
            self.current = outer

    def training(self) -> tuple[float, float]:
        return self._read("training")

    def host_peak(self) -> float | None:
        """The host's resident peak of the run so far (None without a host reader): the most of its parts', since
        starting each part again also starts the kernel's whole-process figure (ru_maxrss) again."""
        self._read(self.current)
        known = [gib for gib in self.host_gib.values() if gib is not None]
        return max(known) if known else None

    def validation(self) -> tuple[float, float]:
        """Validation's peaks, its decoding included."""
        return tuple(map(max, self.gib["validation"], self.gib["decoding"]))

    def device_validation(self) -> float | None:
        """Validation's device-level peak, its decoding included (None where unknown)."""
        known = [g for g in (self.device_gib["validation"], self.device_gib["decoding"]) if g is not None]
        return max(known) if known else None
