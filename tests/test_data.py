"""The dataset: index files, frame sampling, decoding, resizing, checks and batching."""

import json
import math
import random
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from helpers import load_clips  # also puts the repository on sys.path
from cogvideox_lora.args import parse_args
from cogvideox_lora.settings import from_args
from cogvideox_lora import data as data_module
from cogvideox_lora.data import (Clip, DatasetError, EpochOrder, FrameSettings, check_clips, epoch_batches, first_few,
                                 frames_at_times, read_frames, resize_and_crop, unfillable_batch)
from cogvideox_lora.synthetic import frame_index_from_pixels, write_clips


def sample_frame_indices(num_frames: int, clip_fps: float, settings: FrameSettings) -> list[int]:
    """frames_at_times for a clip of constant rate."""
    return frames_at_times([i / clip_fps for i in range(num_frames)], num_frames / clip_fps, settings)


def settings(fps=8, max_num_frames=49, skip_start=0, skip_end=0, height=48, width=64, mode="center"):
    return FrameSettings(height, width, fps, max_num_frames, skip_start, skip_end, mode, 4)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# load_clips


def test_prompts_and_videos_with_blank_lines_and_crlf(tmp_path):
    write(tmp_path / "prompts.txt", "\ufefffirst prompt\r\n\r\nsecond prompt  \r\n   \r\nthird prompt\r\n\r\n")
    write(tmp_path / "videos.txt", "\r\nvideos/a.mp4\r\nvideos/b.mp4\r\n\r\n\r\nvideos/c.mp4")

    clips = load_clips(tmp_path, "prompts.txt", "videos.txt")

    assert [c.prompt for c in clips] == ["first prompt", "second prompt", "third prompt"]
    assert [c.video for c in clips] == [tmp_path / "videos" / n for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert not any("\r" in c.prompt or "\r" in str(c.video) for c in clips)
    # Messages point at the line of videos.txt that names the clip, counting the blank lines.
    assert [c.where for c in clips] == [f"{tmp_path / 'videos.txt'}:{n}" for n in (2, 3, 6)]


def test_id_token_is_prepended_with_a_space(tmp_path):
    write(tmp_path / "prompts.txt", "a bear walks\nmickey dances\n")
    write(tmp_path / "videos.txt", "1.mp4\n2.mp4\n")
    plain = load_clips(tmp_path, "prompts.txt", "videos.txt")
    tokened = load_clips(tmp_path, "prompts.txt", "videos.txt", id_token="DISNEY")
    assert [c.prompt for c in tokened] == [f"DISNEY {c.prompt}" for c in plain]
    assert [c.video for c in tokened] == [c.video for c in plain]


@pytest.mark.parametrize("num_prompts, num_videos", [(4, 3), (2, 5)])
def test_mismatched_counts_name_both_counts_and_where_they_part(tmp_path, num_prompts, num_videos):
    # A blank line after the first entry of each file, so line numbers differ from entry numbers.
    prompts = [f"prompt {i}" for i in range(num_prompts)]
    videos = [f"videos/{i}.mp4" for i in range(num_videos)]
    write(tmp_path / "prompts.txt", prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    write(tmp_path / "videos.txt", videos[0] + "\n\n" + "\n".join(videos[1:]) + "\n")

    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "prompts.txt", "videos.txt")
    message = str(error.value)
    assert f"{num_prompts} prompts" in message
    assert f"{num_videos} clips" in message
    # The first entry of the longer file without a partner is entry min(...)+1, on line min(...)+2.
    longer = "prompts.txt" if num_prompts > num_videos else "videos.txt"
    assert f"{longer} line {min(num_prompts, num_videos) + 2}" in message


def test_missing_index_files_are_both_reported(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "prompts.txt", "videos.txt")
    assert len(error.value.problems) == 2
    assert "prompts.txt" in error.value.problems[0] and "videos.txt" in error.value.problems[1]


def test_csv_dataset_file_with_named_columns(tmp_path):
    write(tmp_path / "meta.csv",
          "path,text,other\n"
          "videos/a.mp4,\"a bear, walking\",x\n"
          "\n"
          "videos/b.mp4,mickey dances,y\n"
          "videos/c.mp4,,z\n")
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "text", "path", dataset_file="meta.csv")
    # Only the row without a prompt is wrong, and it is named by its real line (5: the blank line counts).
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith(f"{tmp_path / 'meta.csv'}:5: empty prompt")

    write(tmp_path / "meta.csv",
          "path,text,other\n"
          "videos/a.mp4,\"a bear, walking\",x\n"
          "\n"
          "videos/b.mp4,mickey dances,y\n")
    clips = load_clips(tmp_path, "text", "path", dataset_file="meta.csv", id_token="TOK")
    assert [c.prompt for c in clips] == ["TOK a bear, walking", "TOK mickey dances"]
    assert [c.video for c in clips] == [tmp_path / "videos/a.mp4", tmp_path / "videos/b.mp4"]
    assert [c.where for c in clips] == [f"{tmp_path / 'meta.csv'}:{n}" for n in (2, 4)]

    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "path", dataset_file="meta.csv")
    assert "no column caption" in str(error.value) and "--caption_column" in str(error.value)


