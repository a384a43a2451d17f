"""Where a run's tensors live: the one owner of the memory plan once it is made (memory.py makes it).

It applies a memory.Plan to the transformer (block swap, activation offload, gradient checkpointing), holds the
process to its GPU memory cap (the card's, but the CUDA context and kernels: memory.Budget, checked again after the
first step), measures each part's peak (memory.Peaks; the card's figure too, device_memory), and makes room for validation videos:
the optimizer's state waits on the host, guidance's two samples go one at a time, and the VAE's decode stays under
training's peak (memory.decode_plan) with the transformer's frozen weights on the host and smaller tiles where
that is needed.
"""

import contextlib
import logging

import torch

from . import device_memory, recompute
from .memory import GIB, VAE_TILE, Budget, Peaks, Plan, Recheck, Workload, decode_plan, recheck, untiled_scale
from .offload import ActivationOffload, BlockSwap, frozen_tensors, on_host

logger = logging.getLogger(__name__)


class Placement:
    """A memory.Plan for one device. apply() sets it up on the transformer; validating() and generating() make room
    for validation videos."""

    def __init__(self, plan: Plan, device, peaks: Peaks | None = None, budget: Budget | None = None,
                 work: Workload | None = None, asked: Plan | None = None):
        """budget, work and asked (the plan the command line asked for): what recheck() weighs the plan with."""
        self.plan, self.device = plan, torch.device(device)
        self.peaks = peaks or Peaks()
        self.budget, self.work, self.asked = budget, work, asked
        self.swap: BlockSwap | None = None
        self.offload: ActivationOffload | None = None
        self.decoding = None  # the last decode plan, to say when it changes

    def apply(self, transformer) -> None:
        """Block swap and gradient checkpointing as the plan says. Call it before the transformer moves to the
        device (swapped blocks' weights stay on the host) and before its blocks are compiled."""
        if self.plan.blocks_to_swap:
            self.swap = BlockSwap(transformer.transformer_blocks, self.plan.blocks_to_swap, self.device)
        if self.plan.checkpointing:
            self.offload = ActivationOffload(self.device) if self.plan.offload_activations else None
            recompute.enable(transformer, self.plan.checkpointing, self.offload, self.swap)

    def pinned_gib(self) -> float:
        """The host memory the offloading holds now: the swapped blocks' weights and the activations' buffers."""
        swapped = [] if self.swap is None else [t for tensors in self.swap.host.values() for t in tensors]
        buffers = [] if self.offload is None else list(self.offload.buffers.values())
        return sum(t.nbytes for t in swapped + buffers) / GIB

    def recheck(self) -> Recheck:
        """After the first step: the plan against the context and kernels measured now (memory.recheck), the
        allocator held tighter where that is enough. Nothing without a GPU, NVML or budget."""
        measured = device_memory.overhead_gib(self.device)
        if measured is None or self.budget is None or self.work is None:
            return Recheck()
        checked = recheck(self.work, self.asked or self.plan, self.plan, self.budget, measured)
        if checked.budget is not None:
            self.budget = checked.budget
            hold_to(checked.budget.allocator_gib, self.device)
        return checked

    @contextlib.contextmanager
    def validating(self, optimizer=None):
        """Validation's part of the run, measured apart; optimizer: one whose state may wait on the host meanwhile
        (None under DeepSpeed, whose engine keeps its own)."""
        with self.peaks.part("validation"), optimizer_state_on_host(optimizer):
            yield

    @contextlib.contextmanager
    def evaluating(self, transformer):
        """The held-out loss's forward passes (no gradients, so no checkpoint loads swapped blocks: they load as
        they are called), measured apart."""
        swapping = contextlib.nullcontext() if self.swap is None else \
            self.swap.inference(transformer.transformer_blocks)
        with self.peaks.part("heldout"), swapping:
            yield

    @contextlib.contextmanager
    def generating(self, pipe):
        """Room for the pipeline's videos: swapped blocks load as they are called, guidance's two samples go one at
        a time, and the decode keeps under training's peak."""
        swapping = contextlib.nullcontext() if self.swap is None else \
            self.swap.inference(pipe.transformer.transformer_blocks)
        self._decode_with_room(pipe)
        with swapping, one_sample_at_a_time(pipe.transformer):
            yield

    def _decode_with_room(self, pipe) -> None:
        """The pipeline's decode, measured apart, kept under training's peak as memory.decode_plan says."""
        decode, transformer, vae = pipe.decode_latents, pipe.transformer, pipe.vae
        keep = [] if self.swap is None else [transformer.transformer_blocks[i] for i in self.swap.order]
        weights = frozen_tensors(transformer, keep)
        weights_gib = sum(t.nbytes for _, _, t in weights) / GIB

        def decode_latents(latents):
            with self.peaks.part("decoding"):
                room, scale = contextlib.nullcontext(), None  # as it is, where there is no GPU to make room on
                held = gpu_held_gib()
                if held is not None:
                    latent = (latents.shape[1], *latents.shape[3:])
                    configured = 1.0 if vae.use_tiling else untiled_scale(latent)
                    plan = decode_plan(held, held - weights_gib, latent, self.peaks.gib["training"][0], configured)
                    if plan.weights_on_host:
                        room = on_host(weights)
                        if plan != self.decoding:
                            logger.info("Validation videos decode with the transformer's frozen weights on the "
                                        "host%s, to stay under training's peak of %.1f GiB (about %.1f GiB).",
                                        f" and tiles of {plan.tile_scale:g} times the VAE's"
                                        if plan.tile_scale < 1 else "", self.peaks.gib["training"][0], plan.peak_gib)
                    if plan.tile_scale != configured:
                        scale = plan.tile_scale
                    self.decoding = plan
                with room, tiles(vae, scale):
                    return decode(latents)

        pipe.decode_latents = decode_latents


