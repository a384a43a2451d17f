"""What earlier runs learned of each clip file, so that a warm start does work only for what changed.

As git's index does, a file is known by what identifies it cheaply (its path, size, modification time and
inode): while those are unchanged, its check verdict (for the frame settings it was checked at) and its
content hash are taken from here instead of decoding every frame and hashing every byte again. A file
with any of them changed is checked and hashed as new. The index is one JSON file in the latent cache
folder, written whole (temporary name, renamed); a damaged or missing one only costs a cold start.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from . import disk

logger = logging.getLogger(__name__)

FILE_NAME = "clip_index.json"
VERSION = 1


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def identity(st: os.stat_result) -> list[int]:
    """What the index knows a file by, from its stat (taken once a clip by the check, which needs it anyway)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def settings_key(settings) -> str:
    """The frame settings as the index files probes under them; made once a check, not once a clip."""
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


class ClipIndex:
    """Per clip file: its identity, its sha256 and its probe results under each frame setting checked."""

    def __init__(self, folder):
        self.path = Path(folder).expanduser() / FILE_NAME
        self._records: dict[str, dict] = {}
        self._changed = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == VERSION:
                self._records = data["clips"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, AttributeError) as e:
            logger.warning("%s is unreadable (%s): every clip is checked again.", self.path, e)

    def _record(self, path: Path, identity: list[int]) -> dict:
        """The record of the file with this identity, emptied if the file is not the one it describes."""
        name = str(path)
        record = self._records.get(name)
        if record is None or record.get("identity") != identity:
            record = self._records[name] = {"identity": identity, "probes": {}}
            self._changed = True
        return record

    def probe(self, path: Path, identity: list[int], settings_key: str) -> list | None:
        """What the file was found to hold at the settings (settings_key's), if it is unchanged since."""
        return self._record(path, identity)["probes"].get(settings_key)

    def set_probe(self, path: Path, identity: list[int], settings_key: str, probe) -> None:
        self._record(path, identity)["probes"][settings_key] = list(probe)
        self._changed = True

    def digest(self, path: Path) -> str:
        """The file's sha256, hashed only if it changed since it was: stat now, as encoding reads it now."""
        record = self._record(path, identity(os.stat(path)))
        if "sha256" not in record:
            record["sha256"] = file_digest(path)
            self._changed = True
        return record["sha256"]

    @contextlib.contextmanager
    def kept(self, create_on=()):
        """Saves what the block learned if it is cut short (a dataset refused for one clip keeps the others'
        checks) into an existing folder, and into a new one for the exceptions create_on names (a stop keeps
        what was checked). A block that ends well saves nothing: the caller saves once the run may write."""
        try:
            yield
        except BaseException as e:
            if self.path.parent.is_dir() or isinstance(e, create_on):
                self.save()
            raise

    def save(self) -> None:
        if not self._changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        disk.write_text(self.path, json.dumps({"version": VERSION, "clips": self._records}),
                        "the index of checked clips")
        self._changed = False
