"""GPU memory for smaller cards: checkpointed activations and frozen block weights wait in pinned CPU memory.

Both move on a side CUDA stream while the blocks compute, the next one fetched while the current one runs.
PyTorch's torch.autograd.graph.save_on_cpu moves saved tensors too, but on the compute stream, as each is
saved and as it is needed, so the step waits for every copy: for 5B at 49x480x720 that is 8.5 GiB a step,
0.17 s at the 51.6 GiB/s measured on the H200 (7 % of its 2.38 s step), where the side stream costs 0.7 %
(BENCHMARKS.md). diffusers' group offloading streams weights, but prefetches in forward order only (the
recompute runs backwards) and copies every parameter back from the host, the trainable adapter's too, which
would undo each optimizer step. So both are written here, on PyTorch's saved-tensor hooks and streams. On a
machine without CUDA the same code runs with plain copies, which is what the CPU tests compare.
"""

import contextlib

import torch


class _Stream:
    """A side CUDA stream, or nothing on the CPU (where copies are synchronous)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pin = device.type == "cuda"

    def side(self):
        """Context for work on the side stream, issued after what the compute stream has been given so far."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def done(self):
        """A marker of the side stream's work so far, for wait()."""
        return None if self.stream is None else self.stream.record_event()

    @staticmethod
    def wait(event) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def keep(self, tensor: torch.Tensor) -> None:
        """Keeps the allocator from reusing `tensor`'s memory before the side stream is done with it."""
        if self.stream is not None:
            tensor.record_stream(self.stream)


class _Group:
    """The offloaded inputs of one checkpointed block."""

    def __init__(self, position: int):
        self.position = position
        self.host: list[torch.Tensor] = []
        self.devices: list[torch.device] = []
        self.fetched: list[torch.Tensor] | None = None
        self.ready = None


