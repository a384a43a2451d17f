"""The attention kernel: its choice, the processor, and the custom ops that wrap a kernel, on the CPU.

FlashAttention-4 needs a Hopper or Blackwell GPU, so its custom-op wrapper is tested here with a stand-in
kernel (attention written out in fp32, helpers.register_stand_in) registered in its place.
"""

import importlib.machinery
import sys
import types

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

import helpers

from cogvideox_lora import attention, models, offload, recompute
from helpers import (STAND_IN_CALLS, lora_step, register_stand_in, run_main, tiny_inputs,
                     tiny_transformer, train_argv)


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


# 1. The choice.

@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_an_sdpa_backend_runs_pytorch_sdpa_with_it_first(backend):
    choice = attention.choose(backend, 64, torch.bfloat16)
    assert choice.kernel is None
    assert choice.description == f"PyTorch SDPA, {backend} first"


def test_auto_falls_back_to_sdpa_and_says_why():
    problem = attention.flash4_problem(64, torch.bfloat16)
    assert problem is not None  # no CUDA GPU here
    if not flash_attn_installed():
        assert "pip install flash-attn-4" in problem
    choice = attention.choose("auto", 64, torch.bfloat16)
    assert choice.kernel is None
    assert choice.description == f"PyTorch SDPA, cudnn first ({problem})"


def test_explicit_flash4_that_cannot_run_is_an_error():
    with pytest.raises(attention.AttentionError) as raised:
        attention.choose("flash4", 64, torch.bfloat16)
    message = str(raised.value)
    assert message.startswith("--attention_backend flash4: ") and "--attention_backend auto or cudnn" in message
    if not flash_attn_installed():
        assert "pip install flash-attn-4" in message


def test_auto_picks_flash4_where_it_runs(monkeypatch):
    monkeypatch.setattr(attention, "flash4_problem", lambda head_dim, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
    for backend in ("auto", "flash4"):
        choice = attention.choose(backend, 64, torch.bfloat16)
        assert choice.kernel == "flash4" and choice.kernel in attention.KERNELS
        assert choice.description.startswith("FlashAttention-4 (") and choice.description.endswith("on Fake H100")
    # An SDPA backend asked for stays SDPA even where FlashAttention-4 would run.
    assert attention.choose("cudnn", 64, torch.bfloat16).kernel is None


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """An importable (empty) flash_attn.cute.interface, and a CUDA GPU of the capability set in the returned dict."""
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    gpu = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: gpu["capability"])
    return gpu


