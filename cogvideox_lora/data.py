"""The dataset folder: reading its index files, checking every clip, and turning a clip into frames."""

import collections
import errno
import itertools
import bisect
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np
import torch
import torch.nn.functional as F

from . import tables, text
from .clip_index import identity, settings_key
from .decoded import Decoded
from .images import open_image
from .video import open_video, reencode_command

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    prompt: str
    video: Path
    where: str  # "file:line" of the entry, for messages
    image: Path | None = None  # the I2V conditioning image; None: the clip's first frame
    prompt_where: str | None = None  # "file:line" of the prompt, where it differs from where
    # (frames it gives at the longest length asked for, height, width), as check_clips found it.
    probe: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)


IMAGES_FILE, IMAGE_COLUMN = "images.txt", "image"
# A dataset entry with one of these suffixes is a single image, trained as a one-frame clip, unless it is
# animated: then it is a clip.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def is_single_image(path: Path) -> bool:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) == 1
    except Exception:  # an unreadable image is reported as such when it is read
        return True


@dataclass(frozen=True)
class FrameSettings:
    """Everything that decides which frames of a clip are trained on, and at which size."""

    height: int
    width: int
    fps: int
    max_num_frames: int
    skip_frames_start: int
    skip_frames_end: int
    reshape_mode: str
    temporal_compression: int = 4


@dataclass(frozen=True)
class Buckets:
    """Frame sizes and lengths that clips are sorted into, so that a batch of mixed clips has one shape.

    A clip goes to the size nearest its aspect ratio (then its pixel count) and to the longest length it can
    fill. With auto_area the sizes are not listed: each clip keeps its own aspect ratio at about auto_area
    pixels, in multiples of 16.
    """

    heights: tuple[int, ...]
    widths: tuple[int, ...]
    frames: tuple[int, ...]
    auto_area: int | None = None

    def size(self, height: int, width: int) -> tuple[int, int]:
        if self.auto_area:
            h = math.sqrt(self.auto_area * height / width)
            return max(16, round(h / 16) * 16), max(16, round(self.auto_area / h / 16) * 16)
        ratio = math.log(width / height)
        return min(itertools.product(self.heights, self.widths),
                   key=lambda s: (abs(math.log(s[1] / s[0]) - ratio), abs(s[0] * s[1] - height * width)))

    def length(self, frames_given: int) -> int | None:
        return max((f for f in self.frames if f <= frames_given), default=None)


class DatasetError(Exception):
    """Every problem found in the dataset, so the user can fix them all in one go."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n  " + "\n  ".join(problems))


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; CRLF and a UTF-8 BOM are tolerated."""
    return [(n, line.strip()) for n, line in enumerate(text.lines(text.read_text(path)), start=1) if line.strip()]


def _read_text_pair(root: Path, caption_file: str, video_file: str, image_file: str | None):
    problems = []
    files = {}
    # The images file is optional unless named: without it, each clip's first frame conditions I2V.
    optional = image_file is None
    image_file = image_file or IMAGES_FILE
    with_images = (root / image_file).is_file() or not optional
    for name in (caption_file, video_file) + ((image_file,) if with_images else ()):
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: not found. The dataset folder needs {caption_file} (one prompt a line) and "
                            f"{video_file} (one clip path a line, relative to the folder)"
                            + (f", and {image_file} (one image a line) as --image_column names it."
                               if name == image_file else "."))
            continue
        try:
            files[name] = _lines(path)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        return [], problems
    prompts, videos = files[caption_file], files[video_file]
    if len(prompts) != len(videos):
        longer, shorter = (caption_file, video_file) if len(prompts) > len(videos) else (video_file, caption_file)
        extra_line = max(prompts, videos, key=len)[min(len(prompts), len(videos))][0]
        # Blank lines are skipped, so a left-out or emptied line shows up as the first pair of entries
        # whose line numbers differ.
        parting = next(((p, v) for (p, _), (v, _) in zip(prompts, videos) if p != v), None)
        problems.append(f"{root / caption_file} has {len(prompts)} prompts but {root / video_file} has "
                        f"{len(videos)} clips: they must pair up line by line. "
                        + (f"They part at {caption_file} line {parting[0]} against {video_file} line {parting[1]}: "
                           f"look for a missing, extra or blank line just before. " if parting else "")
                        + f"{longer} line {extra_line} is the first with no partner in {shorter}.")
    images = files.get(image_file, [(None, None)] * len(videos))
    if len(images) != len(videos):
        problems.append(f"{root / image_file} has {len(images)} images but {root / video_file} has {len(videos)} "
                        f"clips: they must pair up line by line (or remove {image_file} to condition on each clip's "
                        f"first frame).")
    prompts_at, videos_at = root / caption_file, root / video_file  # not a Path a row: thousands of rows
    rows = []
    for (p_line, prompt), (v_line, video), (_, image) in zip(prompts, videos, images):
        rows.append((prompt, video, image, f"{prompts_at}:{p_line}", f"{videos_at}:{v_line}"))
    return rows, problems


