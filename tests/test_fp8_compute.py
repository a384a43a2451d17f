"""Float8 products for the frozen base weights (fp8_compute.py, --fp8_compute linear), on the CPU's float8 kernels."""

import copy

import pytest
import torch

from cogvideox_lora import fp8_compute, memory, models
from cogvideox_lora.lora import load_lora_state_dict, lora_state_dict
from cogvideox_lora.settings import ModelSource
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.transformer import TransformerSpec, build
from helpers import BF16, assert_same_step, run_main, step, train_argv
from test_args import refusal


def float8_pair(features=64, out_features=96):
    torch.manual_seed(0)
    stored = torch.nn.Linear(features, out_features).to(BF16)
    models.Float8Linear.convert(stored, BF16, "cpu")
    products = copy.deepcopy(stored)
    assert fp8_compute.use_for_linears(torch.nn.Sequential(products)) == 1
    return stored, products


def forward_backward(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return out.detach().float(), x.grad.float()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_float8_products_give_the_dequantized_product_and_its_input_gradient():
    stored, products = float8_pair()
    x = (torch.randn(2, 40, 64) * torch.linspace(0.1, 4, 64)).to(BF16)
    grad = torch.randn(2, 40, 96, dtype=BF16)
    (out, dx), (out8, dx8) = forward_backward(stored, x, grad), forward_backward(products, x, grad)
    # e4m3 keeps 3 bits of mantissa: a few percent per product, no systematic error.
    assert relative(out8, out) < 0.05 and relative(dx8, dx) < 0.05
    assert relative(out8, out) > 0  # the product did run in float8
    assert products.weight.grad is None


def test_an_outlier_token_costs_precision_only_to_itself():
    _, products = float8_pair()
    x = torch.randn(8, 64, dtype=BF16)
    with_outlier = x.clone()
    with_outlier[3] *= 1000
    grad = torch.randn(8, 96, dtype=BF16)
    out, dx = forward_backward(products, x, grad)
    out_o, dx_o = forward_backward(products, with_outlier, grad)
    others = [i for i in range(8) if i != 3]
    assert torch.equal(out[others], out_o[others])  # a scale per token, not one per tensor
    assert torch.equal(dx, dx_o)  # the gradient's scales are per token too (grad is the same)


def test_the_products_keep_nothing_of_the_input_for_the_backward():
    _, products = float8_pair()
    x = torch.randn(4, 40, 64, dtype=BF16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        products(x)
    # The weight is frozen: its stored float8 values and their scales are all the backward needs.
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, BF16} and all(t.numel() <= 96 * 64 for t in saved)


def test_layers_whose_shape_cublas_cannot_take_keep_the_dequantized_product():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 40), torch.nn.Linear(40, 8))
    for layer in model:
        models.Float8Linear.convert(layer, BF16, "cpu")
    assert fp8_compute.use_for_linears(model) == 1
    assert [type(layer) for layer in model] == [fp8_compute.Float8ComputeLinear, models.Float8Linear,
                                                models.Float8Linear]


def test_gpus_without_float8_tensor_cores_and_other_precisions_are_refused_by_name(monkeypatch):
    assert fp8_compute.problem(torch.device("cpu"), "bf16") is None
    for precision in ("no", "fp16"):
        assert f"this run's precision is {precision}: use --mixed_precision bf16" in fp8_compute.problem(
            torch.device("cpu"), precision)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    said = fp8_compute.problem(torch.device("cuda"), "bf16")
    assert "RTX 3090" in said and "8.6" in said and "Ada, Hopper, Blackwell" in said
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_compute.problem(torch.device("cuda"), "bf16") is None


def test_only_what_fp8_compute_offers_is_taken(capsys):
    assert "--fp8_compute 'attention': name linear" in refusal(capsys, "--fp8_compute", "attention")


def test_a_precision_fp8_cannot_write_stops_before_any_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                   no_models):
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--fp8_compute", "linear", "--mixed_precision", "no"))
    assert str(exit_.value.code).startswith("error: --fp8_compute writes bf16 results")


def test_the_estimate_counts_float8_copies_instead_of_bf16_ones(val_2b):
    stored = memory.estimate(memory.Workload(**{**val_2b.__dict__, "float8_blocks": True}), Plan("full"))
    products = memory.estimate(memory.Workload(**{**val_2b.__dict__, "float8_blocks": True,
                                                  "float8_products": True}), Plan("full"))
    width = val_2b.config["num_attention_heads"] * val_2b.config["attention_head_dim"]
    assert (stored.activations_gib - products.activations_gib) * 2**30 == pytest.approx(12 * width**2)


@pytest.mark.slow
def test_the_step_with_float8_products_stays_close_to_float8_storage(tiny_model_dir, plain, batch):
    def tiny(products: bool):
        spec = TransformerSpec(BF16, rank=4, alpha=4, fp8_base_weights=True, fp8_linear=products)
        transformer = build(ModelSource(str(tiny_model_dir)), spec, Placement(Plan(), "cpu"))[0]
        load_lora_state_dict(transformer, lora_state_dict(plain))
        return transformer

    stored, products = tiny(False), tiny(True)
    assert isinstance(products.transformer_blocks[0].ff.net[2], fp8_compute.Float8ComputeLinear)
    assert_same_step(step(stored, batch, uncast=True), step(products, batch, uncast=True), tolerance=0.05)
