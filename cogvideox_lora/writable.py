"""The folders a run will write, tried before any model loads: one found unwritable at the first checkpoint or
tracker write would cost the encoding and every step before it."""

import os
import shutil
import tempfile
from pathlib import Path

from .settings import OutputSettings


def _nearest_existing(folder: Path) -> Path:
    return next(p for p in (folder, *folder.parents) if p.exists())


def lies_in_file(flag: str, folder: Path) -> str | None:
    """The problem of a folder that is, or would be created inside, a file."""
    folder = folder.absolute()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{flag} {folder}: {existing} is a file, not a folder: name a folder."
    return None


def _probe(folder: Path) -> None:
    """Makes a folder with a file in it inside folder and removes them, leaving folder's times as they were where
    the user owns it (a check that changed them would show as a change to what the user had)."""
    before = folder.stat()
    probe = Path(tempfile.mkdtemp(prefix=".write-probe-", dir=folder))
    try:
        (probe / "probe").write_bytes(bytes(4096))
    finally:
        shutil.rmtree(probe)
    try:
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    except PermissionError:  # a shared folder such as /tmp: writable, but its times are its owner's
        pass


def problems(folders: dict[str, Path]) -> list[str]:
    """The problem of each folder (flag -> path as the run will use it) that the run could not create or write.

    Each is tried where the run would first write: in the folder, or where it would create the first of the
    missing folders above it.
    """
    found = []
    for flag, folder in folders.items():
        problem = lies_in_file(flag, folder)
        if problem:
            found.append(problem)
            continue
        folder = folder.absolute()
        existing = _nearest_existing(folder)
        try:
            _probe(existing)
        except OSError as e:
            made = "write in it" if existing == folder else f"create {folder.relative_to(existing).parts[0]} in it"
            found.append(f"{flag} {folder}: the run cannot {made}: {existing} is not writable ({e.strerror}). "
                         f"Choose another folder, or make it writable (chmod u+w, or a disk with free space).")
    return found


def run_problems(output: OutputSettings, latent_cache_dir: str) -> list[str]:
    """The problems of the folders a run writes: its output folder, the latent cache and, with a tracker, the
    tracker's folder (--logging_dir, inside the output folder unless absolute)."""
    folders = {"--output_dir": Path(output.output_dir), "--latent_cache_dir": Path(latent_cache_dir).expanduser()}
    if output.report_to != "none":
        folders["--logging_dir"] = Path(output.output_dir, output.logging_dir)
    return problems(folders)