def _read_table(root: Path, dataset_file: str, caption_column: str, video_column: str, image_column: str | None):
    path = root / dataset_file
    if not path.is_file():
        return [], [f"{path}: not found (--dataset_file is relative to --instance_data_root)."]
    required = (caption_column, video_column) + ((image_column,) if image_column else ())
    try:
        records, problems = tables.read_records(path, text.read_text(path), required)
    except ValueError as e:
        return [], [str(e)]
    rows = []
    for n, record in records:
        missing = [c for c in required if c not in record]
        if missing:
            problems.append(f"{path}:{n}: no key {', '.join(missing)}; it has {', '.join(record)}. "
                            f"Name the columns with --caption_column, --video_column and --image_column.")
            continue
        where = f"{path}:{n}"
        image = str(record.get(image_column or IMAGE_COLUMN) or "").strip() or None
        rows.append((str(record[caption_column] or "").strip(), str(record[video_column] or "").strip(), image,
                     where, where))
    return rows, problems


def _hidden_characters(what: str, value: str, where: str) -> list[str]:
    """The problem of a prompt or path that holds characters an editor does not show (a line separator pasted
    into a caption, a BOM where two files were joined, a zero-width space), if it does."""
    found = text.invisible(value)
    if not found:
        return []
    return [f"{where}: the {what} holds {', '.join(found)}, which an editor does not show: delete "
            f"{'them' if len(found) > 1 else 'it'}, or put a space in {'their' if len(found) > 1 else 'its'} place."]