def test_jsonl_dataset_file_with_named_columns(tmp_path):
    rows = [{"file": "videos/a.mp4", "prompt": "a red car"}, {"file": "videos/b.mp4", "prompt": "a polar bear"}]
    write(tmp_path / "meta.jsonl", json.dumps(rows[0]) + "\r\n\r\n" + json.dumps(rows[1]) + "\r\n")
    clips = load_clips(tmp_path, "prompt", "file", dataset_file="meta.jsonl")
    assert [c.prompt for c in clips] == [r["prompt"] for r in rows]
    assert [c.video for c in clips] == [tmp_path / r["file"] for r in rows]
    assert [c.where for c in clips] == [f"{tmp_path / 'meta.jsonl'}:{n}" for n in (1, 3)]

    write(tmp_path / "bad.jsonl", json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "prompt", "file", dataset_file="bad.jsonl")
    assert f"{tmp_path / 'bad.jsonl'}:2" in str(error.value)


def test_dataset_file_columns_default_to_caption_and_video(tmp_path):
    common = ["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path)]
    data = from_args(parse_args(common + ["--dataset_file", "meta.csv"])).data
    assert (data.caption_column, data.video_column) == ("caption", "video")
    data = from_args(parse_args(common)).data
    assert (data.caption_column, data.video_column) == ("prompts.txt", "videos.txt")
    data = from_args(parse_args(common + ["--dataset_file", "meta.jsonl", "--caption_column", "text"])).data
    assert (data.caption_column, data.video_column) == ("text", "video")


# ---------------------------------------------------------------------------------------------------------------
# Frame sampling


def reference_indices(num_frames, clip_fps, s: FrameSettings):
    """Exact arithmetic: output frame k shows the source frame on screen at time k/fps after the skipped start."""
    step = Fraction(clip_fps) / s.fps
    end = num_frames - s.skip_frames_end
    indices = []
    k = 0
    while len(indices) < s.max_num_frames and s.skip_frames_start + math.floor(k * step) < end:
        indices.append(s.skip_frames_start + math.floor(k * step))
        k += 1
    keep = (len(indices) - 1) // 4 * 4 + 1 if indices else 0
    return indices[:keep]


def test_sample_frame_indices_examples():
    # 24 fps sampled at 8 fps: every 3rd frame.
    assert sample_frame_indices(40, 24, settings(fps=8, max_num_frames=13)) == list(range(0, 37, 3))
    # 30 fps at 8 fps: the frame on screen at k/8 s is floor(3.75 k).
    assert sample_frame_indices(200, 30, settings(fps=8, max_num_frames=9)) == [0, 3, 7, 11, 15, 18, 22, 26, 30]
    # The clip's own rate matters: the same 200 frames at 8 fps are taken one by one.
    assert sample_frame_indices(200, 8, settings(fps=8, max_num_frames=9)) == list(range(9))
    # Skips: start at frame 5, never reach the last 10 frames (40 - 10 = 30 is the end).
    got = sample_frame_indices(40, 24, settings(fps=8, max_num_frames=49, skip_start=5, skip_end=10))
    assert got == [5, 8, 11, 14, 17, 20, 23, 26, 29]
    # max_num_frames caps the count.
    assert len(sample_frame_indices(1000, 24, settings(fps=8, max_num_frames=17))) == 17
    # 11 available frames are cut to 4k+1 = 9; 4 are cut to 1.
    assert sample_frame_indices(11, 8, settings(fps=8, max_num_frames=49)) == list(range(9))
    assert sample_frame_indices(4, 8, settings(fps=8, max_num_frames=49)) == [0]
    assert sample_frame_indices(3, 8, settings(fps=8, max_num_frames=49, skip_start=3)) == []


@pytest.mark.parametrize("clip_fps, fps", [(24, 8), (30, 8), (25, 10), (24, 7), (60, 9), (29, 12), (8, 8)])
@pytest.mark.parametrize("num_frames, skip_start, skip_end, max_num_frames",
                         [(200, 0, 0, 49), (200, 7, 13, 17), (37, 2, 3, 49), (96, 0, 50, 49)])
def test_sample_frame_indices_match_exact_arithmetic(clip_fps, fps, num_frames, skip_start, skip_end,
                                                     max_num_frames):
    s = settings(fps=fps, max_num_frames=max_num_frames, skip_start=skip_start, skip_end=skip_end)
    got = sample_frame_indices(num_frames, clip_fps, s)
    assert got == reference_indices(num_frames, clip_fps, s)
    assert len(got) <= max_num_frames and (not got or (len(got) - 1) % 4 == 0)
    assert all(skip_start <= i < num_frames - skip_end for i in got)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and resizing


@pytest.fixture(scope="module")
def rate_clips(tmp_path_factory):
    """One 40-frame clip at 24 fps and one at 30 fps, each frame's background encoding its index."""
    root = tmp_path_factory.mktemp("rates")
    paths = {}
    for clip_fps in (24, 30):
        folder = root / str(clip_fps)
        write_clips(folder, num_clips=1, num_frames=40, fps=clip_fps)
        paths[clip_fps] = folder / "videos" / "clip_000.mp4"
    return paths


@pytest.mark.parametrize("clip_fps, max_num_frames, skip_start, skip_end, expected", [
    (24, 13, 0, 0, list(range(0, 37, 3))),
    (24, 49, 1, 5, [1, 4, 7, 10, 13, 16, 19, 22, 25]),  # 12 frames up to 34, cut to 9
    (30, 9, 0, 0, [0, 3, 7, 11, 15, 18, 22, 26, 30]),
])
def test_read_frames_returns_the_expected_source_frames(rate_clips, clip_fps, max_num_frames, skip_start, skip_end,
                                                        expected):
    s = settings(fps=8, max_num_frames=max_num_frames, skip_start=skip_start, skip_end=skip_end)
    frames = read_frames(rate_clips[clip_fps], s)
    assert frames.shape == (len(expected), 3, 48, 64)
    assert frames.dtype == torch.float32
    assert frames.min() >= -1.0 and frames.max() <= 1.0
    # The square's colours reach both ends of the range: the mapping is not squeezed.
    assert frames.min() < -0.9 and frames.max() > 0.6
    pixels = ((frames + 1.0) * 127.5).numpy()  # back to [0, 255]
    assert [frame_index_from_pixels(f) for f in pixels] == expected


def test_center_crop_keeps_the_aspect_ratio():
    # A 64x96 (HxW) frame whose channels hold each pixel's column and row: wider than 48x64 (4:3).
    h, w = 64, 96
    frames = torch.zeros(2, 3, h, w)
    frames[:, 0] = torch.arange(w, dtype=torch.float32)
    frames[:, 1] = torch.arange(h, dtype=torch.float32)[:, None]

    center = resize_and_crop(frames, 48, 64, "center", random.Random(0))
    plain = resize_and_crop(frames, 48, 64, "none", random.Random(0))
    assert center.shape == plain.shape == (2, 3, 48, 64)

    def slopes(out):  # source pixels per output pixel, measured away from the borders
        x = out[0, 0, 24]
        y = out[0, 1, :, 32]
        return ((x[50] - x[10]) / 40).item(), ((y[40] - y[8]) / 32).item()

    # Centre mode scales both axes by 48/64 and crops the width; 'none' squeezes the width by 64/96.
    assert slopes(center) == pytest.approx((64 / 48, 64 / 48), abs=1e-3)
    assert slopes(plain) == pytest.approx((96 / 64, 64 / 48), abs=1e-3)
    # The crop is centred: the first and last output columns are symmetric about the source centre,
    # and the leftmost source columns are cut away in centre mode but kept in 'none' mode.
    assert (center[0, 0, 24, 0] + center[0, 0, 24, -1]).item() == pytest.approx(w - 1, abs=1e-3)
    assert center[0, 0, 24, 0] > 5.0
    assert plain[0, 0, 24, 0] < 1.0 and plain[0, 0, 24, -1] > w - 2


def test_tall_frame_is_cropped_top_and_bottom_without_resizing():
    frames = torch.rand(3, 3, 96, 64)  # H=96, W=64 into 48x64: the width fits, half the height is cut
    center = resize_and_crop(frames, 48, 64, "center", random.Random(0))
    torch.testing.assert_close(center, frames[..., 24:72, :], atol=1e-5, rtol=0)
    offsets = set()
    for seed in range(20):
        out = resize_and_crop(frames, 48, 64, "random", random.Random(seed))
        top = next(t for t in range(49) if torch.allclose(out, frames[..., t:t + 48, :], atol=1e-5))
        offsets.add(top)
    assert len(offsets) > 1  # random mode moves the crop


def test_read_frames_crop_is_visible_on_a_real_clip(tmp_path):
    # Clip 0's 24x16 red square starts at the top-left corner of a 96x64 (HxW) clip. Centre mode keeps
    # rows 24..71, so at frame 0 no red is left; 'none' squeezes the whole frame, square included.
    write_clips(tmp_path, num_clips=1, height=96, width=64, num_frames=9, fps=8)
    path = tmp_path / "videos" / "clip_000.mp4"
    center = read_frames(path, settings(max_num_frames=9, mode="center"))
    plain = read_frames(path, settings(max_num_frames=9, mode="none"))
    assert center.shape == plain.shape == (9, 3, 48, 64)

    def red(frame):
        return (frame[0] > 0.5) & (frame[1] < -0.5)

    assert red(center[0]).sum() == 0
    assert red(plain[0])[:10, :14].float().mean() > 0.9
    # Both keep the frame index.
    assert [frame_index_from_pixels(f, value_range=(-1, 1)) for f in center] == list(range(9))


# ---------------------------------------------------------------------------------------------------------------
# check_clips


def test_check_clips_reports_every_problem_with_file_and_line(tmp_path, tiny_dataset_dir):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, root)
    write_clips(tmp_path / "short", num_clips=1, num_frames=5, fps=8)
    shutil.copy(tmp_path / "short" / "videos" / "clip_000.mp4", root / "videos" / "short.mp4")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"not a video" * 200)
    videos = (root / "videos.txt").read_text().splitlines()
    entries = [videos[0], "videos/missing.mp4", videos[1], "videos/broken.mp4", "videos/short.mp4", videos[2]]
    (root / "videos.txt").write_text("\n".join(entries) + "\n")
    (root / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(len(entries))) + "\n")

    clips = load_clips(root, "prompts.txt", "videos.txt")
    s = settings(fps=8, max_num_frames=9)
    with pytest.raises(DatasetError) as error:
        check_clips(clips, s)
    problems = error.value.problems
    assert len(problems) == 3
    index = root / "videos.txt"
    for problem, line, name in zip(problems, (2, 4, 5), ("missing.mp4", "broken.mp4", "short.mp4")):
        assert problem.startswith(f"{index}:{line}: ")
        assert name in problem
    assert "does not exist" in problems[0]
    assert "cannot be decoded" in problems[1]
    assert "gives 5 frames" in problems[2] and "--max_num_frames" in problems[2]
    assert str(error.value).count("\n") >= 3  # all of them in the one message

    good, skipped = check_clips(clips, s, skip_bad=True)
    assert [c.video.name for c in good] == [Path(v).name for v in (videos[0], videos[1], videos[2])]
    assert skipped == problems

    with pytest.raises(DatasetError) as error:
        check_clips([c for c in clips if c not in good], s, skip_bad=True)
    assert "No usable clip" in str(error.value)

    # The same short clip is fine when fewer frames are asked for.
    short = [c for c in clips if c.video.name == "short.mp4"]
    assert check_clips(short, settings(fps=8, max_num_frames=5)) == (short, [])


