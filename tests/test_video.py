"""Issue 14: clips made the ways real ones are (open-GOP x264 and x265, H.264 in AVI, WMV, variable frame rate,
damage mid-clip, a phone's rotation tag, anamorphic pixels, animated WebP) train on the frames a player shows at the
sampled times, or are refused with the file and line, before any model loads."""

import logging
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest

from helpers import load_clips, run_main, train_argv
from cogvideox_lora.data import DatasetError, FrameSettings, check_clips, is_single_image, read_frames, read_index
from cogvideox_lora.latent_cache import LatentCache, encode_videos
from cogvideox_lora.synthetic import clip_frames, frame_index_from_pixels

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# Frame k's background is grey level 2 + 4k (synthetic.clip_frames), which every codec here keeps within a level or
# two: the frame number survives compression, resizing and cropping.
HEIGHT, WIDTH, FRAMES, RATE = 64, 96, 40, 24
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "8"]
CODECS = {
    "x264-open-gop.mp4": X264 + ["-x264-params", "open-gop=1:keyint=12:bframes=3"],
    "x264-open-gop.mkv": X264 + ["-x264-params", "open-gop=1:keyint=12:bframes=3"],
    "x265.mp4": ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-crf", "8", "-x265-params", "keyint=12:log-level=error"],
    "x265.mkv": ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-crf", "8", "-x265-params", "keyint=12:log-level=error"],
    "h264.avi": X264 + ["-x264-params", "keyint=12:bframes=3"],
    "wmv2.wmv": ["-c:v", "wmv2", "-q:v", "2", "-g", "12"],
}


def ffmpeg(*args, stdin: bytes | None = None):
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *map(str, args)], input=stdin, check=True)


def encode(path: Path, frames: np.ndarray, output: list, fps: int = RATE) -> Path:
    """Raw RGB frames through ffmpeg's stdin, encoded with the given output options."""
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{frames.shape[2]}x{frames.shape[1]}", "-r", fps, "-i", "-",
           *output, path, stdin=frames.tobytes())
    return path


def decode_errors(path: Path, *options) -> str:
    """What ffmpeg reports decoding the clip (one thread, so the same every time)."""
    return subprocess.run([FFMPEG, "-v", "error", "-threads", "1", "-i", path, *map(str, options), "-f", "null", "-"],
                          capture_output=True, text=True).stderr