class ActivationOffload:
    """Each checkpointed block's input in pinned CPU memory from the forward pass to that block's recompute.

    The copy out starts as the block is entered; in the backward pass, fetching a block's inputs also starts
    fetching the inputs of the block before it, which is the next to be recomputed. Host buffers are reused
    every step.
    """

    def __init__(self, device):
        self.copies = _Stream(torch.device(device))
        self.groups: list[_Group] = []  # this forward pass's, in order
        self.buffers: dict[tuple, torch.Tensor] = {}

    @contextlib.contextmanager
    def offloading(self, *tensors: torch.Tensor):
        """Context in which autograd saving one of `tensors` (the checkpoint saving its inputs) sends it to the host."""
        wanted = {id(t) for t in tensors}
        group = _Group(len(self.groups))
        self.groups.append(group)

        def pack(tensor):
            return self._offload(group, tensor) if id(tensor) in wanted else tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, self._restore):
            yield

    def _offload(self, group: _Group, tensor: torch.Tensor) -> tuple[_Group, int]:
        key = (group.position, len(group.host), tensor.shape, tensor.dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.copies.pin)
        host = self.buffers[key]
        with self.copies.side():
            host.copy_(tensor, non_blocking=True)
            self.copies.keep(tensor)
        group.host.append(host)
        group.devices.append(tensor.device)
        return group, len(group.host) - 1

    def _fetch(self, group: _Group) -> None:
        if group.fetched is not None:
            return
        group.fetched = [torch.empty(h.shape, dtype=h.dtype, device=d) for h, d in zip(group.host, group.devices)]
        with self.copies.side():
            for device_tensor, host in zip(group.fetched, group.host):
                device_tensor.copy_(host, non_blocking=True)
                self.copies.keep(device_tensor)
            group.ready = self.copies.done()

    def _restore(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        group, index = packed
        self._fetch(group)
        if group.position > 0:
            self._fetch(self.groups[group.position - 1])
        else:
            self.groups = []  # the backward pass is through: the next forward pass starts a new list
        self.copies.wait(group.ready)
        tensor, group.fetched[index] = group.fetched[index], None  # the block's backward alone holds it now
        return tensor


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` block indices, evenly spaced, so each copy has compute to hide behind."""
    return [(k * total + total // 2) // count for k in range(count)]


class BlockSwap:
    """The frozen weights (and buffers) of some blocks in pinned CPU memory; each such block's tensors alias one
    of two GPU slots, into which they are copied before the block runs, the next such block's while it runs.

    Nothing is copied back: the frozen weights never change, and the adapter's weights (trainable) stay on the
    GPU. Needs gradient checkpointing, whose recompute is the backward pass's use of the weights; the caller
    calls load() before each forward and each recompute of a block (see recompute.py).
    """

    def __init__(self, blocks, count: int, device):
        device = torch.device(device)
        self.copies = _Stream(device)
        self.order = spread(count, len(blocks))
        self.slot_of = {i: j % 2 for j, i in enumerate(self.order)}
        places = {i: _frozen_tensors(blocks[i]) for i in self.order}
        layout = [(t.shape, t.dtype) for _, _, t in places[self.order[0]]]
        for i in self.order:
            if [(t.shape, t.dtype) for _, _, t in places[i]] != layout:
                raise ValueError(f"block {i} differs from block {self.order[0]}: blocks can only swap through "
                                 f"shared slots if they are alike")
        self.host = {i: [t.detach().to("cpu").pin_memory() if self.copies.pin else t.detach().to("cpu", copy=True)
                         for _, _, t in places[i]] for i in self.order}
        self.slots = [[torch.empty(shape, dtype=dtype, device=device) for shape, dtype in layout]
                      for _ in range(min(2, len(self.order)))]
        for i in self.order:
            for (module, name, _), slot_tensor in zip(places[i], self.slots[self.slot_of[i]]):
                if name in module._parameters:
                    module._parameters[name].data = slot_tensor
                else:
                    module._buffers[name] = slot_tensor
        self.holds = [None] * len(self.slots)
        self.ready = [None] * len(self.slots)

    def load(self, i: int, direction: int, wrap: bool = False) -> None:
        """Makes block i's weights ready for the next work on the compute stream and starts copying the next
        swapped block's: the next in `direction` (+1 forward, -1 backward), cyclically if wrap (inference)."""
        if i not in self.slot_of:
            return
        self._copy(i)
        self.copies.wait(self.ready[self.slot_of[i]])
        j = self.order.index(i) + direction
        if wrap:
            j %= len(self.order)
        if 0 <= j < len(self.order) and self.slot_of[self.order[j]] != self.slot_of[i]:
            self._copy(self.order[j])

    def _copy(self, i: int) -> None:
        slot = self.slot_of[i]
        if self.holds[slot] == i:
            return
        # side() first waits for all the compute issued so far, the last use of the slot's block among it.
        with self.copies.side():
            for dst, src in zip(self.slots[slot], self.host[i]):
                dst.copy_(src, non_blocking=True)
            self.ready[slot] = self.copies.done()
        self.holds[slot] = i

    @contextlib.contextmanager
    def inference(self, blocks):
        """Context for generating (no gradients, so no checkpointing): each swapped block loads as it is called."""
        hooks = [blocks[i].register_forward_pre_hook(lambda module, args, i=i: self.load(i, +1, wrap=True))
                 for i in self.order]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def frozen_tensors(module, keep=()) -> list[tuple]:
    """(module, name, tensor) of the frozen parameters and buffers of `module`, each once, but those of the modules
    in `keep`."""
    seen = {id(t) for m in keep for _, _, t in _frozen_tensors(m)}
    found = []
    for m, name, t in _frozen_tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            found.append((m, name, t))
    return found


@contextlib.contextmanager
def on_host(tensors: list[tuple]):
    """Context in which these frozen_tensors() wait in CPU memory; on leaving, they are back where they were.

    For the VAE's tiled decode of a validation video (about 4.3 GiB at 49x480x720, BENCHMARKS.md), which needs
    none of the transformer's weights: kept on the GPU, they could raise validation above training's peak. The
    parameters and buffers stay the same objects (their data moves), so the optimizer and compiled blocks still
    hold them.
    Swapped blocks stay out: their weights alias BlockSwap's slots and already have a host copy.
    """
    devices = [t.device for _, _, t in tensors]
    for _, _, t in tensors:
        _move(t, "cpu")
    try:
        yield
    finally:
        for (_, _, t), device in zip(tensors, devices):
            _move(t, device)


def _move(tensor, device) -> None:
    # In place, buffers as parameters, so that whoever holds the tensor (the caller's list, compiled blocks) lets go
    # of its GPU memory; a copy even where it is already there, so that CPU tests see the same path as a GPU run.
    tensor.data = tensor.data.to(device, copy=True)


def _frozen_tensors(block) -> list[tuple]:
    """(module, name, tensor) of every frozen parameter and buffer of a block, in a fixed order."""
    found = []
    for module in block.modules():
        found += [(module, name, p) for name, p in module._parameters.items() if p is not None and not p.requires_grad]
        found += [(module, name, b) for name, b in module._buffers.items() if b is not None]
    return found
