"""Random-init CogVideoX model folders and generated clips whose content is known.

Nothing here touches a model hub: the tokenizer is a SentencePiece model trained on a
built-in corpus and every network is randomly initialised, so `make demo`, the tests and
the GPU benchmarks run anywhere.

    python -m cogvideox_lora.synthetic model --size tiny OUT_DIR [--seed N] [--dtype bf16|fp16|fp32]
    python -m cogvideox_lora.synthetic clips OUT_DIR --num_clips 4 --height 48 --width 64 --num_frames 25 --fps 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

# diffusers, transformers and the codecs are imported inside the functions that need them, so that
# writing clips does not pay the seconds it takes to import the model libraries.

SIZES = ("tiny", "tiny-5b", "tiny-i2v", "tiny-1.5", "tiny-1.5-i2v", "2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v")

# Real sizes: the diffusers class defaults are CogVideoX-2b; the 5b values are those of
# THUDM/CogVideoX-5b transformer/config.json, vae/config.json and scheduler_config.json.
# The I2V and 1.5 values are those diffusers' scripts/convert_cogvideox_to_diffusers.py writes for
# THUDM/CogVideoX-5b-I2V (--i2v: in_channels 32, learned positional embeddings) and
# THUDM/CogVideoX1.5-5B(-I2V) (--version 1.5: patch_size_t 2, no patch bias, sample 300x300x81, VAE
# invert_scale_latents; with --i2v in_channels 32 and ofs_embed_dim 512), which match the published
# transformer/config.json files of those repos. Their schedulers are taken to be 5b's (snr_shift_scale 1.0).
_TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    # 16, not 8: the 3D rotary embedding splits the head dim into t/h/w parts of
    # head_dim/4 and 3*head_dim/8, which must all be even.
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=4,
    text_embed_dim=32,
    num_layers=2,
    sample_width=8,
    sample_height=6,
    sample_frames=49,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=16,
)
_TINY_VAE = dict(
    block_out_channels=(8, 8, 8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    # Tiles are half these sizes; at the real 480x720 the tiny clips are never tiled, whose tile
    # arithmetic only adds up at real sizes (a 64-wide clip in 32-wide tiles comes out 9 latents wide).
    sample_height=480,
    sample_width=720,
)
_TINY_T5 = dict(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=8, feed_forward_proj="gated-gelu")
# google/t5-v1_1-xxl, the text encoder every CogVideoX ships.
_XXL_T5 = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu",
               vocab_size=32128)
_5B_TRANSFORMER = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
_I2V = dict(in_channels=32, use_learned_positional_embeddings=True)
_1_5 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
_1_5_I2V = dict(_1_5, in_channels=32, ofs_embed_dim=512)
_1_5_VAE = dict(scaling_factor=0.7, invert_scale_latents=True)
# Tiny versions of the same: twice the latent channels in, the learned table made for the tests' 9x48x64,
# and an ofs embedding as wide as the time embedding it is added to. 1.5's sample size only bounds its
# rotary grid, so the real one serves.
_TINY_5B_TRANSFORMER = {**_TINY_TRANSFORMER, "use_rotary_positional_embeddings": True}
_TINY_I2V = dict(in_channels=8, use_learned_positional_embeddings=True, sample_frames=9)
_TINY_1_5_I2V = dict(_1_5, in_channels=8, ofs_embed_dim=_TINY_TRANSFORMER["time_embed_dim"])


def _spec(transformer, vae, text_encoder, snr_shift_scale, image_to_video=False):
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, snr_shift_scale=snr_shift_scale,
                image_to_video=image_to_video)


SPECS = {
    "tiny": _spec(_TINY_TRANSFORMER, _TINY_VAE, _TINY_T5, 3.0),
    # Every way 5b differs from 2b, at tiny size: rotary embeddings, VAE scale, SNR shift.
    "tiny-5b": _spec(_TINY_5B_TRANSFORMER, {**_TINY_VAE, "scaling_factor": 0.7}, _TINY_T5, 1.0),
    "tiny-i2v": _spec({**_TINY_5B_TRANSFORMER, **_TINY_I2V}, {**_TINY_VAE, "scaling_factor": 0.7}, _TINY_T5, 1.0,
                      image_to_video=True),
    "tiny-1.5": _spec({**_TINY_5B_TRANSFORMER, **_1_5}, {**_TINY_VAE, **_1_5_VAE}, _TINY_T5, 1.0),
    "tiny-1.5-i2v": _spec({**_TINY_5B_TRANSFORMER, **_TINY_1_5_I2V}, {**_TINY_VAE, **_1_5_VAE}, _TINY_T5, 1.0,
                          image_to_video=True),
    "2b": _spec({}, {}, _XXL_T5, 3.0),
    "5b": _spec(_5B_TRANSFORMER, {"scaling_factor": 0.7}, _XXL_T5, 1.0),
    "5b-i2v": _spec({**_5B_TRANSFORMER, **_I2V}, {"scaling_factor": 0.7}, _XXL_T5, 1.0, image_to_video=True),
    "1.5-5b": _spec({**_5B_TRANSFORMER, **_1_5}, _1_5_VAE, _XXL_T5, 1.0),
    "1.5-5b-i2v": _spec({**_5B_TRANSFORMER, **_1_5_I2V}, _1_5_VAE, _XXL_T5, 1.0, image_to_video=True),
}

# As THUDM/CogVideoX-2b scheduler/scheduler_config.json; 5b differs only in snr_shift_scale.
_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
)

# The last two lines give every character of an ordinary English prompt a piece, not <unk>.
_CORPUS = """\
a red square drifting across a grey background
a green square sliding slowly over a flat grey backdrop
a blue square moving from left to right on a grey screen
a yellow square bouncing around a plain grey frame
mickey mouse dances on a wooden stage under a bright spotlight
mickey waves his hand and smiles at the camera
a cartoon mouse whistles while steering a steamboat down the river
a brown bear walks through a dense green forest in the morning
a polar bear swims in icy water next to a floating glacier
two bear cubs play in the tall grass near a mountain stream
a red car drives along a coastal road at sunset
a vintage car speeds down an empty desert highway
a police car with flashing lights turns a corner in the rain
a cat jumps onto a kitchen table and knocks over a cup
a dog runs across the beach chasing a ball
a flock of birds flies over a calm lake at dawn
waves crash against the rocks on a stormy afternoon
a time lapse of clouds rolling over a city skyline
a person in a yellow raincoat walks down a busy street
a chef slices vegetables on a wooden cutting board
a close up of coffee being poured into a white mug
a hot air balloon rises slowly into a clear blue sky
a train passes through a snowy valley between tall pine trees
a golden retriever sleeps on a couch by the window
children fly colorful kites in a park on a windy day
an astronaut floats inside a space station and looks at the earth
a panda eats bamboo while sitting in the shade
a sailboat glides across the sea with white sails
fireworks explode above a river at night
a slow pan across a field of sunflowers in summer
rain drops fall on the surface of a quiet pond
the camera follows a cyclist riding through a mountain pass
a video of a toy robot walking on a desk
smoke rises from a campfire under a starry sky
a skateboarder performs a trick in an empty parking lot
a close up of a flower opening in the sun
A Cat, a Dog and The Bear: 0 1 2 3 4 5 6 7 8 9 "quoted" (aside) - yes! no? it's 8 fps.
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'"()-
"""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Creating the modules directly in the target dtype keeps a bf16 T5-XXL at ~10 GB of RAM
    # instead of the ~19 GB an fp32 build followed by a cast would peak at.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_tokenizer(model_max_length: int = 226):
    """A T5Tokenizer on a SentencePiece unigram model trained on the built-in corpus, with T5's
    special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=200,
        # Keep even the rarest corpus characters (digits, capitals) as pieces.
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        # One thread and no shuffling make the trained model the same on every run.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model.getvalue())
        return T5Tokenizer.from_pretrained(folder, model_max_length=model_max_length)


