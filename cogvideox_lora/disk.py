"""Writing files whole or not at all, and a full disk (or quota) said in one line instead of a traceback.

Every file the trainer leaves is written under a temporary name in its folder and renamed into place, so
a full disk or a kill leaves nothing half-written under a final name.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(Exception):
    """A write that the disk (or a quota) had no room for: where, what, how much was needed and free."""

    def __init__(self, folder, what: str, needed: int | None = None, ahead: bool = False):
        """ahead: what does not fit is yet to be written; the run stops before the work it would save."""
        self.folder, self.what, self.needed = Path(folder), what, needed
        free = free_bytes(folder)
        room = (f"it needs {size(needed)}, " if needed else "") + (f"{size(free)} free" if free is not None
                                                                  else "free space unknown")
        again = " with --resume_from_checkpoint latest" if "checkpoint" in what else ""
        super().__init__(f"no space left in {self.folder} " + (f"for {what} ({room}): stopping before training the "
                                                               f"steps it would save. " if ahead else
                                                               f"while writing {what} ({room}): ")
                         + f"Free some space or choose a folder on another disk, then run the same command "
                           f"again{again}.")


def size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def free_bytes(folder) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_full(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the disk is full. torch's zip writer hides ENOSPC in a
    RuntimeError ('unexpected pos'), so a failed write into a folder with nothing free counts too."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def folder_size(path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@contextlib.contextmanager
def writing(folder, what: str, needed: int | None = None, nearly_full: int = 0):
    """Turns a full disk inside the block into DiskFull. nearly_full: a failure of any kind while fewer bytes
    than that are free is taken for a full disk (for writers that lose the errno)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        free = free_bytes(folder)
        if is_full(e) or (nearly_full and free is not None and free < nearly_full):
            raise DiskFull(folder, what, needed) from e
        raise


def replace_atomically(path, write, what: str | None = None, needed: int | None = None) -> Path:
    """Calls write(temporary_path) for a file beside `path`, then renames it to `path`; nothing is left under
    either name if it fails. A full disk raises DiskFull naming the folder and what was written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with writing(path.parent, what or str(path), needed):
            write(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path, text: str, what: str | None = None) -> Path:
    return replace_atomically(path, lambda tmp: Path(tmp).write_text(text), what)