def test_flash4_problem_names_what_stops_it(fake_flash_attn, monkeypatch):
    bf16 = torch.bfloat16
    assert attention.flash4_problem(64, bf16) is None
    assert attention.flash4_problem(64, torch.float16) is None
    assert "bf16 or fp16, not torch.float32" in attention.flash4_problem(64, torch.float32)
    # Hopper takes head sizes up to 256, Blackwell up to 128, in steps of 8.
    assert attention.flash4_problem(256, bf16) is None
    assert "8 to 256" in attention.flash4_problem(264, bf16) and "not 264" in attention.flash4_problem(264, bf16)
    assert "not 60" in attention.flash4_problem(60, bf16)
    assert "not 4" in attention.flash4_problem(4, bf16)
    fake_flash_attn["capability"] = (10, 0)
    assert attention.flash4_problem(128, bf16) is None
    assert "sm100 takes head sizes 8 to 128" in attention.flash4_problem(192, bf16)
    fake_flash_attn["capability"] = (8, 0)
    assert "not on this sm80" in attention.flash4_problem(64, bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in attention.flash4_problem(64, bf16)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # a broken install: the import fails
    assert "FlashAttention-4 does not import (ModuleNotFoundError" in attention.flash4_problem(64, bf16)
    monkeypatch.delitem(sys.modules, "flash_attn")
    if not flash_attn_installed():
        assert attention.flash4_problem(64, bf16) == "FlashAttention-4 is not installed (pip install flash-attn-4)"


# 2. The processor with PyTorch's SDPA computes what diffusers' own does.

def _all_grads_step(transformer, inputs):
    transformer.requires_grad_(True)
    transformer.zero_grad(set_to_none=True)
    out = transformer(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in transformer.named_parameters()}


def test_the_sdpa_processor_equals_diffusers(monkeypatch):
    ours = tiny_transformer(num_layers=2, kernel=None)
    theirs = tiny_transformer(num_layers=2, kernel=None)
    theirs.set_attn_processor(CogVideoXAttnProcessor2_0())
    assert isinstance(ours.transformer_blocks[0].attn1.processor, attention.CogVideoXAttnProcessor)
    inputs = tiny_inputs(ours)
    assert inputs["image_rotary_emb"] is not None
    out_a, grads_a = _all_grads_step(ours, inputs)
    out_b, grads_b = _all_grads_step(theirs, inputs)
    assert out_a.abs().max() > 0
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_processor_refuses_a_mask():
    block = tiny_transformer(num_layers=1).transformer_blocks[0]
    x = torch.randn(1, 4, block.attn1.to_q.in_features)
    with pytest.raises(ValueError, match="no mask"):
        block.attn1.processor(block.attn1, x, x, attention_mask=torch.ones(1, 8, 8))


# 3. The custom ops, with the stand-in kernel.

def test_the_custom_op_passes_opcheck():
    kernel = register_stand_in()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=generator, requires_grad=True) for _ in range(3))
    # Schema, autograd registration, fake (meta) implementation and tracing by AOTAutograd, of both ops.
    torch.library.opcheck(attention.attention_forward, (q, k, v, 0.25, kernel))
    out, lse = attention.attention_forward(q, k, v, 0.25, kernel)
    torch.library.opcheck(attention.attention_backward, (torch.randn_like(out), *(t.detach() for t in (q, k, v, out)),
                                                         lse.detach(), 0.25, kernel))
    reference = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.25)
    torch.testing.assert_close(out, reference.transpose(1, 2))
    assert lse.shape == (1, 2, 12) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


LAYERS = 3


@pytest.fixture(scope="module")
def plain_steps():
    """Two steps of the plain path: PyTorch's SDPA, eager, no checkpointing; inputs and results."""
    transformer = tiny_transformer(num_layers=LAYERS, kernel=None)
    inputs = [tiny_inputs(transformer, seed) for seed in (0, 1)]
    return inputs, [lora_step(transformer, i) for i in inputs]


def assert_same_steps(reference, other, rtol):
    for (loss_a, grads_a), (loss_b, grads_b) in zip(reference, other):
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == LAYERS * 4 * 2  # A and B of q, k, v, out
        assert all(g.abs().max() > 0 for g in grads_a.values()), "every LoRA weight should have a gradient"
        torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=rtol * grads_a[name].abs().max(),
                                       msg=name)


@pytest.mark.parametrize("policy, forwards_per_block", [(None, 1), ("full", 2), ("keep_attention", 1)])
def test_the_stand_in_kernel_gives_the_plain_step(plain_steps, policy, forwards_per_block):
    inputs, reference = plain_steps
    transformer = tiny_transformer(num_layers=LAYERS, kernel=register_stand_in())
    if policy:
        recompute.enable(transformer, policy)
    steps = []
    for step_inputs in inputs:
        STAND_IN_CALLS.update(forward=0, backward=0)
        steps.append(lora_step(transformer, step_inputs))
        # Every block's attention ran through the kernel: keep_attention kept its output for the backward pass.
        assert STAND_IN_CALLS == {"forward": LAYERS * forwards_per_block, "backward": LAYERS}
    assert_same_steps(reference, steps, rtol=1e-5)