def build_pipeline(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   text_encoder: bool = True):
    """An in-memory, randomly initialised CogVideoXPipeline (CogVideoXImageToVideoPipeline for the I2V
    sizes) of the given size; without tokenizer and T5 unless text_encoder.

    device="cuda" draws the random weights on the GPU: minutes faster for the real sizes.
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    if size not in SPECS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    spec = SPECS[size]
    transformer_config = spec["transformer"]
    max_text_seq_length = transformer_config.get("max_text_seq_length", 226)

    tokenizer = build_tokenizer(model_max_length=max_text_seq_length)
    # Tiny encoders get exactly the tokenizer's vocabulary; real ones keep T5-XXL's 32128 rows.
    # T5Config's default pad (0) and eos (1) ids are the tokenizer's.
    text_encoder_config = T5Config(**{"vocab_size": len(tokenizer), **spec["text_encoder"]})

    # Seeding before each module keeps every module's weights independent of the others'
    # sizes, so e.g. changing the VAE does not change the transformer.
    with _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(text_encoder_config).eval() if text_encoder else None
        torch.manual_seed(seed + 1)
        transformer = CogVideoXTransformer3DModel(**transformer_config).eval()
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLCogVideoX(**spec["vae"]).eval()
    scheduler = CogVideoXDPMScheduler(**_SCHEDULER, snr_shift_scale=spec["snr_shift_scale"])

    pipeline_class = CogVideoXImageToVideoPipeline if spec["image_to_video"] else CogVideoXPipeline
    return pipeline_class(tokenizer=tokenizer if text_encoder else None, text_encoder=text_encoder, vae=vae,
                          transformer=transformer, scheduler=scheduler)


def build_model_folder(path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: str = "cpu", text_encoder_from=None) -> Path:
    """Write a complete diffusers CogVideoX model folder (model_index.json, tokenizer, text_encoder,
    transformer, vae, scheduler) with random weights; loads with CogVideoXPipeline.from_pretrained.

    text_encoder_from: a model folder whose tokenizer and T5 this one links to instead of drawing its own (every
    CogVideoX has the same T5-XXL, 9 GiB of disk at real size).
    """
    path = Path(path)
    pipe = build_pipeline(size, seed=seed, dtype=dtype, device=device, text_encoder=text_encoder_from is None)
    pipe.save_pretrained(path, safe_serialization=True)
    if text_encoder_from is not None:
        index_path = path / "model_index.json"
        index = json.loads(index_path.read_text())
        donor = json.loads((Path(text_encoder_from) / "model_index.json").read_text())
        for name in ("tokenizer", "text_encoder"):
            index[name] = donor[name]
            (path / name).symlink_to(Path(text_encoder_from, name).absolute(), target_is_directory=True)
        index_path.write_text(json.dumps(index, indent=2))
    return path


# Frame k of every clip has a flat grey background of _BG_OFFSET + _BG_STEP * k. H.264 in
# yuv420p moves a flat grey by at most 1, well inside half a step.
_BG_OFFSET = 2
_BG_STEP = 4
MAX_FRAMES = (255 - _BG_OFFSET) // _BG_STEP + 1

_SQUARE_COLOURS = [
    ("red", (220, 30, 30)),
    ("green", (30, 200, 40)),
    ("blue", (30, 60, 230)),
    ("yellow", (230, 210, 20)),
    ("magenta", (210, 40, 200)),
    ("cyan", (20, 200, 210)),
    ("orange", (240, 130, 10)),
    ("purple", (120, 40, 180)),
]


def clip_frames(clip_id: int, height: int, width: int, num_frames: int) -> np.ndarray:
    """[F, H, W, 3] uint8: the grey frame-index background plus a square of the clip's colour
    that moves diagonally from a clip-dependent start."""
    _, colour = _SQUARE_COLOURS[clip_id % len(_SQUARE_COLOURS)]
    # At most a quarter of each side, so the background is far more than half of every frame
    # and its median stays the background value.
    side_h, side_w = max(2, height // 4), max(2, width // 4)
    span_y, span_x = height - side_h + 1, width - side_w + 1
    start_y, start_x = (7 * clip_id) % span_y, (13 * clip_id) % span_x

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for k in range(num_frames):
        frames[k] = _BG_OFFSET + _BG_STEP * k
        y, x = (start_y + k) % span_y, (start_x + 2 * k) % span_x
        frames[k, y: y + side_h, x: x + side_w] = colour
    return frames


def default_prompt(clip_id: int) -> str:
    name, _ = _SQUARE_COLOURS[clip_id % len(_SQUARE_COLOURS)]
    return f"a {name} square drifting across a grey background, clip {clip_id}"


def write_clips(root, num_clips: int = 4, height: int = 48, width: int = 64, num_frames: int = 25, fps: int = 8,
                prompts: list[str] | None = None, id_offset: int = 0) -> list[str]:
    """Write root/videos/clip_XXX.mp4 (H.264, yuv420p), root/videos.txt and root/prompts.txt.

    Clip i is numbered id_offset + i, which sets its file name, its square's colour and path, and its
    default prompt, so a second call with an offset writes different clips (e.g. a validation set).
    videos.txt and prompts.txt list the clips of this call only. Returns the relative video paths.
    """
    import imageio.v2 as imageio

    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even height and width, got {height}x{width}")
    if height < 48 or width < 64:
        raise ValueError(f"decord cannot read frames smaller than 48x64, got {height}x{width}")
    if not 1 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be in 1..{MAX_FRAMES} for the frame index to be encodable")
    clip_ids = [id_offset + i for i in range(num_clips)]
    if prompts is None:
        prompts = [default_prompt(clip_id) for clip_id in clip_ids]
    if len(prompts) != num_clips or any("\n" in p for p in prompts):
        raise ValueError("need exactly one single-line prompt per clip")

    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    videos = []
    for clip_id in clip_ids:
        relative = f"videos/clip_{clip_id:03d}.mp4"
        # quality 9 is crf 5: near lossless without the lossless High 4:4:4 profile that some
        # decoders reject; macro_block_size=1 stops imageio from resizing the frames.
        writer = imageio.get_writer(root / relative, fps=fps, codec="libx264", quality=9, pixelformat="yuv420p",
                                    macro_block_size=1)
        with writer:
            for frame in clip_frames(clip_id, height, width, num_frames):
                writer.append_data(frame)
        videos.append(relative)

    (root / "videos.txt").write_text("".join(v + "\n" for v in videos))
    (root / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    return videos


def frame_index_from_pixels(frame, value_range: tuple[float, float] = (0, 255)) -> int:
    """The source frame index k of a decoded frame of a clip from write_clips.

    frame: one frame as a numpy array or CPU tensor, in any layout (HWC, CHW, grey), resized or not;
    value_range: what black and white are in it, e.g. (-1, 1) for frames normalised for the VAE.
    """
    low, high = value_range
    values = np.asarray(frame, dtype=np.float64)
    # The median of all values is the background's: the square covers at most 1/16 of the frame.
    grey = (np.median(values) - low) / (high - low) * 255.0
    return int(round((grey - _BG_OFFSET) / _BG_STEP))


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogvideox_lora.synthetic", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="write a random-init CogVideoX model folder")
    model.add_argument("out_dir")
    model.add_argument("--size", choices=SIZES, default="tiny")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    model.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster)")

    clips = commands.add_parser("clips", help="write mp4 clips with known frame content, videos.txt and prompts.txt")
    clips.add_argument("out_dir")
    clips.add_argument("--num_clips", type=int, default=4)
    clips.add_argument("--height", type=int, default=48)
    clips.add_argument("--width", type=int, default=64)
    clips.add_argument("--num_frames", type=int, default=25)
    clips.add_argument("--fps", type=int, default=8)
    clips.add_argument("--id_offset", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "model":
        path = build_model_folder(args.out_dir, size=args.size, seed=args.seed, dtype=_DTYPES[args.dtype],
                                  device=args.device)
        for item in sorted(path.iterdir()):
            print(item)
    else:
        videos = write_clips(args.out_dir, num_clips=args.num_clips, height=args.height, width=args.width,
                             num_frames=args.num_frames, fps=args.fps, id_offset=args.id_offset)
        root = Path(args.out_dir)
        for video in videos:
            print(root / video)
        print(root / "videos.txt")
        print(root / "prompts.txt")


if __name__ == "__main__":
    main()
