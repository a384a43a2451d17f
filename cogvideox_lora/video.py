"""Decoding a clip as a player shows it: each frame's presentation time, its display size, and the frames
themselves, decoded in order.

decord seeks inexactly in open-GOP streams (x265's default), in H.264 in AVI and in WMV: get_batch, reader[i]
and even skip_frames return repeated or earlier frames there. Its next() decodes in order and is exact in all
of them, so every frame is read that way, and only the ones wanted are kept.
"""

import functools
import itertools
import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

# Animated images are read with Pillow (decord opens neither animated WebP nor GIF).
ANIMATED_SUFFIXES = {".gif", ".webp"}


def reencode_command(path: Path) -> str:
    """The ffmpeg command that re-encodes a clip beside it, quoted for a POSIX shell (names with spaces, brackets
    or quotes paste as they are)."""
    return shlex.join(["ffmpeg", "-i", str(path), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-r", "24",
                       str(path.with_name(path.stem + "_fixed.mp4"))])


class ClipUnreadable(Exception):
    """A clip whose frames cannot be trusted; the message says why, in a few words."""


def _damaged(total: int) -> ClipUnreadable:
    # Not which frame: decord decodes ahead in a thread, so an error surfaces some frames before or after it.
    return ClipUnreadable(f"the file is damaged: decoding fails partway through its {total} frames")


@dataclass
class Video:
    """An opened clip. starts: each frame's presentation time (s) in presentation order; end: when the last leaves
    the screen; height and width: as displayed, rotation applied; pixel_aspect: the sample aspect ratio (a pixel's
    width over its height), which resizing must apply; frame_rate: the average, for messages."""

    starts: np.ndarray
    end: float
    height: int
    width: int
    pixel_aspect: float
    frame_rate: float
    _decode: Callable[[], Iterator[np.ndarray]]

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        """The [H, W, 3] uint8 frames at non-decreasing indices, decoding every frame up to the last in order (once)."""
        wanted = iter(indices)
        target = next(wanted, None)
        if target is None:
            return
        i = -1
        try:
            for i, frame in enumerate(self._decode()):
                if frame.shape[:2] != (self.height, self.width):
                    raise ClipUnreadable(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, the first "
                                         f"{self.width}x{self.height}")
                while i == target:  # a frame on screen at several sampled times is given for each
                    yield frame
                    target = next(wanted, None)
                if target is None:
                    return
        except ClipUnreadable:
            raise
        except Exception:  # decord raises its own error types for damaged data
            raise _damaged(len(self.starts)) from None
        raise ClipUnreadable(f"only {i + 1} of the {len(self.starts)} frames it lists decode")


def open_video(path: Path) -> Video:
    if path.suffix.lower() in ANIMATED_SUFFIXES:
        return _open_animated_image(path)
    import decord  # imported here so that tools which never read clips do not need decord

    reader = decord.VideoReader(str(path), num_threads=1)
    n, frame_rate = len(reader), reader.get_avg_fps()
    # [start, end] of each frame; containers without timestamps (AVI) give garbage or nothing (-2^63 s).
    times = reader.get_frame_timestamp(range(n)).astype(np.float64)
    starts = times[:, 0]
    timed = len(starts) == n and np.isfinite(times).all() and starts.min() > -1 and (np.diff(starts) > 0).all()
    if not timed:
        if not (frame_rate > 0 and np.isfinite(frame_rate)):
            raise ClipUnreadable("it has neither frame timestamps nor a frame rate")
        starts = np.arange(n) / frame_rate
    last_end = times[-1, 1] if timed and times[-1, 1] > starts[-1] else starts[-1] + 1 / frame_rate

    def decode():
        while True:
            try:
                yield _rgb(reader.next().asnumpy())
            except StopIteration:
                return

    # decord already turns frames upright by the rotation tag; the first frame is read through decode() so
    # that nothing seeks before the frames are read in order.
    frames = decode()
    try:
        first = next(frames)
    except Exception:  # decord raises its own error types for damaged data
        raise _damaged(n) from None
    height, width = first.shape[:2]
    rotated, pixel_aspect = _rotation_and_pixel_aspect(path)
    if rotated:  # the sample aspect ratio is the stored picture's: on a turned picture it stretches the height
        pixel_aspect = 1 / pixel_aspect
    return Video(starts, float(last_end), height, width, pixel_aspect, frame_rate,
                 lambda: itertools.chain([first], frames))


def _rgb(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] of a frame decord returns. At some widths (48, 72...) it returns [H, W, 4]: not RGBA but the RGB
    rows with their padding to FFmpeg's line alignment, whose first 3W bytes are the picture."""
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    height, width = frame.shape[:2]
    rows = frame.reshape(height, -1)
    if rows.shape[1] < 3 * width:
        raise ClipUnreadable(f"its frames decode as {frame.shape}, not as RGB")
    return np.ascontiguousarray(rows[:, :3 * width]).reshape(height, width, 3)


def _rotation_and_pixel_aspect(path: Path) -> tuple[bool, float]:
    """(turned by a quarter, the sample aspect ratio) of the first video stream.

    decord exposes neither, so they are read from what `ffmpeg -i` prints: imageio-ffmpeg ships ffmpeg for
    every platform and it takes some 30 ms a clip, against parsing MP4, MKV, AVI... headers by hand. Without
    any ffmpeg, pixels are taken as square (with a warning).
    """
    ffmpeg = _ffmpeg()
    if ffmpeg is None:
        return False, 1.0
    text = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True, errors="replace").stderr
    stream = text[text.find("Video:"):]
    stream = stream[:stream.find("Stream #", 1) if "Stream #" in stream else None]
    sar = re.search(r"\[SAR (\d+):(\d+) DAR", stream)
    rotation = re.search(r"rotation of (-?[\d.]+) degrees", stream)
    pixel_aspect = int(sar[1]) / int(sar[2]) if sar and int(sar[1]) and int(sar[2]) else 1.0
    return bool(rotation) and round(float(rotation[1])) % 180 == 90, pixel_aspect


@functools.cache
def _ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        found = shutil.which("ffmpeg")
        if found is None:
            logger.warning("No ffmpeg (pip install imageio-ffmpeg): clips are taken to have square pixels, so an "
                           "anamorphic clip would train squeezed.")
        return found


def _open_animated_image(path: Path) -> Video:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        durations = []
        for frame in ImageSequence.Iterator(image):
            frame.load()  # WebP sets a frame's duration only once it is decoded
            duration = frame.info.get("duration")
            if not duration:
                raise ClipUnreadable("an animated image without frame durations")
            durations.append(duration / 1000)
        width, height = image.size
    ends = np.cumsum(durations)

    def decode():
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                yield np.asarray(frame.convert("RGB"))

    return Video(ends - durations, float(ends[-1]), height, width, 1.0, len(durations) / ends[-1], decode)