# ---------------------------------------------------------------------------------------------------------------
# epoch_batches


def test_epoch_batches_shapes_counts_orders_and_seeds():
    shapes = [(8, 3, 6, 8)] * 7 + [(8, 5, 6, 8)] * 5 + [(8, 3, 8, 6)] * 1
    random.Random(1).shuffle(shapes)
    batch_size = 2
    per_epoch = []
    for epoch in range(8):
        batches = epoch_batches(shapes, batch_size, seed=3, epoch=epoch)
        per_epoch.append(batches)
        assert all(len(b) == batch_size for b in batches)
        assert all(len({shapes[i] for i in b}) == 1 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # no clip twice in an epoch
        # 7 // 2 + 5 // 2 + 1 // 2 batches, every epoch.
        assert len(batches) == 3 + 2 + 0
        assert epoch_batches(shapes, batch_size, seed=3, epoch=epoch) == batches
    assert len({str(b) for b in per_epoch}) > 1
    assert per_epoch[0] != per_epoch[1]
    assert epoch_batches(shapes, batch_size, seed=4, epoch=0) != per_epoch[0]
    # Over the epochs every clip that can be in a batch is trained on (the leftovers change).
    seen = {i for batches in per_epoch for b in batches for i in b}
    assert seen == {i for i, s in enumerate(shapes) if s != (8, 3, 8, 6)}
    assert epoch_batches(shapes, 14, seed=3, epoch=0) == []


def test_clip_is_hashable_and_frame_settings_from_args(tmp_path):
    args = parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path), "--height",
                       "64", "--width", "96", "--fps", "12", "--max_num_frames", "13", "--skip_frames_start", "2",
                       "--skip_frames_end", "3", "--video_reshape_mode", "none"])
    assert from_args(args).frames == FrameSettings(64, 96, 12, 13, 2, 3, "none", 4)
    assert len({Clip("a", Path("x"), "w:1"), Clip("a", Path("x"), "w:1")}) == 1