def read_index(root, caption_column: str, video_column: str, dataset_file: str | None = None,
               id_token: str | None = None, image_column: str | None = None) -> tuple[list[Clip], list[str]]:
    """The clips the dataset's index lists, and every problem of the index itself.

    Conditioning images come from image_column (a file like videos.txt, or a column of dataset_file); if it
    is not given, from images.txt or an "image" column where there is one.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return [], [f"{root}: --instance_data_root is not a folder: give the dataset folder (the one holding "
                    f"{dataset_file or caption_column + ' and ' + video_column})."]
    if dataset_file:
        rows, problems = _read_table(root, dataset_file, caption_column, video_column, image_column)
    else:
        rows, problems = _read_text_pair(root, caption_column, video_column, image_column)
    clips = []
    for prompt, video, image, prompt_where, video_where in rows:
        if not prompt:
            problems.append(f"{prompt_where}: empty prompt: write a caption for {video}.")
        if not video:
            problems.append(f"{video_where}: empty clip path.")
            continue
        problems += _hidden_characters("prompt", prompt, prompt_where)
        hidden_in_paths = _hidden_characters("clip path", video, video_where) + \
            _hidden_characters("image path", image or "", video_where)
        problems += hidden_in_paths
        if id_token:
            prompt = f"{id_token} {prompt}"
        if not hidden_in_paths:  # the path as written does not exist; the problem says why
            clips.append(Clip(prompt, text.as_on_disk(root / video), video_where,
                              text.as_on_disk(root / image) if image else None, prompt_where))
    if not clips and not problems:
        problems.append(f"{root}: the dataset lists no clips.")
    return clips, problems


def frames_at_times(starts, end: float, settings: FrameSettings) -> list[int]:
    """Source frames to keep, from each frame's presentation time (s): after the skipped frames, the frame on
    screen at t_k = t_first + k/fps for k = 0, 1, ... while the kept frames last, capped and cut to k*T+1."""
    starts = list(starts)
    first, last = settings.skip_frames_start, len(starts) - settings.skip_frames_end
    if first >= last:
        return []
    stop = starts[last] if last < len(starts) else end
    # Containers round timestamps (MKV to the millisecond): a frame starting that close after t_k counts as on
    # screen at t_k, so a 24 fps clip at --fps 8 gives every third frame however it is stored.
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    tolerance = min([1e-3] + [g / 4 for g in gaps])
    indices = []
    while len(indices) < settings.max_num_frames:
        t = starts[first] + len(indices) / settings.fps
        if t >= stop - tolerance:
            break
        indices.append(bisect.bisect_right(starts, t + tolerance, first, last) - 1)
    t = settings.temporal_compression
    return indices[: (len(indices) - 1) // t * t + 1] if indices else []


def _image_problem(clip: Clip) -> str | None:
    if not clip.image.is_file():
        return f"{clip.where}: its conditioning image {clip.image} does not exist: fix the path in the images list."
    try:
        open_image(clip.image)
    except Exception as e:  # Pillow raises many error types for bad files
        return f"{clip.where}: its conditioning image {clip.image} cannot be read ({e}): re-save it as PNG or JPEG."
    return None


def probe_clip(path: Path, settings: FrameSettings, decoded=None) -> tuple[int, int, int]:
    """(frames it gives at settings, display height, display width), decoding every frame that training reads;
    raises if one cannot be decoded. decoded (a DecodedFrames): where it has room, the frames at the sampled
    indices are kept there, so that encoding need not decode the clip again."""
    if is_single_image(path):
        height, width = open_image(path).shape[-2:]
        return 1, height, width
    video = open_video(path)
    indices = frames_at_times(video.starts, video.end, settings)
    # Room is asked for before decoding, for the most the frames can take (a frame sampled twice is held once), so
    # that the store stays within its budget while the frames come in.
    nbytes = len(indices) * video.height * video.width * 3
    keep = decoded is not None and indices and decoded.has_room(nbytes)
    frames = [frame for frame in video.frames(indices) if keep]
    if keep:
        kept = Decoded(video.starts, video.end, video.pixel_aspect, indices, frames, identity(os.stat(path)))
        decoded.put(path, kept, nbytes)
    return len(indices), video.height, round(video.width * video.pixel_aspect)


def _known_probe(path: Path, found: os.stat_result, settings: FrameSettings, index,
                 key: str | None, decoded=None) -> tuple[int, int, int]:
    """probe_clip's results, from the index where the file (found: its stat) is unchanged since it was probed at
    these settings (key: their settings_key). A clip the index knows is not decoded, so nothing of it is kept in
    decoded: a warm clip costs no memory."""
    known = index.probe(path, identity(found), key) if index is not None else None
    if known is not None:
        return tuple(known)
    probe = probe_clip(path, settings, decoded)
    if index is not None:
        index.set_probe(path, identity(found), key, probe)
    return probe


def _stat(path: Path) -> os.stat_result | None:
    """The file's stat; None where Path.is_file sees nothing there (a missing file or folder, a broken link or a
    loop of links)."""
    try:
        return os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return None
        raise


def _unreadable(clip: Clip, error: Exception) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"{clip.where}: {clip.video} cannot be decoded ({reason}): re-encode it "
            f"({reencode_command(clip.video)}) or remove it.")


def _too_short(clip: Clip, settings: FrameSettings, got: int, needed: int, flag: str) -> str:
    """The problem of a clip that gives fewer frames than needed, with what would make it give enough: a lower
    flag, fewer skipped frames, or a higher --fps where the clip's own rate has frames between those taken
    (a lower --fps takes fewer)."""
    video = open_video(clip.video)

    def given(**changes) -> int:
        return len(frames_at_times(video.starts, video.end, replace(settings, max_num_frames=needed, **changes)))

    t, skips = settings.temporal_compression, (settings.skip_frames_start, settings.skip_frames_end)
    usable = (got - 1) // t * t + 1 if got else 0
    ways = [f"lower {flag} to {usable}"] if usable else []
    if any(skips) and given(skip_frames_start=0, skip_frames_end=0) >= needed:
        ways.append("skip fewer frames (--skip_frames_start, --skip_frames_end)")
    faster = next((fps for fps in range(settings.fps + 1, math.floor(video.frame_rate) + 1)
                   if given(fps=fps) >= needed), None)
    if faster:
        ways.append(f"raise --fps to {faster} (up to the clip's own {video.frame_rate:g})")
    ways += ["use a longer clip", "pass --skip_bad_videos to leave it out"]
    return (f"{clip.where}: {clip.video} gives {got} frames at --fps {settings.fps} (it has {len(video.starts)}, "
            f"{video.end - video.starts[0]:.2f} s at {video.frame_rate:g} fps, skipping {skips[0]}+{skips[1]}) but "
            f"{flag} is {needed}: {', '.join(ways[:-1])} or {ways[-1]}.")


def check_clips(clips: list[Clip], settings: FrameSettings, skip_bad: bool = False,
                buckets: Buckets | None = None, index=None, stop=None, decoded=None) -> tuple[list[Clip], list[str]]:
    """Opens every clip once; returns the usable clips and the problems of the others.

    Raises DatasetError with all problems unless skip_bad, in which case the problems are returned
    for a warning and the clips that have them are left out. With buckets, a clip must fill the shortest.
    index (a ClipIndex) gives what an unchanged clip was found to hold before, instead of decoding it again;
    stop() is called between clips, to raise if the run is asked to stop. decoded (a DecodedFrames) keeps, where
    it has room, the frames of the usable clips this process will encode, for encoding to take.
    """
    needed, flag = settings.max_num_frames, "--max_num_frames"
    if buckets is not None:
        needed, flag = buckets.frames[0], "the shortest of --frame_buckets"
        settings = replace(settings, max_num_frames=buckets.frames[-1])
    good, problems = [], []
    started = time.perf_counter()
    key = settings_key(settings) if index is not None else None  # once: 40 µs a clip, serialised for each
    for clip in clips:
        if stop is not None:
            stop()
        problem = None
        found = _stat(clip.video)  # one stat a clip: what kind of file it is and what the index knows it by
        if found is not None and S_ISDIR(found.st_mode):
            problem = f"{clip.where}: {clip.video} is a folder, not a clip: list the clip files in it, one a line."
        elif found is None or not S_ISREG(found.st_mode):
            problem = f"{clip.where}: {clip.video} does not exist: fix the path (relative to the dataset folder)."
        else:
            try:
                mine = decoded if decoded is not None and decoded.wants(len(good)) else None
                got, height, width = _known_probe(clip.video, found, settings, index, key, mine)
            except Exception as e:  # decord and Pillow raise their own error types for every kind of bad file
                problem = _unreadable(clip, e)
            else:
                if got < needed and not is_single_image(clip.video):
                    problem = _too_short(clip, settings, got, needed, flag)
        if problem is None and clip.image is not None:
            problem = _image_problem(clip)
        if problem:
            problems.append(problem)
            if decoded is not None:  # a clip left out is not encoded
                decoded.drop(clip.video)
        else:
            good.append(replace(clip, probe=(got, height, width)))
    logger.info("Checked %d clip(s) (every frame that training reads, decoded now or unchanged since an earlier "
                "check) in %.1f s.", len(clips),
                time.perf_counter() - started)
    if problems and not skip_bad:
        raise DatasetError(problems)
    if not good:
        raise DatasetError(problems + ["No usable clip is left."])
    return good, problems


def check_dataset(root, caption_column: str, video_column: str, dataset_file: str | None, id_token: str | None,
                  image_column: str | None, settings: FrameSettings, skip_bad: bool = False,
                  buckets: Buckets | None = None, index=None, stop=None, decoded=None) -> tuple[list[Clip], list[str]]:
    """The index and every clip it lists, checked at once: one DatasetError holds the problems of both.

    With skip_bad, unusable clips are left out and their problems returned; a wrong index is always an error.
    """
    clips, problems = read_index(root, caption_column, video_column, dataset_file, id_token, image_column)
    if not clips:
        raise DatasetError(problems)
    try:
        good, skipped = check_clips(clips, settings, skip_bad, buckets, index, stop, decoded)
    except DatasetError as e:
        raise DatasetError(problems + e.problems) from None
    if problems:
        raise DatasetError(problems)
    return good, skipped


def long_prompts(clips: list[Clip], tokenizer, max_length: int) -> list[str]:
    """Where a prompt has more tokens than the text encoder takes (the rest is cut), once per prompt line."""
    found = {}
    for clip, count in zip(clips, token_counts(tokenizer, [clip.prompt for clip in clips])):
        if count > max_length:
            found.setdefault(clip.prompt_where or clip.where, f"{count} tokens, {count - max_length} cut")
    return [f"{where}: {what}" for where, what in found.items()]


def token_counts(tokenizer, prompts: list[str]) -> list[int]:
    """The tokens of each prompt, special ones included, untruncated; one call for all (20,000 prompts one by one
    took 2 s)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a tokenizer without the tokenizers library's
        return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids]
    # The library's own call: transformers' around it takes twice as long (0.5 s for 20,000 prompts) building lists
    # of which only the lengths are read. Untruncated and unpadded, as transformers sets it for such a call.
    backend.no_truncation()
    backend.no_padding()
    return [len(encoding.ids) for encoding in backend.encode_batch(prompts, add_special_tokens=True)]


