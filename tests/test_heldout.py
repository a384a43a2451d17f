"""The held-out loss, the losses' records in checkpoints and the best checkpoint, caption dropout and checkpoints by
time, on the tiny models and clips whose content is known."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import train_cogvideox_lora
from helpers import lora, max_abs_diff, run_main, summary, tiny_transformer, train_argv
from cogvideox_lora import checkpoints, heldout
from cogvideox_lora.loss import caption_dropped, sample_seed
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.settings import HeldOutSettings
from cogvideox_lora.synthetic import build_model_folder, write_clips

# ---------------------------------------------------------------------------------------------------------------
# The evaluation itself, on a tiny transformer and made-up cache entries


class OneProcess:
    """What HeldOutLoss asks of an accelerate Accelerator, for one process on the CPU."""

    process_index, num_processes, device = 0, 1, torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def _evaluator(transformer, clips: int = 2, timesteps: int = 3, batch_size: int = 2) -> heldout.HeldOutLoss:
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    videos = [{"latent_params": torch.randn(2 * config.out_channels, 3, 6, 8, generator=generator)}
              for _ in range(clips)]
    prompts = [{"prompt_embeds": torch.randn(config.max_text_seq_length, config.text_embed_dim, generator=generator)}
               for _ in range(clips)]
    family = SimpleNamespace(patch_size_t=None, image_to_video=False, image_latent_scale=1.0)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    return heldout.HeldOutLoss(HeldOutSettings(steps=1, split=0.5, timesteps=timesteps, seed=3), videos, prompts,
                               family, 0.7, alphas_cumprod, torch.float32, batch_size, Placement(Plan(), "cpu"))


def test_evaluation_is_fixed_and_leaves_training_as_it_was():
    transformer = tiny_transformer()
    transformer.train()
    evaluator = _evaluator(transformer)
    rng = torch.get_rng_state()
    first = evaluator.evaluate(OneProcess, transformer)
    assert evaluator.evaluate(OneProcess, transformer) == first  # the same weights: the same value, to the bit
    # The same clips, timesteps and noise in batches of another size: the same value but for rounding.
    assert _evaluator(transformer, batch_size=1).evaluate(OneProcess, transformer) == pytest.approx(first, rel=1e-6)
    base = evaluator.evaluate(OneProcess, transformer, base=True)
    # Training's random state, mode and adapter are as they were.
    assert torch.equal(torch.get_rng_state(), rng) and transformer.training
    assert all(p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n)
    assert evaluator.evaluate(OneProcess, transformer) == first

    # The base model's value is that of the adapter's update set to zero; the adapter's is another.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.zero_()
    assert evaluator.evaluate(OneProcess, transformer) == pytest.approx(base, rel=1e-6)
    assert abs(base - first) > 1e-4


def test_timesteps_spread_over_the_schedule():
    assert heldout.fixed_timesteps(4, 1000) == [125, 375, 625, 875]
    assert heldout.fixed_timesteps(1, 1000) == [500]


def test_split_is_chosen_by_seed_and_leaves_clips_to_train_on():
    clips = list(range(10))
    train, held = heldout.split_clips(clips, 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == clips and not set(train) & set(held)
    assert heldout.split_clips(clips, 0.2, seed=1) == (train, held)
    assert any(heldout.split_clips(clips, 0.2, seed=s)[1] != held for s in range(2, 6))
    assert len(heldout.split_clips(clips, 0.01, seed=1)[1]) == 1  # at least one
    with pytest.raises(heldout.DatasetError, match="leaving none to train on"):
        heldout.split_clips(clips[:1], 0.5, seed=1)


# ---------------------------------------------------------------------------------------------------------------
# Runs of the trainer


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory):
    """2 clips unlike the training clips (other colours and paths of the square), with their default prompts."""
    root = tmp_path_factory.mktemp("heldout")
    write_clips(root, num_clips=2, height=48, width=64, num_frames=25, fps=8, id_offset=4)
    return root


LEARNING = ["--max_train_steps", 8, "--checkpointing_steps", 4, "--learning_rate", "3e-2"]
HELDOUT = ["--validation_loss_steps", 2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_dataset_dir, heldout_dir):
    """A and B: the same run with the held-out loss; C: without it."""
    root = tmp_path_factory.mktemp("heldout_runs")
    for name, extra in (("A", HELDOUT), ("B", HELDOUT), ("C", [])):
        dataset = ["--validation_dataset", heldout_dir] if extra else []
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, root / name, root / "cache", *LEARNING, *extra,
                            *dataset))
    return root


def test_heldout_loss_repeats_and_leaves_training_unchanged(runs):
    a, b, c = (summary(runs / name) for name in "ABC")
    assert [s for s, _ in a["heldout_losses"]] == [2, 4, 6, 8]
    assert a["heldout_losses"] == b["heldout_losses"] and a["base_heldout_loss"] == b["base_heldout_loss"]
    # Turned on, it changes nothing of the training: the loss curve and the LoRA to the bit.
    assert a["train_losses"] == c["train_losses"] and len(c["train_losses"]) == 8
    assert max_abs_diff(lora(runs / "A"), lora(runs / "C")) == 0
    assert c["heldout_loss"] is None and c["best_checkpoint"] is None


def test_heldout_loss_falls_below_the_base_models(runs, heldout_dir):
    info = summary(runs / "A")
    losses = [loss for _, loss in info["heldout_losses"]]
    assert losses[-1] < losses[0] < info["base_heldout_loss"], (info["base_heldout_loss"], losses)
    assert info["heldout_loss"] == losses[-1]
    assert info["heldout_clips"] == [str(heldout_dir / "videos" / f"clip_00{i}.mp4") for i in (4, 5)]
    # Every checkpoint records its held-out loss; the best is the lowest of them.
    records = {s: checkpoints.read_losses(runs / "A" / f"checkpoint-{s}") for s in (4, 8)}
    assert {s: r["heldout_loss"] for s, r in records.items()} == {4: losses[1], 8: losses[3]}
    assert info["best_checkpoint"] == "checkpoint-8" and info["best_heldout_loss"] == losses[3]
    card = (runs / "A" / "README.md").read_text()
    assert "`checkpoint-8`" in card and f"{info['base_heldout_loss']:.6f}" in card and "(loss.png)" in card


def test_loss_chart_is_drawn(runs):
    from PIL import Image

    with Image.open(runs / "A" / "loss.png") as chart:
        colours = {colour for _, colour in chart.convert("RGB").getcolors(1 << 20)}
    # The held-out loss's line and the training loss's are there.
    assert (220, 90, 20) in colours and (170, 200, 230) in colours


def test_resume_keeps_the_best_checkpoint(tmp_path, tiny_dataset_dir):
    """On an image-to-video model, whose held-out clips are evaluated with their image latents; without
    --validation_loss_steps, at every checkpoint and at the end."""
    model_dir = build_model_folder(tmp_path / "tiny-i2v", size="tiny-i2v")
    out = tmp_path / "out"

    def run(steps, *extra):
        run_main(train_argv(model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", steps,
                            "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--learning_rate", "3e-2",
                            "--validation_split", "0.25", *extra))

    run(4)
    first = summary(out)
    # checkpoint-2 made the best on record: the resumed run must read it back, and pruning must leave it.
    record = checkpoints.read_losses(out / "checkpoint-2")
    (out / "checkpoint-2" / checkpoints.LOSSES_NAME).write_text(json.dumps({**record, "heldout_loss": -1.0}))
    run(8, "--resume_from_checkpoint", "latest")
    info = summary(out)
    assert info["resumed_at_step"] == 4
    assert info["best_checkpoint"] == "checkpoint-2" and info["best_heldout_loss"] == -1.0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    # The curves go on from where they were.
    assert info["heldout_losses"][:2] == first["heldout_losses"] and [s for s, _ in info["heldout_losses"]] == \
        [2, 4, 6, 8]
    assert info["train_losses"][:4] == first["train_losses"] and len(info["train_losses"]) == 8
    assert info["heldout_clips"] == first["heldout_clips"] and len(info["heldout_clips"]) == 1


def test_caption_dropout_is_seeded():
    seeds = [sample_seed(7, step, 0) for step in range(400)]
    dropped = [caption_dropped(s, 0.25) for s in seeds]
    assert dropped == [caption_dropped(s, 0.25) for s in seeds]  # a function of the sample's seed: resumable
    assert 0.15 < sum(dropped) / len(dropped) < 0.35
    assert not any(caption_dropped(s, 0.0) for s in seeds) and all(caption_dropped(s, 1.0) for s in seeds)


def test_caption_dropout_trains_on_the_empty_prompt(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    prompts = []
    draw_batch = train_cogvideox_lora.draw_batch

    def recording(videos, prompt_entries, seeds, *args, **kwargs):
        prompts.extend(zip(seeds, (p["prompt_embeds"] for p in prompt_entries)))
        return draw_batch(videos, prompt_entries, seeds, *args, **kwargs)

    monkeypatch.setattr(train_cogvideox_lora, "draw_batch", recording)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--max_train_steps",
                        8, "--caption_dropout", 0.5))
    dropped = [embeds for seed, embeds in prompts if caption_dropped(seed, 0.5)]
    kept = [embeds for seed, embeds in prompts if not caption_dropped(seed, 0.5)]
    assert len(prompts) == 8 and dropped and kept
    # The dropped samples all have one embedding, the empty prompt's, which no clip's prompt has.
    assert all(torch.equal(e, dropped[0]) for e in dropped)
    assert not any(torch.equal(e, dropped[0]) for e in kept)


def test_checkpoints_by_time(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    # A clock that moves a minute each time it is read: at the start, once a step, and at each checkpoint.
    minutes = iter(range(1000))
    monkeypatch.setattr(checkpoints, "now", lambda: 60.0 * next(minutes))
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 7,
                        "--checkpointing_steps", 100, "--checkpointing_minutes", 2.5))
    # Read at 0 (start); steps 1-3 read 1, 2, 3: due (3 >= 2.5); restarted at 4; steps 4-6 read 5, 6, 7: due.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    shutil.rmtree(out)


def test_heldout_clips_must_not_be_trained_on(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", *HELDOUT,
                            "--validation_dataset", tiny_dataset_dir))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and f"{tiny_dataset_dir / 'videos.txt'}:1: " in message
    assert "is also a training clip" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (HELDOUT, "--validation_loss_steps needs held-out clips"),
    ([*HELDOUT, "--validation_split", 1.5], "--validation_split 1.5 is a share"),
    (["--caption_dropout", 2], "--caption_dropout 2.0 is a probability"),
    (["--checkpointing_minutes", 0], "--checkpointing_minutes must be more than 0"),
])
def test_flags_are_checked_first(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", *flags))
    assert exit_.value.code == 2 and expected in capsys.readouterr().err
