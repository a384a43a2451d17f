"""The trainer's closing message as the last thing on screen under the wrapper scripts.

torch's elastic agent (accelerate launch with several processes) prints its own failure report after a
worker exits with an error, so the trainer's `error:` line scrolls away. The wrapper scripts name a file in
LAST_WORDS_ENV; a worker under the agent writes its closing message there, and the script prints it again
once the launcher is done. (A single process's launcher is made quiet by the scripts' --quiet instead.)
"""

import contextlib
import os
from pathlib import Path

LAST_WORDS_ENV = "COGVIDEOX_LORA_LAST_WORDS"


@contextlib.contextmanager
def last_words():
    try:
        yield
    except SystemExit as e:
        path = os.environ.get(LAST_WORDS_ENV)
        if path and isinstance(e.code, str) and "TORCHELASTIC_RUN_ID" in os.environ:
            Path(path).write_text(e.code + "\n")
        raise