def first_few(lines: list[str], shown: int = 5) -> str:
    """The first `shown` lines and a count of the others: a warning about 2,000 clips stays a few lines long."""
    rest = len(lines) - shown
    return "\n  ".join(lines[:shown] + ([f"... and {rest} more"] if rest > 0 else []))


def clip_settings(clips: list[Clip], settings: FrameSettings, buckets: Buckets | None = None) -> list[FrameSettings]:
    """The frame settings of each clip that check_clips passed: those of its bucket, or `settings` for all; a
    single image takes one frame."""
    made = {}  # thousands of clips, a few settings: each made once (a dataclasses.replace is 5 µs)
    result = []
    for clip in clips:
        got, height, width = clip.probe
        frames = 1 if is_single_image(clip.video) else settings.max_num_frames if buckets is None \
            else buckets.length(got)
        size = (settings.height, settings.width) if buckets is None else buckets.size(height, width)
        if (frames, size) not in made:
            made[frames, size] = replace(settings, height=size[0], width=size[1], max_num_frames=frames)
        result.append(made[frames, size])
    return result


def resize_and_crop(frames: torch.Tensor, height: int, width: int, mode: str, rng: random.Random,
                    pixel_aspect: float = 1.0) -> torch.Tensor:
    """[F, 3, H, W] float frames to [F, 3, height, width], keeping the displayed aspect ratio (pixels pixel_aspect
    times as wide as high) unless mode is 'none'. Frames already of the size are returned as they are."""
    if mode == "none":
        return _resized(frames, height, width)
    h, w = frames.shape[-2], frames.shape[-1] * pixel_aspect
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    frames = _resized(frames, new_h, new_w)
    if mode == "center":
        top, left = (new_h - height) // 2, (new_w - width) // 2
    else:
        top, left = rng.randint(0, new_h - height), rng.randint(0, new_w - width)
    return frames[..., top: top + height, left: left + width]