def hold_to(allocator_gib: float | None, device) -> None:
    """Holds this process's allocator to allocator_gib GiB of the GPU: a memory.Budget's allocator_gib, the card
    but the context and kernels, which sit beside the allocator (nothing without a cap or a GPU)."""
    if allocator_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, allocator_gib / total)),
                                                   torch.cuda.current_device())


def gpu_held_gib() -> float | None:
    """What the GPU holds now, or None without one (no room to make)."""
    return torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None


@contextlib.contextmanager
def optimizer_state_on_host(optimizer):
    """The optimizer's GPU state waits in CPU memory meanwhile: making videos does not need it, and its room keeps
    validation's peak under training's."""
    moved = [] if optimizer is None else [
        (state, key, value.device) for state in optimizer.state.values() for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.device.type == "cuda"]
    for state, key, _ in moved:
        state[key] = state[key].to("cpu")
    try:
        yield
    finally:
        for state, key, device in moved:
            state[key] = state[key].to(device)


@contextlib.contextmanager
def one_sample_at_a_time(transformer):
    """The pipelines' classifier-free guidance runs the transformer on a batch of two (without the prompt and with
    it); one sample at a time gives the same video with half the activations at once, which are what raises an
    offloaded run's validation above its training (BENCHMARKS.md)."""
    batched = transformer.forward

    def forward(hidden_states, encoder_hidden_states, timestep, **kwargs):
        outputs = [batched(hidden_states=hidden_states[i:i + 1], encoder_hidden_states=encoder_hidden_states[i:i + 1],
                           timestep=timestep[i:i + 1], **kwargs)[0] for i in range(hidden_states.shape[0])]
        return (torch.cat(outputs),)

    own = "forward" in transformer.__dict__  # accelerate may have wrapped the method in autocast
    transformer.forward = forward
    try:
        yield
    finally:
        if own:
            transformer.forward = batched
        else:
            del transformer.forward


@contextlib.contextmanager
def tiles(vae, scale: float | None):
    """The VAE's decode tiled with tiles of `scale` times memory.VAE_TILE's sides (overlaps and blending scale
    with them), or as it is set if None."""
    if scale is None:
        yield
        return
    before = vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width
    vae.enable_tiling(tile_sample_min_height=int(VAE_TILE[0] * scale), tile_sample_min_width=int(VAE_TILE[1] * scale))
    try:
        yield
    finally:
        vae.enable_tiling(tile_sample_min_height=before[1], tile_sample_min_width=before[2])
        vae.use_tiling = before[0]
