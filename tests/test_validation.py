"""Validation videos (validation.py): made with the transformer being trained, one file per prompt and video."""

from types import SimpleNamespace

import decord
import torch
from diffusers import CogVideoXPipeline

from cogvideox_lora import synthetic
from cogvideox_lora.lora import add_lora
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.settings import ValidationSettings
from cogvideox_lora.validation import PipelineParts, Validator


def test_each_prompt_gets_its_videos_at_the_validation_size(tmp_path):
    pipe = synthetic.build_pipeline("tiny", text_encoder=False)
    add_lora(pipe.transformer, 4, 4)  # the transformer being trained; its first validation also makes the base's
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    chosen = ValidationSettings(prompts=("a red square", "A brown bear!"), images=(), num_videos=2,
                                num_inference_steps=2, guidance_scale=6.0, use_dynamic_cfg=False, num_frames=9,
                                height=48, width=64, fps=8, seed=0, output_dir=str(tmp_path))
    parts = PipelineParts(CogVideoXPipeline, pipe.scheduler.config, lambda: pipe.vae, torch.float32)
    validator = Validator(chosen, prompt_embeds, torch.zeros_like(prompt_embeds[0]), parts, Placement(Plan(), "cpu"))
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"),
                                  unwrap_model=lambda model: model, trackers=[])
    paths = validator.run(accelerator, pipe.transformer, step=3)
    assert [p.name for p in paths] == ["step-000003_p0_v0_a-red-square.mp4", "step-000003_p0_v1_a-red-square.mp4",
                                       "step-000003_p1_v0_a-brown-bear.mp4", "step-000003_p1_v1_a-brown-bear.mp4"]
    frames = [decord.VideoReader(str(path)).get_batch(list(range(9))).asnumpy() for path in paths]
    assert all(f.shape == (9, 48, 64, 3) for f in frames)
    # Video v of each prompt starts from seed + v: the two videos of a prompt differ, and so do the prompts.
    assert all((a.astype(int) - b.astype(int)).any() for a, b in ((frames[0], frames[1]), (frames[0], frames[2])))


def test_videos_of_a_width_decord_pads_are_logged_to_tensorboard(tmp_path):
    # decord returns 72-wide frames with padded rows: the GIF must still hold the picture, 72 wide.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from cogvideox_lora.validation import log_videos

    synthetic.write_clips(tmp_path / "clips", num_clips=1, height=48, width=72, num_frames=5, fps=8)
    writer = SummaryWriter(str(tmp_path / "logs"))
    accelerator = SimpleNamespace(trackers=[SimpleNamespace(name="tensorboard", writer=writer)])
    log_videos(accelerator, [("validation/p0_v0", "a red square", tmp_path / "clips" / "videos" / "clip_000.mp4")],
               step=2, fps=8)
    writer.flush()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    image = events.Images("validation/p0_v0")[0]
    assert (image.step, image.width, image.height) == (2, 72, 48)
