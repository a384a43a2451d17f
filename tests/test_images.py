"""Images read as viewers show them, wherever one is read: stills trained as clips, I2V conditioning images,
validation images and cli_demo.py's image (EXIF orientation, 16-bit depth); validation images opened in the input
check; decord's padded 4-channel frames."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_clips, run_main, train_argv
from cogvideox_lora import inference
from cogvideox_lora.data import FrameSettings, check_clips, read_conditioning_image, read_frames
from cogvideox_lora.images import open_image, read_image
from cogvideox_lora.synthetic import clip_frames, write_clips
from cogvideox_lora.validation import load_validation_image

# Stored 64 wide and 48 high with a red top-left corner; tag 6 says "turn 90 degrees clockwise to view", so it
# shows 48 wide and 64 high with the red corner at the top right.
STORED_H, STORED_W = 48, 64


def sideways_photo(path, quality=95):
    pixels = np.full((STORED_H, STORED_W, 3), 40, np.uint8)
    pixels[:12, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": quality} if str(path).endswith(".jpg") else {}))
    return path


def grey_16_bit_png(path, level=32768):
    Image.new("I;16", (STORED_W, STORED_H), level).save(path)
    return path


def is_upright(chw: torch.Tensor) -> bool:
    """[3, 64, 48] with the red corner at the top right."""
    red = (chw[0].float() > 0.6 * chw[0].float().max()) & (chw[1].float() < 0.3 * chw[0].float().max())
    return tuple(chw.shape[-2:]) == (STORED_W, STORED_H) and bool(red[:8, -8:].all()) and not red[:8, :8].any()


def test_read_image_applies_exif_orientation_as_diffusers_load_image(tmp_path):
    from diffusers.utils import load_image

    path = sideways_photo(tmp_path / "phone.jpg")
    assert read_image(path).size == load_image(str(path)).size == (STORED_H, STORED_W)
    assert is_upright(open_image(path))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = grey_16_bit_png(tmp_path / "grey16.png")
    assert Image.open(path).mode == "I;16"
    pixels = open_image(path).float()
    assert pixels.shape == (3, STORED_H, STORED_W)
    assert abs(pixels.mean().item() - 32768 / 257) < 1, pixels.mean()  # mid-grey, not white


def frame_settings(height=64, width=48):
    return FrameSettings(height, width, 8, 9, 0, 0, "center", 4)


def test_a_sideways_still_trains_upright_and_a_16_bit_one_mid_grey(tmp_path):
    sideways_photo(tmp_path / "still.jpg")
    grey_16_bit_png(tmp_path / "grey.png")
    (tmp_path / "videos.txt").write_text("still.jpg\ngrey.png\n")
    (tmp_path / "prompts.txt").write_text("a photo\na grey card\n")
    clips = load_clips(tmp_path, "prompts.txt", "videos.txt")
    good, _ = check_clips(clips, frame_settings())
    assert [c.probe[1:] for c in good] == [(STORED_W, STORED_H), (STORED_H, STORED_W)]  # shown height, width
    upright = ((read_frames(tmp_path / "still.jpg", frame_settings())[0] + 1) * 127.5).round()
    assert is_upright(upright)
    grey = read_frames(tmp_path / "grey.png", frame_settings(STORED_H, STORED_W))
    assert abs(grey.mean().item()) < 0.02  # 128 of 255 is 0 in [-1, 1]; white would be 1


def test_conditioning_and_validation_images_are_read_the_same_way(tmp_path):
    write_clips(tmp_path, num_clips=1)
    sideways_photo(tmp_path / "first.jpg")
    (tmp_path / "images.txt").write_text("first.jpg\n")
    clip, = load_clips(tmp_path, "prompts.txt", "videos.txt")
    conditioning = read_conditioning_image(clip, frame_settings())[0]
    assert is_upright(((conditioning + 1) * 127.5).round())
    assert is_upright((load_validation_image(tmp_path / "first.jpg", 64, 48)[0] * 255).round())
    image, note = inference.conditioning_image(tmp_path / "first.jpg", 64, 48)
    assert is_upright((image[0] * 255).round()) and note is None
    torch.testing.assert_close(image, load_validation_image(tmp_path / "first.jpg", 64, 48))

    grey = load_validation_image(grey_16_bit_png(tmp_path / "grey.png"), 48, 64)
    assert abs(grey.mean().item() - 0.5) < 0.01


def test_unreadable_validation_images_are_refused_before_any_model(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                   no_models, capsys):
    broken, folder = tmp_path / "broken.png", tmp_path / "a_folder.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder.mkdir()
    with pytest.raises(SystemExit):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--validation_prompt", "a:::b", "--validation_images", f"{broken}:::{folder}"))
    err = capsys.readouterr().err
    assert f"--validation_images: {broken}: it cannot be read as an image" in err
    assert f"--validation_images: {folder}: it is a folder" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("width", [72, 80])
def test_frames_decord_pads_to_4_channels_come_out_rgb(tmp_path, width):
    # decord returns 72-wide frames as [H, W, 4] (RGB rows padded to FFmpeg's alignment), 80-wide as [H, W, 3].
    write_clips(tmp_path, num_clips=1, height=48, width=width, num_frames=9)
    clip, = load_clips(tmp_path, "prompts.txt", "videos.txt")
    s = FrameSettings(48, width, 8, 9, 0, 0, "none", 4)
    check_clips([clip], s)
    frames = read_frames(clip.video, s)
    assert frames.shape == (9, 3, 48, width)
    pixels = ((frames + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels - clip_frames(0, 48, width, 9)).mean() < 2.0
