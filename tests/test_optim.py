"""The optimizer and learning-rate schedule (optim.py), from the settings the command line gives."""

import sys
import types

import pytest
import torch

from cogvideox_lora import settings
from cogvideox_lora.args import build_parser, parse_args
from cogvideox_lora.optim import make_optimizer, make_schedule
from cogvideox_lora.settings import OptimizerSettings


@pytest.mark.parametrize("spelling, expected", [("AdamW", torch.optim.AdamW), ("adamw", torch.optim.AdamW),
                                                ("Adam", torch.optim.Adam)])
def test_optimizer_spelling(tmp_path, spelling, expected):
    args = parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                       "--optimizer", spelling])
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], settings.from_args(args).optimizer)
    assert type(optimizer) is expected
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                    "--optimizer", "SGD"])


@pytest.mark.parametrize("scheduler", ["constant_with_warmup", "linear", "cosine"])
def test_the_schedule_warms_up_then_follows_its_shape(scheduler):
    chosen = OptimizerSettings(learning_rate=1e-3, scheduler=scheduler, warmup_steps=2)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([parameter], chosen)
    schedule = make_schedule(optimizer, chosen, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    if scheduler == "constant_with_warmup":
        assert rates[3:] == pytest.approx([1e-3] * 7)
    else:  # decays to zero at the last step
        assert all(a > b for a, b in zip(rates[2:], rates[3:])) and schedule.get_last_lr()[0] == pytest.approx(0.0)


def test_prodigy_settings_reach_prodigy(monkeypatch):
    made = {}
    # prodigyopt is not a dependency: a stand-in records what the trainer would construct it with.
    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=lambda params, **kw: made.update(kw)))
    args = build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--optimizer", "prodigy",
                                      "--prodigy_beta3", "0.9", "--prodigy_decouple", "--prodigy_use_bias_correction",
                                      "--prodigy_safeguard_warmup", "--learning_rate", "0.5"])
    make_optimizer([torch.nn.Parameter(torch.zeros(2))], settings.from_args(args).optimizer)
    assert made == {"lr": 0.5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 1e-4, "beta3": 0.9,
                    "decouple": True, "use_bias_correction": True, "safeguard_warmup": True}
