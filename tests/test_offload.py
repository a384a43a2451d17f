"""Offloading on the CPU (offload.py): an offloaded step computes what a step without offloading does.

On a machine without CUDA, ActivationOffload and BlockSwap run the same code with plain copies (no side
stream), so the tiny transformer's loss and LoRA gradients can be compared exactly with the plain path's.
"""

import pytest
import torch

from cogvideox_lora import offload, recompute
from helpers import (STAND_IN_CALLS, lora, lora_step, max_abs_diff, register_stand_in, run_main, summary,
                     tiny_inputs, tiny_transformer, train_argv)

LAYERS = 4


def train_two_steps(transformer):
    """Two steps on different inputs, with an SGD update of the adapter between them (so that the second step
    sees new adapter weights and the offloaders' reused buffers new activations)."""
    steps = []
    for seed in (0, 1):
        STAND_IN_CALLS.update(forward=0, backward=0)
        steps.append((*lora_step(transformer, tiny_inputs(transformer, seed)), dict(STAND_IN_CALLS)))
        with torch.no_grad():
            for param in transformer.parameters():
                if param.requires_grad:
                    param -= 0.5 * param.grad
    return steps


@pytest.fixture(scope="module")
def reference():
    """The plain path: no checkpointing, no offloading."""
    return train_two_steps(tiny_transformer(LAYERS, kernel=register_stand_in()))


@pytest.mark.parametrize("policy", ["full", "keep_attention"])
@pytest.mark.parametrize("activations, swapped", [(False, 0), (True, 0), (False, 2), (False, LAYERS),
                                                  (True, 3), (True, LAYERS)])
def test_offloaded_steps_equal_the_plain_steps(reference, policy, activations, swapped):
    transformer = tiny_transformer(LAYERS, kernel=register_stand_in())
    blocks = transformer.transformer_blocks
    swap = offload.BlockSwap(blocks, swapped, "cpu") if swapped else None
    offloader = offload.ActivationOffload("cpu") if activations else None
    recompute.enable(transformer, policy, offloader, swap)
    if swap is not None:
        assert len(swap.order) == swapped == len(set(swap.order))
        # The swapped blocks' frozen weights are views of the (at most two) shared slots.
        slot_pointers = {t.data_ptr() for slot in swap.slots for t in slot}
        for i in swap.order:
            assert blocks[i].attn1.to_q.base_layer.weight.data_ptr() in slot_pointers
            assert blocks[i].attn1.to_q.lora_A["default"].weight.data_ptr() not in slot_pointers  # trainable: stays
        if swapped > 2:
            first, third = swap.order[0], swap.order[2]
            assert blocks[first].ff.net[2].weight.data_ptr() == blocks[third].ff.net[2].weight.data_ptr()

    steps = train_two_steps(transformer)
    for (loss_a, grads_a, _), (loss_b, grads_b, calls) in zip(reference, steps):
        assert len(grads_a) == LAYERS * 4 * 2 and all(g.abs().max() > 0 for g in grads_a.values())
        assert grads_b.keys() == grads_a.keys()
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
        # keep_attention skips attention in the recompute, however the inputs and weights travel.
        assert calls == {"forward": LAYERS * (1 if policy == "keep_attention" else 2), "backward": LAYERS}
    if offloader is not None:
        # Each block's two inputs (video and text tokens) went to host buffers, reused by the second step;
        # the backward pass fetched them all back and left no group behind.
        assert len(offloader.buffers) == 2 * LAYERS
        assert {key[0] for key in offloader.buffers} == set(range(LAYERS))
        assert offloader.groups == []


def test_offloaded_activations_are_the_blocks_inputs():
    offloader = offload.ActivationOffload("cpu")
    transformer = tiny_transformer(2, kernel=None)
    recompute.enable(transformer, "full", offloader)
    inputs = tiny_inputs(transformer)
    out = transformer(**inputs, return_dict=False)[0]
    # After the forward pass: one group per block, each holding the block's hidden and encoder states.
    assert [g.position for g in offloader.groups] == [0, 1]
    assert all(len(g.host) == 2 and g.fetched is None for g in offloader.groups)
    text = transformer.config.max_text_seq_length
    assert offloader.groups[0].host[1].shape == (1, text, transformer.transformer_blocks[0].attn1.to_q.in_features)
    assert all(t.device.type == "cpu" and not t.requires_grad for g in offloader.groups for t in g.host)
    out.square().mean().backward()
    assert offloader.groups == []