def _resized(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if frames.shape[-2:] == (height, width):
        # Bilinear (antialiased) at scale 1 weighs each pixel 1 and its neighbour 0: the same values, exactly,
        # without a pass over the frames (a clip trained at its own size, 480x720 at 480x720).
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def _as_model_input(frames: torch.Tensor, settings: FrameSettings, crop_seed: int,
                    pixel_aspect: float = 1.0) -> torch.Tensor:
    frames = resize_and_crop(frames.float(), settings.height, settings.width, settings.reshape_mode,
                             random.Random(crop_seed), pixel_aspect)
    # One new tensor (frames may be the caller's), then in place: the same values as three tensors made one after
    # another, in a third of the time (each new 200 MB tensor of 49x480x720 costs its page faults).
    return (frames / 127.5).sub_(1.0).clamp_(-1.0, 1.0)


def read_frames(path: Path, settings: FrameSettings, crop_seed: int = 0, first_only: bool = False,
                decoded: Decoded | None = None) -> torch.Tensor:
    """The clip as the model sees it: [F, 3, height, width] in [-1, 1] (F = 1 with first_only). decoded: what the
    check decoded of it, used instead of decoding again where it holds the frames asked for."""
    if is_single_image(path):
        return _as_model_input(open_image(path)[None], settings, crop_seed)
    if decoded is not None:
        frames = decoded.frames_at(frames_at_times(decoded.starts, decoded.end, settings)[:1 if first_only else None])
        if frames:
            return _prepared(frames, settings, crop_seed, decoded.pixel_aspect)
    video = open_video(path)
    indices = frames_at_times(video.starts, video.end, settings)[:1 if first_only else None]
    return _prepared(list(video.frames(indices)), settings, crop_seed, video.pixel_aspect)


def _prepared(frames: list[np.ndarray], settings: FrameSettings, crop_seed: int, pixel_aspect: float) -> torch.Tensor:
    """Decoded [H, W, 3] uint8 frames as the model sees them; the one way from frames to model input, whether they
    were decoded now or kept from the check, so that both give the same values bit for bit."""
    return _as_model_input(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), settings, crop_seed, pixel_aspect)