# ---------------------------------------------------------------------------------------------------------------
# Metadata tables as spreadsheets and tools write them (issue 24)

CLIPS = [("videos/a.mp4", "a bear, walking; then running"), ("videos/b.mp4", "mickey dances")]


@pytest.mark.parametrize("name, text, lines", [
    # A European spreadsheet's export: semicolons between fields, commas inside captions left unquoted.
    ("meta.csv", "video;caption\nvideos/a.mp4;\"a bear, walking; then running\"\n\nvideos/b.mp4;mickey dances\n",
     [2, 4]),
    ("meta.csv", "video\tcaption\r\nvideos/a.mp4\ta bear, walking; then running\r\nvideos/b.mp4\tmickey dances\r\n",
     [2, 3]),
    ("meta.csv", 'video,caption\nvideos/a.mp4,"a bear, walking; then running"\nvideos/b.mp4,mickey dances\n', [2, 3]),
    ("meta.json", json.dumps([{"video": v, "caption": c} for v, c in CLIPS], indent=2), [2, 6]),
    ("meta.json", "[" + ", ".join(json.dumps({"video": v, "caption": c}) for v, c in CLIPS) + "]", [1, 1]),
    ("meta.jsonl", "\n".join(json.dumps({"video": v, "caption": c}) for v, c in CLIPS) + "\n", [1, 2]),
])
def test_tables_of_every_common_shape_read_whole_captions(tmp_path, name, text, lines):
    write(tmp_path / name, text)
    clips = load_clips(tmp_path, "caption", "video", dataset_file=name)
    assert [(str(c.video.relative_to(tmp_path)), c.prompt) for c in clips] == CLIPS
    assert [c.where for c in clips] == [f"{tmp_path / name}:{n}" for n in lines]