@pytest.fixture(scope="session")
def real_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_clips")
    frames = clip_frames(0, HEIGHT, WIDTH, FRAMES)
    clips = {name: encode(root / name, frames, output) for name, output in CODECS.items()}
    clips["vfr.mp4"] = encode(root / "vfr.mp4", frames, X264 + [
        "-vf", "setpts='if(lt(N,24),N/24,1+(N-24)/12)/TB'", "-fps_mode", "vfr", "-video_track_timescale", "12000"])
    plain = encode(root / "plain.mp4", frames, X264)
    # A phone's portrait clip: landscape pictures with a display rotation tag, as cameras write them.
    clips["rotated.mp4"] = root / "rotated.mp4"
    ffmpeg("-display_rotation", 90, "-i", plain, "-c", "copy", clips["rotated.mp4"])
    # Anamorphic: pixels twice as wide as high; a white bar 16 stored pixels wide shows 32 wide.
    barred = frames.copy()
    barred[:, :, 40:56] = 255
    clips["anamorphic.mp4"] = encode(root / "anamorphic.mp4", barred, X264 + ["-vf", "setsar=2/1"])
    clips["animated.webp"] = encode(root / "animated.webp", frames[:12], ["-c:v", "libwebp_anim", "-lossless", 1,
                                                                          "-loop", 0], fps=8)
    # Damage in the middle: the first 8 frames decode (frame 0 was all the old check looked at), later ones do not.
    data = bytearray(plain.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    clips["damaged.mp4"] = root / "damaged.mp4"
    for fraction in (0.3, 0.35, 0.4, 0.45, 0.5):
        damaged = bytearray(data)
        start = int(len(damaged) * fraction)
        damaged[start:start + len(noise)] = noise
        clips["damaged.mp4"].write_bytes(damaged)
        if not decode_errors(clips["damaged.mp4"], "-frames:v", 8) and decode_errors(clips["damaged.mp4"]):
            break
    else:
        pytest.fail("no damage in the middle")
    return clips


def settings(height=HEIGHT, width=WIDTH, fps=8, max_num_frames=49, mode="center"):
    return FrameSettings(height, width, fps, max_num_frames, 0, 0, mode, 4)


def frame_numbers(frames) -> list[int]:
    return [frame_index_from_pixels(f, value_range=(-1, 1)) for f in frames]


@pytest.mark.parametrize("name", sorted(CODECS))
def test_open_gop_avi_and_wmv_give_the_frames_at_the_sampled_times(real_clips, name):
    # 40 frames at 24 fps, sampled at 8 fps: every third frame. decord's get_batch seeks and, in these files,
    # returns repeated or earlier frames.
    assert frame_numbers(read_frames(real_clips[name], settings())) == list(range(0, 37, 3))
    assert frame_numbers(read_frames(real_clips[name], settings(fps=24, max_num_frames=37))) == list(range(37))


def shown_at(starts: list[Fraction], end: Fraction, fps: int, count: int) -> list[int]:
    """Exact arithmetic: the frame on screen at each k/fps before the clip ends, cut to 4k+1."""
    shown = []
    for k in range(count):
        if Fraction(k, fps) >= end:
            break
        shown.append(max(i for i, start in enumerate(starts) if start <= Fraction(k, fps)))
    return shown[:(len(shown) - 1) // 4 * 4 + 1]


def test_variable_frame_rate_is_sampled_by_presentation_time(real_clips):
    # 24 frames at 24 fps, then 16 at 12 fps.
    starts = [Fraction(k, 24) for k in range(24)] + [1 + Fraction(k, 12) for k in range(16)]
    path = real_clips["vfr.mp4"]
    # At 8 fps: every third frame while the clip runs at 24 fps, then one and a half frames a step.
    assert frame_numbers(read_frames(path, settings(fps=8))) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 25, 27, 28, 30, 31,
                                                                 33, 34, 36]
    # Faster than the clip: a frame repeats as long as it stays on screen.
    assert frame_numbers(read_frames(path, settings(fps=30))) == shown_at(starts, Fraction(7, 3), 30, 49)


def test_a_rotated_phone_clip_is_upright_as_a_player_shows_it(real_clips):
    path = real_clips["rotated.mp4"]
    # What ffmpeg shows (it applies the rotation tag), frame by frame.
    shown = subprocess.run([FFMPEG, "-loglevel", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                           capture_output=True, check=True).stdout
    shown = np.frombuffer(shown, np.uint8).reshape(FRAMES, WIDTH, HEIGHT, 3).astype(np.float64)
    frames = read_frames(path, settings(height=WIDTH, width=HEIGHT, mode="none"))
    pixels = ((frames.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    assert frame_numbers(frames) == list(range(0, 37, 3))
    assert np.abs(pixels - shown[0:37:3]).mean() < 1.0


def test_anamorphic_pixels_are_widened_before_the_crop(real_clips):
    # 96 stored columns of pixels twice as wide show 192 wide: into 64x96 the centre half is kept at full size,
    # and the 16-pixel bar (stored columns 40..55, shown 80..111) comes out 32 wide at columns 32..63.
    frames = read_frames(real_clips["anamorphic.mp4"], settings(max_num_frames=1))
    white = (frames[0] > 0.8).all(dim=0)[HEIGHT // 2].nonzero().flatten().tolist()
    assert white[0] in (31, 32, 33) and white[-1] in (62, 63, 64) and 30 <= len(white) <= 34


def test_an_animated_webp_is_a_clip_and_a_still_one_an_image(real_clips, tmp_path):
    path = real_clips["animated.webp"]
    assert not is_single_image(path)
    # 12 frames at 8 fps (125 ms each).
    assert frame_numbers(read_frames(path, settings(fps=8))) == list(range(9))
    assert frame_numbers(read_frames(path, settings(fps=4))) == [0, 2, 4, 6, 8]
    still = tmp_path / "still.webp"
    ffmpeg("-i", path, "-frames:v", 1, still)
    assert is_single_image(still)
    assert read_frames(still, settings(fps=8)).shape == (1, 3, HEIGHT, WIDTH)


def dataset(root: Path, clips: dict, names: list[str], prompts: list[str] | None = None) -> Path:
    (root / "videos").mkdir(parents=True)
    for name in names:
        shutil.copy(clips[name], root / "videos" / name)
    (root / "videos.txt").write_text("".join(f"videos/{n}\n" for n in names))
    (root / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts or [f"clip {n}" for n in names]))
    return root


def test_damage_in_the_middle_is_found_by_the_check_and_skipped(real_clips, tmp_path):
    names = ["x264-open-gop.mp4", "damaged.mp4", "h264.avi"]
    clips = load_clips(dataset(tmp_path / "data", real_clips, names), "prompts.txt", "videos.txt")
    with pytest.raises(DatasetError) as error:
        check_clips(clips, settings(max_num_frames=13))
    problem, = error.value.problems
    damaged = tmp_path / "data" / "videos" / "damaged.mp4"
    where = f"{tmp_path / 'data' / 'videos.txt'}:2: {damaged} cannot be decoded (the file is damaged: decoding fails"
    assert problem.startswith(where)
    assert f"ffmpeg -i {damaged} -c:v libx264 -pix_fmt yuv420p -r 24 {damaged.with_name('damaged_fixed.mp4')}" \
        in problem
    good, skipped = check_clips(clips, settings(max_num_frames=13), skip_bad=True)
    assert [c.video.name for c in good] == ["x264-open-gop.mp4", "h264.avi"]
    assert skipped == [problem]


def test_the_command_line_reports_damage_long_prompts_folders_before_any_model(real_clips, tmp_path, tiny_model_dir,
                                                                               no_models, caplog):
    names = ["x264-open-gop.mp4", "damaged.mp4", "vfr.mp4"]
    long_prompt = "a red square drifting across a grey background while the camera slowly pans to the left"
    data = dataset(tmp_path / "data", real_clips, names, ["a red square", long_prompt, long_prompt])
    (data / "videos" / "a_folder").mkdir()
    with open(data / "videos.txt", "a") as f:
        f.write("videos/a_folder\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("a folder\n")
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, data, output_dir, cache))
    message = str(exit_.value.code)
    assert "2 problem(s) in the dataset" in message
    assert f"{data / 'videos.txt'}:2: {data / 'videos' / 'damaged.mp4'} cannot be decoded (the file is damaged" \
        in message
    assert f"{data / 'videos.txt'}:4: {data / 'videos' / 'a_folder'} is a folder, not a clip" in message
    assert not output_dir.exists() and not cache.exists()

    # Left out, the run goes on; the long prompts are named once, before any model, with what is cut.
    caplog.set_level(logging.INFO)
    run_main(train_argv(tiny_model_dir, data, output_dir, cache, "--skip_bad_videos", "--dry_run"))
    warnings = [r.getMessage() for r in caplog.records if "tokens than the text encoder takes" in r.getMessage()]
    assert len(warnings) == 1
    lines = warnings[0].splitlines()[1:]
    assert [line.split(": ")[0].strip() for line in lines] == [f"{data / 'prompts.txt'}:3"]
    tokens = int(lines[0].split(": ")[1].split()[0])
    assert tokens > 16 and f"{tokens} tokens, {tokens - 16} cut" in lines[0]
    assert any("Checked 4 clip(s)" in r.getMessage() for r in caplog.records)


def test_a_clip_that_fails_while_encoding_is_named_and_nothing_is_half_written(real_clips, tmp_path, tiny_model_dir):
    from diffusers import AutoencoderKLCogVideoX

    names = ["x264-open-gop.mp4", "damaged.mp4"]
    clips = load_clips(dataset(tmp_path / "data", real_clips, names), "prompts.txt", "videos.txt")
    cache = LatentCache(tmp_path / "cache")
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_local_main_process=False, device="cpu")
    s = settings(height=48, width=64, fps=24, max_num_frames=25)
    with pytest.raises(DatasetError) as error:
        encode_videos(accelerator, cache, clips, [s, s], {"test": 1}, False, False,
                      lambda: AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae"))
    problem, = error.value.problems
    damaged = tmp_path / "data" / "videos" / "damaged.mp4"
    assert problem.startswith(f"{tmp_path / 'data' / 'videos.txt'}:2: {damaged} cannot be decoded (the file is damaged")
    assert "ffmpeg -i" in problem and "run again" in problem
    # The clip before it is a whole entry; nothing else, no temporary file, is there.
    files = [p for p in cache.root.iterdir() if p.name not in ("claims", "verified.json")]
    assert len(files) == 1 and cache.load(files[0].stem) is not None


def test_index_problems_name_their_line(tmp_path):
    (tmp_path / "prompts.txt").write_bytes("first\nsecond\nthird caf\xe9\n".encode("latin-1"))
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\n")
    _, problems = read_index(tmp_path, "prompts.txt", "videos.txt")
    assert problems == [f"{tmp_path / 'prompts.txt'}:3: not UTF-8 text (invalid continuation byte): save the file "
                        f"as UTF-8."]


def test_the_reencode_command_pastes_into_a_shell_whatever_the_name(tmp_path):
    """Issue 24: a name with spaces, brackets and quotes, as downloads and phones name clips."""
    from cogvideox_lora.synthetic import write_clips
    from cogvideox_lora.video import reencode_command

    write_clips(tmp_path, num_clips=1, num_frames=3)
    clip = tmp_path / "my clips [2024]" / "Bob's \"best\" take (1) $HOME.mp4"
    clip.parent.mkdir()
    shutil.copy(tmp_path / "videos" / "clip_000.mp4", clip)
    command = reencode_command(clip)
    assert command.startswith("ffmpeg ")
    subprocess.run(["bash", "-c", f"ffmpeg() {{ {FFMPEG} -loglevel error \"$@\"; }}; {command}"], check=True,
                   timeout=60)
    fixed = clip.with_name(clip.stem + "_fixed.mp4")
    assert read_frames(fixed, FrameSettings(48, 64, 8, 1, 0, 0, "center")).shape == (1, 3, 48, 64)
