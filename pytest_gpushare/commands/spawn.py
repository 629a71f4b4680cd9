"""Running ``gpushare run``'s command: spawned with the signal state it should have, signals
forwarded, its exit code returned.

SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the command, except a
SIGINT, SIGQUIT or SIGHUP that the terminal sent to the whole foreground process group, which
the command got already (a second copy would turn one Ctrl-C into "force quit" for many
servers). Signals inherited as ignored stay ignored and are not forwarded (``nohup``,
background jobs of a script). Before the command runs, a forwarded signal stops the wait for
the lease instead (:class:`Interrupted`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = [
    "FORWARDED_SIGNALS",
    "Interrupted",
    "handled_signals",
    "should_forward",
    "signal_name",
    "signals_interrupt",
    "spawn_and_wait",
]

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# What a terminal sends to its whole foreground process group.
_TTY_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP})
# si_code of a signal the kernel raised itself (a terminal's Ctrl-C, Ctrl-\ or hangup) rather
# than a kill() by some process (SI_USER, 0). Linux's value; the module does not export it.
_SI_KERNEL = 0x80
# Python ignores these at start-up; the command gets the default back, as subprocess does it.
_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
#: Without a SIGCHLD (it cannot be lost on Linux, but costs nothing to guard) the child is polled.
_POLL_S = 1.0

# What signal.signal() takes and returns.
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Interrupted(BaseException):
    """A forwarded signal arrived while no command was running yet."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def handled_signals() -> list[int]:
    """The signals to forward: those not inherited as ignored (``nohup``, ``cmd &`` asked that)."""
    return [s for s in FORWARDED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


@contextmanager
def signals_interrupt(signums: Sequence[int]) -> Iterator[None]:
    """While the lease is awaited, each of ``signums`` raises :class:`Interrupted`."""
    previous = {s: signal.signal(s, _interrupt) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def should_forward(signum: int, si_code: int, child_pgid: int, own_pgid: int) -> bool:
    """Whether a signal that reached ``gpushare run`` must be sent on to the command.

    Not when a terminal raised it (``si_code`` is the kernel's) for the foreground process
    group and the command is in ours: it got its own copy.
    """
    return not (signum in _TTY_SIGNALS and si_code == _SI_KERNEL and child_pgid == own_pgid)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended; the wait loop reaps it
        os.kill(pid, signum)


def _forward(pid: int, info: signal.struct_siginfo) -> None:
    try:
        child_pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if should_forward(info.si_signo, info.si_code, child_pgid, os.getpgrp()):
        _kill(pid, info.si_signo)


def spawn_and_wait(command: Sequence[str], env: Mapping[str, str], forwarded: Sequence[int]) -> int:
    """Run ``command``, forwarding signals, and return its exit code (``128 + N`` for signal N).

    The signals are blocked and taken with ``sigtimedwait`` (with SIGCHLD for the command's
    end), which gives each signal's origin; ``posix_spawn`` hands the command the mask and the
    dispositions it should have, which ``subprocess`` cannot do.
    """
    waited_for = {*forwarded, signal.SIGCHLD}
    previous: dict[int, _Handler] = {}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited_for)
    try:
        pid = os.posix_spawnp(
            command[0],
            list(command),
            dict(env),
            setsigmask=old_mask,
            setsigdef=(*forwarded, *_RESTORED_SIGNALS),
        )
        # A thread that does not block them (one a library left behind) may take a signal
        # instead: its handler then passes it on rather than stop the wait.
        for signum in forwarded:
            previous.setdefault(signum, signal.signal(signum, lambda got, _frame: _kill(pid, got)))
        while True:
            info = signal.sigtimedwait(waited_for, _POLL_S)
            if info is not None and info.si_signo != signal.SIGCHLD:
                _forward(pid, info)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
    finally:
        # Take what is still pending (a late SIGCHLD, a signal meant for the ended command)
        # before the old mask lets it act on this process.
        while signal.sigtimedwait(waited_for, 0) is not None:
            pass
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