@pytest.mark.parametrize("text, line, said", [
    # Unquoted commas: the caption would be cut at the first one. Refused, never cut.
    ("video,caption\nvideos/a.mp4,mickey dances\nvideos/b.mp4,a bear, walking\n", 3, "3 fields where the header has 2"),
    # A line break inside an unquoted caption: the second half would be a row of its own.
    ("video,caption,tag\nvideos/a.mp4,a bear\nwalking,x\n", 2, "2 fields where the header has 3"),
])
def test_csv_rows_that_cannot_be_read_for_sure_are_refused_with_line_and_fix(tmp_path, text, line, said):
    write(tmp_path / "meta.csv", text)
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "video", dataset_file="meta.csv")
    problem = next(p for p in error.value.problems if p.startswith(f"{tmp_path / 'meta.csv'}:{line}: "))
    assert said in problem and "double quotes" in problem


def test_json_files_that_are_not_tables_are_refused_with_line(tmp_path):
    write(tmp_path / "list.json", '[\n  {"video": "videos/a.mp4", "caption": "a bear"},\n  "videos/b.mp4"\n]')
    write(tmp_path / "broken.json", '[\n  {"video": "videos/a.mp4", "caption": "a bear"}\n  {"video": "b"}\n]')
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "video", dataset_file="list.json")
    assert error.value.problems == [f"{tmp_path / 'list.json'}:3: a JSON str, not an object: each record must be an "
                                    f'object such as {{"caption": "...", "video": "videos/1.mp4"}}.']
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "video", dataset_file="broken.json")
    assert error.value.problems[0].startswith(f"{tmp_path / 'broken.json'}:3: not valid JSON")