class CountAttentionOps(TorchDispatchMode):
    """Counts the ATen attention ops (SDPA's kernels and their backward) that run under it."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "attention" in str(func):
            name = "backward" if "backward" in str(func) else "forward"
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy, forwards_per_block", [("full", 2), ("keep_attention", 1)])
def test_keep_attention_keeps_sdpa_attention_too(plain_steps, policy, forwards_per_block):
    inputs, reference = plain_steps
    transformer = tiny_transformer(num_layers=LAYERS, kernel=None)
    recompute.enable(transformer, policy)
    steps = []
    for step_inputs in inputs:
        with CountAttentionOps() as counted:
            steps.append(lora_step(transformer, step_inputs))
        assert counted.calls == {"forward": LAYERS * forwards_per_block, "backward": LAYERS}
    assert_same_steps(reference, steps, rtol=1e-5)


def test_the_kernel_computes_in_the_autocast_dtype_and_sdpa_takes_the_others(plain_steps):
    inputs, _ = plain_steps
    seen = []

    def forward(q, k, v, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return helpers.stand_in_forward(q, k, v, scale)

    attention.register_kernel("bf16-only", forward, helpers.stand_in_backward, (torch.bfloat16,))
    with_kernel, with_sdpa = (tiny_transformer(num_layers=LAYERS, kernel=k) for k in ("bf16-only", None))
    # fp32, which the kernel does not take: SDPA runs instead, the same step.
    assert_same_steps([lora_step(with_sdpa, inputs[0])], [lora_step(with_kernel, inputs[0])], rtol=1e-6)
    assert seen == []
    # Under bf16 autocast the kernel gets bf16 q, k and v (the q/k norms give fp32) and matches SDPA's step.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, got = lora_step(with_sdpa, inputs[0]), lora_step(with_kernel, inputs[0])
    assert seen == [(torch.bfloat16,) * 3] * LAYERS
    assert_same_steps([reference], [got], rtol=3e-2)


@pytest.mark.slow
def test_compiled_blocks_with_the_custom_op_give_the_plain_step(plain_steps):
    """As the trainer runs them with everything on: keep_attention checkpointing around compiled blocks, the
    checkpointed inputs offloaded and every block's frozen weights swapped through two slots (fp32, so the
    tolerance is fp32's; the one compiled test of the suite)."""
    inputs, reference = plain_steps
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    transformer = tiny_transformer(num_layers=LAYERS, kernel=register_stand_in())
    recompute.enable(transformer, "keep_attention", offload.ActivationOffload("cpu"),
                     offload.BlockSwap(transformer.transformer_blocks, LAYERS, "cpu"))
    models.compile_blocks(transformer)
    steps = []
    for step_inputs in inputs:
        STAND_IN_CALLS.update(forward=0, backward=0)
        steps.append(lora_step(transformer, step_inputs))
        # The recompute inside the compiled block skips attention.
        assert STAND_IN_CALLS == {"forward": LAYERS, "backward": LAYERS}
    assert_same_steps(reference, steps, rtol=1e-4)
    assert dict(counters["graph_break"]) == {}, "the custom op should trace into the block's graph"
    assert counters["stats"]["unique_graphs"] >= 1


# 4. Through the command line.

def test_flash4_on_this_machine_stops_before_any_model(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                            "--attention_backend", "flash4", "--max_train_steps", 1))
    message = str(raised.value.code)
    assert message.startswith("error: --attention_backend flash4: ") and "--attention_backend auto" in message
    assert ("pip install flash-attn-4" if not flash_attn_installed() else "CUDA GPU") in message
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags, said", [((), "Attention: PyTorch SDPA, cudnn first ("),
                                         (("--attention_backend", "efficient"), "Attention: PyTorch SDPA, efficient first")])
def test_the_log_names_the_attention_choice(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models, caplog, flags, said):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="train_cogvideox_lora"):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--dry_run", *flags))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Attention:")]
    assert len(lines) == 1 and lines[0].startswith(said), lines
    assert not out.exists()