def read_conditioning_image(clip: Clip, settings: FrameSettings, crop_seed: int = 0) -> torch.Tensor:
    """The I2V image of a clip as the model sees it, [1, 3, height, width] in [-1, 1]: its own image, resized
    and cropped like the clip (with the clip's crop seed), or else the clip's first trained frame."""
    if clip.image is None:
        return read_frames(clip.video, settings, crop_seed, first_only=True)
    return _as_model_input(open_image(clip.image)[None], settings, crop_seed)


class ClipFrames(torch.utils.data.Dataset):
    """Frames of some clips (or their conditioning images), so a DataLoader can decode the next clips while the
    VAE encodes. settings and crop_seeds are per clip; decoded: what the check decoded of some, by position (each
    given up once read, so that its memory goes as the clip is encoded)."""

    def __init__(self, clips: list[Clip], settings: list[FrameSettings], crop_seeds: list[int], images: bool = False,
                 decoded: dict[int, Decoded] | None = None):
        self.clips, self.settings, self.crop_seeds, self.images = clips, settings, crop_seeds, images
        self.decoded = decoded or {}

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        """(i, frames), or (i, the problem) where a clip cannot be read: a message, which crosses from a loader
        worker whole, where an exception would come with the worker's traceback."""
        clip, settings, crop_seed = self.clips[i], self.settings[i], self.crop_seeds[i]
        try:
            if self.images:
                return i, read_conditioning_image(clip, settings, crop_seed)
            return i, read_frames(clip.video, settings, crop_seed, decoded=self.decoded.pop(i, None))
        except Exception as e:  # decord and Pillow raise their own error types for every kind of bad file
            return i, _unreadable(clip, e)


def unfillable_batch(per_clip: list[FrameSettings], batch_size: int, processes: int) -> str | None:
    """The problem of clips too few to fill one global batch, whose clips must all be of one size; None if
    they fill at least one (as epoch_batches then gives one)."""
    counts = collections.Counter((s.max_num_frames, s.height, s.width) for s in per_clip)
    needed = batch_size * processes
    if max(counts.values(), default=0) >= needed:
        return None
    sizes = ", ".join(f"{n} of {f}x{h}x{w}" for (f, h, w), n in counts.most_common())
    return (f"{len(per_clip)} clip(s) cannot fill one batch of {needed} (--train_batch_size {batch_size} x "
            f"{processes} process(es)), whose clips are all of one size (frames x height x width): {sizes}. Lower "
            f"--train_batch_size or add clips" + (", or use fewer buckets." if len(counts) > 1 else "."))


def epoch_batches(shapes: list[tuple], global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: clip indices shuffled by (seed, epoch), each batch of one latent shape.

    A shape's leftover clips that do not fill a batch sit the epoch out (a different few each epoch).
    The number of batches is the same every epoch, so a step number alone says where a run stands.
    """
    order = list(range(len(shapes)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    filling: dict[tuple, list[int]] = {}
    batches = []
    for i in order:
        batch = filling.setdefault(shapes[i], [])
        batch.append(i)
        if len(batch) == global_batch_size:
            batches.append(batch)
            filling[shapes[i]] = []
    return batches


class EpochOrder:
    """epoch_batches of the epoch asked for, computed once an epoch: a step costs a lookup, not a shuffle of the
    whole dataset (138 ms a step at 100,000 clips), and the order stays a function of (seed, epoch)."""

    def __init__(self, shapes: list[tuple], global_batch_size: int, seed: int):
        self.shapes, self.global_batch_size, self.seed = shapes, global_batch_size, seed
        self._epoch, self._batches = None, None

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.shapes, self.global_batch_size, self.seed, epoch)
        return self._batches