def test_a_header_without_the_columns_is_one_problem_naming_what_it_has(tmp_path):
    write(tmp_path / "meta.csv", "file;text\n" + "videos/a.mp4;a bear\n" * 5)
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "video", dataset_file="meta.csv")
    assert error.value.problems == [
        f"{tmp_path / 'meta.csv'}:1: no column caption, video in the header (file, text, read as separated by "
        f"semicolons). Name the columns with --caption_column, --video_column and --image_column."]


# ---------------------------------------------------------------------------------------------------------------
# Characters an editor does not show, and file names in another Unicode form (issue 24)


def test_invisible_characters_are_named_with_file_and_line(tmp_path):
    # U+2028 pasted into the second prompt; two lists joined, the second's BOM now starting line 3.
    write(tmp_path / "prompts.txt", "a red car\na bear\u2028walking in the forest\nmickey dances\n")
    write(tmp_path / "videos.txt", "videos/a.mp4\nvideos/b.mp4\n\ufeffvideos/c.mp4\n")
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "prompts.txt", "videos.txt")
    # The files still pair up line by line: U+2028 ends no line, as in an editor.
    assert error.value.problems == [
        f"{tmp_path / 'prompts.txt'}:2: the prompt holds U+2028 LINE SEPARATOR at column 7, which an editor does not "
        f"show: delete it, or put a space in its place.",
        f"{tmp_path / 'videos.txt'}:3: the clip path holds U+FEFF ZERO WIDTH NO-BREAK SPACE at column 1, which an "
        f"editor does not show: delete it, or put a space in its place."]


