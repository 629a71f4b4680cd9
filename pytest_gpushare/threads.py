"""The plugin's background threads: daemons that never take a signal meant for the process.

A process-directed signal (a terminal's Ctrl-C, a ``kill``) goes to any thread that does not
block it. Python runs the handler in the main thread either way, but the main thread may be
the one that must see the signal itself: ``gpushare run`` takes its signals with
``sigtimedwait`` to learn where each came from, and a signal caught by a helper thread's C
handler reaches it only as a plain Python handler call, with its origin lost (a terminal's
Ctrl-C then went to the command twice). So every thread the plugin starts blocks every signal
first; the main thread (or the user's own threads) takes them, as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["daemon_thread"]


def daemon_thread(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """A daemon thread (not started) running ``target(*args)`` with every signal blocked."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
