"""Placement (placement.py), the owner of the memory plan once made: it sets the plan up on the transformer, and
makes room for validation videos (guidance one sample at a time, tiles, frozen weights on the host)."""

import pytest

from cogvideox_lora import placement
from cogvideox_lora.memory import Plan
from helpers import (STAND_IN_CALLS, lora, lora_step, max_abs_diff, register_stand_in, run_main, summary, tiny_inputs,
                     tiny_transformer, train_argv)


def test_validation_runs_guidance_one_sample_at_a_time():
    # The same video as the pipeline's batch of two, and the transformer as it was afterwards.
    import torch
    from cogvideox_lora import synthetic
    from cogvideox_lora.placement import one_sample_at_a_time

    pipe = synthetic.build_pipeline("tiny-5b")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)

    def video():
        return pipe(prompt="a red square", num_frames=9, height=48, width=64, num_inference_steps=2,
                    guidance_scale=6.0, generator=torch.Generator().manual_seed(1), output_type="pt",
                    max_sequence_length=16).frames

    batched = video()
    assert calls == [2, 2]
    with one_sample_at_a_time(pipe.transformer):
        split = video()
    assert calls[2:] == [1, 1, 1, 1]
    assert (split - batched).abs().max() < 1e-4
    assert "forward" not in pipe.transformer.__dict__


def test_validation_tiles_come_back_as_they_were():
    from cogvideox_lora import synthetic
    from cogvideox_lora.placement import tiles

    vae = synthetic.build_pipeline("tiny", text_encoder=False).vae
    assert not vae.use_tiling
    sides = vae.tile_sample_min_height, vae.tile_sample_min_width
    with tiles(vae, 0.5):
        assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width) == (120, 180)
        assert (vae.tile_latent_min_height, vae.tile_latent_min_width) == (15, 22)
    assert not vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width) == sides
    with tiles(vae, None):
        assert not vae.use_tiling


@pytest.mark.slow
def test_a_crowded_decode_mid_run_leaves_training_as_it_was(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch,
                                                           caplog):
    # Validation after step 2 of 4, with and without the GPU taken to be full (100 GiB held against a training peak
    # of 0): the crowded decode moves the transformer's frozen weights to the host and back, and shrinks the tiles.
    from cogvideox_lora import placement

    argv = ["--max_train_steps", 4, "--validation_prompt", "a brown bear", "--validation_steps", 2]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "roomy", tmp_path / "cache", *argv))
    monkeypatch.setattr(placement, "gpu_held_gib", lambda: 100.0)
    with caplog.at_level("INFO"):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "crowded", tmp_path / "cache", *argv))
    assert "decode with the transformer's frozen weights on the host and tiles of 0.25 times" in caplog.text
    assert max_abs_diff(lora(tmp_path / "roomy"), lora(tmp_path / "crowded")) == 0
    assert len(summary(tmp_path / "crowded")["validation_videos"]) == 1
    assert sorted(p.name[:11] for p in (tmp_path / "crowded" / "validation").glob("step-*.mp4")) == \
        ["step-000002", "step-000004"]


@pytest.mark.parametrize("plan, forwards, swapped", [(Plan(), 1, None), (Plan("full"), 2, None),
                                                      (Plan("keep_attention", True, 2), 1, 2)])
def test_apply_sets_up_the_plan(plan, forwards, swapped):
    layers = 3
    transformer = tiny_transformer(layers, kernel=register_stand_in())
    placed = placement.Placement(plan, "cpu")
    placed.apply(transformer)
    assert (placed.swap and len(placed.swap.order)) == swapped
    STAND_IN_CALLS.update(forward=0, backward=0)
    lora_step(transformer, tiny_inputs(transformer))
    # Checkpointed blocks run their attention again in the backward pass, unless the policy keeps it.
    assert STAND_IN_CALLS == {"forward": layers * forwards, "backward": layers}