def test_a_line_separator_in_a_json_lines_caption_is_named(tmp_path):
    write(tmp_path / "meta.jsonl", json.dumps({"video": "videos/a.mp4", "caption": "a\u2029b\x0bc"},
                                              ensure_ascii=False) + "\n")
    with pytest.raises(DatasetError) as error:
        load_clips(tmp_path, "caption", "video", dataset_file="meta.jsonl")
    assert "U+2029 PARAGRAPH SEPARATOR at column 2, U+000B a control character at column 4" in str(error.value)
    assert str(error.value).count(f"{tmp_path / 'meta.jsonl'}:1: the prompt holds") == 1


@pytest.mark.parametrize("on_disk, listed", [("NFD", "NFC"), ("NFC", "NFD")])
def test_a_file_name_in_another_unicode_form_is_the_file_the_user_sees(tmp_path, on_disk, listed):
    import unicodedata

    folder, name = "Vidéos", "café crème.mp4"
    path = tmp_path / unicodedata.normalize(on_disk, folder) / unicodedata.normalize(on_disk, name)
    write(path, "a clip")
    write(tmp_path / "prompts.txt", "a cup of coffee\n")
    write(tmp_path / "videos.txt", unicodedata.normalize(listed, f"{folder}/{name}") + "\n")
    assert not (tmp_path / unicodedata.normalize(listed, f"{folder}/{name}")).exists()  # the file system tells apart
    assert [c.video for c in load_clips(tmp_path, "prompts.txt", "videos.txt")] == [path]


# ---------------------------------------------------------------------------------------------------------------
# A clip too short: what helps (issue 24)


def test_a_short_clip_is_told_what_gives_enough_frames(rate_clips):
    clip = Clip("p", rate_clips[24], "videos.txt:1")  # 40 frames at 24 fps: 1.67 s
    with pytest.raises(DatasetError) as error:
        check_clips([clip], settings(fps=8, max_num_frames=17))
    problem = error.value.problems[0]
    assert problem.startswith("videos.txt:1: ") and "gives 13 frames at --fps 8" in problem
    assert "lower --max_num_frames to 13" in problem and "raise --fps to 10" in problem
    assert "lower --fps" not in problem and "skip fewer" not in problem  # no skips to lower
    # What the hint says works, and one fps less would not.
    assert check_clips([clip], settings(fps=10, max_num_frames=17))[1] == []
    with pytest.raises(DatasetError):
        check_clips([clip], settings(fps=9, max_num_frames=17))

    with pytest.raises(DatasetError) as error:
        check_clips([clip], settings(fps=8, max_num_frames=9, skip_start=20))
    assert "skip fewer frames" in error.value.problems[0] and "raise --fps to 10" in error.value.problems[0]
    assert check_clips([clip], settings(fps=10, max_num_frames=9, skip_start=20))[1] == []


def test_a_higher_fps_is_not_suggested_beyond_the_clips_own_rate(tiny_dataset_dir):
    clip = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")[0]  # 25 frames at 8 fps
    with pytest.raises(DatasetError) as error:
        check_clips([clip], settings(fps=8, max_num_frames=49))
    problem = error.value.problems[0]
    assert "lower --max_num_frames to 25" in problem and "use a longer clip" in problem
    assert "--fps to" not in problem