def test_block_swap_in_inference_gives_the_plain_output():
    plain = tiny_transformer(LAYERS, kernel=None)
    swapped = tiny_transformer(LAYERS, kernel=None)
    swap = offload.BlockSwap(swapped.transformer_blocks, 3, "cpu")
    outputs = []
    with torch.no_grad():
        expected = [plain(**tiny_inputs(plain, seed), return_dict=False)[0] for seed in (0, 1)]
        with swap.inference(swapped.transformer_blocks):
            # Twice: the second pass starts again at the first swapped block (the slots wrap around).
            outputs = [swapped(**tiny_inputs(swapped, seed), return_dict=False)[0] for seed in (0, 1)]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(block._forward_pre_hooks for block in swapped.transformer_blocks)  # the hooks are removed


def test_block_swap_refuses_blocks_that_differ():
    transformer = tiny_transformer(2, kernel=None)
    transformer.transformer_blocks[1].ff.net[2].weight.data = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="differs from block 0"):
        offload.BlockSwap(transformer.transformer_blocks, 2, "cpu")


@pytest.mark.parametrize("total", [1, 2, 5, 30, 42])
def test_spread_spaces_the_swapped_blocks_evenly(total):
    assert offload.spread(total, total) == list(range(total))
    assert offload.spread(1, total) == [total // 2]
    for count in range(1, total + 1):
        chosen = offload.spread(count, total)
        assert len(chosen) == count and chosen == sorted(set(chosen))
        assert 0 <= chosen[0] and chosen[-1] < total
        gaps = [b - a for a, b in zip(chosen, chosen[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1, (count, chosen)


def test_frozen_weights_wait_on_the_host_and_come_back():
    transformer = tiny_transformer(num_layers=3)
    keep = [transformer.transformer_blocks[1]]
    params = dict(transformer.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    storage = {name: p.data_ptr() for name, p in params.items()}
    inputs = tiny_inputs(transformer, 0)
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    moved = offload.frozen_tensors(transformer, keep)
    moved_ids = {id(t) for _, _, t in moved}
    kept_ids = {id(p) for p in keep[0].parameters()}
    assert moved and not moved_ids & kept_ids and all(not t.requires_grad for _, _, t in moved)
    assert len(moved_ids) == len(moved)
    with offload.on_host(moved):
        for name, p in params.items():
            # The same parameters, their data moved (a copy, even on the CPU), but for the kept and trainable ones.
            assert p is dict(transformer.named_parameters())[name]
            assert (p.data_ptr() != storage[name]) == (id(p) in moved_ids), name
    for name, p in params.items():
        assert torch.equal(p, values[name]), name
    with torch.no_grad():
        assert torch.equal(transformer(**inputs, return_dict=False)[0], before)


# Through the command line.

@pytest.mark.slow
def test_an_offloaded_run_learns_the_same_lora(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cache = tmp_path / "cache"
    common = ["--max_train_steps", 2, "--gradient_checkpointing", "--validation_prompt", "a red square",
              "--validation_steps", 1]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "plain", cache, *common))
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "offloaded", cache, *common,
                        "--offload", "activations", "--blocks_to_swap", 1))
    plain, offloaded = summary(tmp_path / "plain"), summary(tmp_path / "offloaded")
    assert plain["memory_plan"] == "--gradient_checkpointing"
    assert offloaded["memory_plan"] == "--gradient_checkpointing --offload activations --blocks_to_swap 1"
    # Validated after step 1 (then trained on) and at the end, with the swapped block loaded for inference.
    assert len(offloaded["validation_videos"]) == len(plain["validation_videos"]) == 1
    a, b = lora(tmp_path / "plain"), lora(tmp_path / "offloaded")
    assert len(a) > 0 and max(t.abs().max().item() for t in a.values()) > 0
    assert max_abs_diff(a, b) <= 1e-6
