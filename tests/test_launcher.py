"""The trainer under `accelerate launch` (launcher.py): its closing message written again once the launcher has
exited, by one process, and only where the launcher prints something after it; the terminal left alone where
the trainer is not a single-process launcher's child."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from cogvideox_lora import launcher
from cogvideox_lora.args import parse_args

# Stands in for `accelerate launch`: the helper knows a launcher by its command line (`accelerate launch ...`).
# It runs its children, each a trainer exiting with a message, waits for them, reports, and exits a moment later.
FAKE_LAUNCHER = """\
import subprocess, sys, time
trainer = "import sys; from cogvideox_lora import launcher; launcher.repeat_after_launcher(sys.argv[1]); sys.exit(1)"
children = [subprocess.Popen([sys.executable, "-c", trainer, f"error: worker {i}"]) for i in range(int(sys.argv[-1]))]
for child in children:
    child.wait()
print("LAUNCHER REPORT", file=sys.stderr, flush=True)
time.sleep(0.5)
"""


def _launch(tmp_path, *launch_args, workers: int = 1, **env) -> list[str]:
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(FAKE_LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    result = subprocess.run([sys.executable, str(fake), "launch", *launch_args, "train.py", str(workers)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    return result.stdout.strip().splitlines()  # read to the end: until the helper, which holds the pipe, is done


def test_the_message_comes_again_after_the_launchers_report(tmp_path):
    assert _launch(tmp_path)[-2:] == ["LAUNCHER REPORT", "error: worker 0"]


def test_of_several_workers_under_the_agent_one_repeats_its_message(tmp_path):
    lines = _launch(tmp_path, workers=3, TORCHELASTIC_RUN_ID="run")
    after = lines[lines.index("LAUNCHER REPORT") + 1:]
    assert len(after) == 1 and after[0].startswith("error: worker "), lines


def test_a_quiet_single_process_launcher_reports_nothing_so_nothing_is_repeated(tmp_path):
    assert _launch(tmp_path, "--quiet")[-1] == "LAUNCHER REPORT"


def test_without_a_launcher_nothing_is_repeated_and_the_terminal_is_left_alone():
    assert launcher.launcher_args(os.getppid()) is None  # pytest's parent: a shell, make
    before = os.getpgrp()
    with pytest.raises(SystemExit):
        with launcher.holding_the_terminal(), launcher.last_words():
            raise SystemExit("error: no such folder")
    assert os.getpgrp() == before


def test_a_refused_command_line_is_repeated_too(monkeypatch, capsys):
    repeated = []
    monkeypatch.setattr(launcher, "repeat_after_launcher", repeated.append)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", "data", "--height", "50"])
    assert exit_.value.code == 2 and len(repeated) == 1
    assert ": error:" in repeated[0]
    assert "--height" in repeated[0] and repeated[0] in capsys.readouterr().err


@pytest.mark.parametrize("command, expected", [
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--quiet", "train.py", "--rank", "4"],
     ["--quiet", "train.py", "--rank", "4"]),
    (["python", "-m", "accelerate.commands.launch", "train.py"], ["train.py"]),
    (["/venv/bin/python", "/venv/bin/accelerate-launch", "train.py"], ["train.py"]),
    (["/venv/bin/python", "/venv/bin/accelerate", "config"], None),
    (["bash", "finetune.sh"], None),
])
def test_an_accelerate_launch_process_is_known_by_its_command_line(monkeypatch, command, expected):
    cmdline = "\0".join(command) + "\0"
    monkeypatch.setattr(Path, "read_bytes", lambda self: cmdline.encode())
    assert launcher.launcher_args(1) == expected