def test_clips_too_few_for_a_batch_are_counted_per_size():
    small, large = settings(height=48, width=64, max_num_frames=9), settings(height=64, width=48, max_num_frames=9)
    assert unfillable_batch([small] * 3 + [large], 3, 1) is None
    problem = unfillable_batch([small] * 2 + [large] * 2, 2, 2)
    assert problem == ("4 clip(s) cannot fill one batch of 4 (--train_batch_size 2 x 2 process(es)), whose clips are "
                       "all of one size (frames x height x width): 2 of 9x48x64, 2 of 9x64x48. Lower "
                       "--train_batch_size or add clips, or use fewer buckets.")
    # The same verdict as the batches themselves.
    shapes = [(s.max_num_frames, s.height, s.width) for s in [small] * 2 + [large] * 2]
    assert epoch_batches(shapes, 4, seed=0, epoch=0) == [] and epoch_batches(shapes, 2, seed=0, epoch=0) != []


# ---------------------------------------------------------------------------------------------------------------
# The data order


def test_the_data_order_is_computed_once_an_epoch(monkeypatch):
    shapes = [(3, 6, 8)] * 50 + [(5, 6, 8)] * 30
    calls = []
    monkeypatch.setattr(data_module, "epoch_batches", lambda *a: calls.append(a) or epoch_batches(*a))
    order = EpochOrder(shapes, 4, seed=7)
    for epoch in (0, 0, 0, 1, 1, 2):
        assert order.batches(epoch) == epoch_batches(shapes, 4, 7, epoch)  # the same order as before
    assert [a[-1] for a in calls] == [0, 1, 2]


def test_the_long_prompt_warning_names_a_few_and_counts_the_rest():
    lines = [f"prompts.txt:{n}: 300 tokens, 74 cut" for n in range(1, 2001)]
    shown = [line.strip() for line in first_few(lines).splitlines()]
    assert shown[:5] == lines[:5] and len(shown) == 6 and "1995 more" in shown[-1]
    assert [line.strip() for line in first_few(lines[:3]).splitlines()] == lines[:3]


def test_token_counts_are_the_tokenizers_whatever_its_truncation(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    prompts = ["a red square", "", "caf\u00e9 cr\u00e8me " * 200, "a brown bear walks through the forest"]
    expected = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids]
    assert expected[2] > 226
    tokenizer.backend_tokenizer.enable_truncation(16)  # as a tokenizer.json may come
    assert data_module.token_counts(tokenizer, prompts) == expected
    without_backend = lambda texts, **kwargs: SimpleNamespace(input_ids=[[0] * len(t) for t in texts])  # noqa: E731
    assert data_module.token_counts(without_backend, ["ab", "abc"]) == [2, 3]


def test_frames_of_the_size_asked_are_not_resized_and_scale_as_before(monkeypatch):
    """At scale 1 bilinear resizing gives its input back exactly, so it is skipped; the scaling to [-1, 1], done in
    place, gives the values of the formula and leaves the caller's frames alone."""
    import torch.nn.functional as F

    frames = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8)
    resized = F.interpolate(frames.float(), size=(48, 64), mode="bilinear", antialias=True, align_corners=False)
    calls = []
    monkeypatch.setattr(data_module.F, "interpolate", lambda *a, **k: calls.append(a))
    for mode in ("center", "random", "none"):
        assert torch.equal(resize_and_crop(frames.float(), 48, 64, mode, random.Random(0)), resized)
    assert calls == []
    kept = frames.float()
    scaled = data_module._as_model_input(kept, FrameSettings(48, 64, 8, 9, 0, 0, "center"), 0)
    assert torch.equal(scaled, (resized / 127.5 - 1.0).clamp(-1.0, 1.0))
    assert torch.equal(kept, frames.float())


def test_a_loop_of_links_is_a_missing_clip(tmp_path):
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    clip = Clip("p", tmp_path / "a.mp4", "videos.txt:1")
    with pytest.raises(DatasetError, match="does not exist"):
        check_clips([clip], settings(fps=8, max_num_frames=9))
