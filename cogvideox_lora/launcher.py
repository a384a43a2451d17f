"""The trainer under a plain `accelerate launch`: its closing message last on screen, and a Ctrl-C that the
launcher waits out.

accelerate's launcher reports a child's failure itself (a CalledProcessError traceback for one process, torch's
ChildFailedError report for several), after the trainer's `error:` line or stop message: last_words() leaves a
small helper behind that writes the message again once the launcher has exited. On a terminal, Ctrl-C reaches
the whole foreground job: the single-process launcher then raises KeyboardInterrupt and exits within 0.25 s,
giving the prompt back while the trainer is still stopping. holding_the_terminal() makes the trainer's own
process group the terminal's foreground, so Ctrl-C reaches the trainer alone and the launcher waits for it.
Linux only (/proc, pidfds); elsewhere, and outside `accelerate launch`, both do nothing.
"""

import contextlib
import ctypes
import io
import os
import select
import signal
import socket
import sys
from pathlib import Path

REPEAT_WITHIN = 60.0  # seconds the helper waits for the launcher; a launcher still running then is not reporting
_PR_SET_PDEATHSIG = 1


def launcher_args(pid: int) -> list[str] | None:
    """The arguments given to `accelerate launch` if process pid runs it, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return None
    for i, word in enumerate(argv):
        name = os.path.basename(word)
        if word == "accelerate.commands.launch" or name == "accelerate-launch":  # python -m ..., its own script
            return argv[i + 1:]
        if name == "accelerate" and argv[i + 1:i + 2] == ["launch"]:
            return argv[i + 2:]
    return None


def _under_the_agent() -> bool:
    """Whether torch's elastic agent (accelerate launch with several processes) runs this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _quiet(args: list[str]) -> bool:
    """Whether the single-process launcher was given --quiet (it then prints nothing after a failed child)."""
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return bool(launch_command_parser().parse_args(args).quiet)
    except SystemExit:  # arguments this accelerate does not know: it reports them itself
        return False


@contextlib.contextmanager
def last_words():
    """A closing message (SystemExit with a string: an `error:` line, the stop message) is written again after
    the launcher's own report."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            repeat_after_launcher(e.code)
        raise


def repeat_after_launcher(message: str) -> None:
    """Under `accelerate launch` (unless it is quiet), forks a helper that writes message to stderr once the
    launcher has exited: after its traceback or report. In a pipeline (`2>&1 | tee log`) that is exact, as the
    pipe stays open until the helper is done; on a terminal the shell's prompt may come first."""
    launcher = os.getppid()
    args = launcher_args(launcher)
    if args is None or (not _under_the_agent() and _quiet(args)):
        return
    try:
        pidfd = os.pidfd_open(launcher)  # now, while the launcher surely waits for this process
        helper = os.fork()
    except OSError:  # no pidfds (Linux before 5.3), or no memory to fork: no repeat
        return
    if helper:
        os.close(pidfd)
        return
    try:
        _repeat(pidfd, launcher, message)
    finally:
        os._exit(0)  # never the trainer's own exit path (its finally blocks, atexit) a second time


def _repeat(pidfd: int, launcher: int, message: str) -> None:
    # A session of its own: neither the terminal's Ctrl-C or hangup nor a signal to the run's process group reaches
    # it, and it is no process of the run left behind. It keeps only stderr, so that it holds none of the
    # launcher's pipes, the trainer's files or the terminal beyond that.
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.dup2(pidfd, 3)
    os.closerange(0, 2)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    # Several workers under torch's agent all exit with the message: the first helper to claim the launcher's
    # name writes it. An abstract socket's name goes with the last process holding it, so nothing is left.
    claim = socket.socket(socket.AF_UNIX)
    try:
        claim.bind(f"\0cogvideox_lora-last-words-{launcher}")
    except OSError:
        return
    if select.select([3], [], [], REPEAT_WITHIN)[0]:
        os.write(2, (message + "\n").encode(errors="replace"))


@contextlib.contextmanager
def holding_the_terminal():
    """Under a single-process `accelerate launch` that is the terminal's foreground job, makes this process's own
    group the foreground for as long as the block runs; the launcher's group has it back afterwards."""
    tty = _terminal_to_take()
    if tty is None:
        yield
        return
    original = os.getpgrp()
    os.setpgid(0, 0)
    # A SIGTERM to the launcher's group (`kill -TERM -- -PGID`) no longer reaches this process: the launcher dies
    # of it, and its death is passed on as a SIGTERM, so the trainer checkpoints and stops as before. (A hangup
    # still reaches it: the kernel signals the terminal's foreground group.)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # Ctrl-Z would stop this group alone, which neither the launcher nor the shell would see: a stuck terminal.
    suspend = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    _set_foreground(tty, os.getpgrp())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a terminal hung up
            if os.tcgetpgrp(tty) == os.getpgrp():  # not when the shell has taken it back (the launcher died)
                _set_foreground(tty, original)
        signal.signal(signal.SIGTSTP, suspend)
        os.close(tty)


def _terminal_to_take() -> int | None:
    """The controlling terminal, open, if this process should take it; else None."""
    launcher = os.getppid()
    if sys.platform != "linux" or _under_the_agent() or launcher_args(launcher) is None or _ignores_sigint(launcher):
        return None  # the agent passes signals on and waits; a launcher ignoring SIGINT (the wrapper scripts) waits
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None  # no controlling terminal
    if os.tcgetpgrp(tty) != os.getpgrp():  # a background job (`&`) must not take the terminal
        os.close(tty)
        return None
    return tty


def _ignores_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(mask >> (signal.SIGINT - 1) & 1)


def _set_foreground(tty: int, pgrp: int) -> None:
    # A process outside the foreground group that sets it gets SIGTTOU (and would stop) unless that is blocked.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(tty, pgrp)
    except OSError:
        pass  # that group is gone: the shell takes the terminal back once the launcher has exited
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
