"""NVML's lifetime in this process: started once, with a deadline, kept open until exit.

nvmlInit is reference counted inside the library (other users in the process are unaffected),
and while one client holds it the driver keeps its per-GPU state loaded. Without persistence
mode, every fresh start re-initialises each GPU, which takes seconds on big boxes, and the
ledger polls free memory often: so NVML is started once per process, not once per probe.
:func:`with_nvml` is the one way in; :mod:`~pytest_gpushare.gpus.nvml` (the only ``pynvml``
user) passes the module. Nothing here imports ``pynvml``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final, TypeVar

from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.threads import daemon_thread

__all__ = ["NVML_INIT_TIMEOUT_S", "forget", "handles", "shutdown", "start", "with_nvml"]

_T = TypeVar("_T")

_NVML_ERROR_UNINITIALIZED: Final = 1  # nvml.h; part of the C ABI

#: How long ``nvmlInit`` may take before NVML counts as failed. Without persistence mode the
#: driver initialises every GPU on a first start, seconds on a big box; a hung driver or a GPU
#: that fell off the bus never returns.
NVML_INIT_TIMEOUT_S: Final = 30.0

# ``_nvml_started`` is the module through which we hold our one reference; a different module
# object (a test's fake) starts anew.
_nvml_lock = threading.Lock()
_nvml_started: ModuleType | None = None
# The module whose nvmlInit passed its deadline, and the words for it: NVML stays failed for
# the rest of the process (a second call would hang as long again, in one more thread).
_nvml_hung: tuple[ModuleType, str] | None = None
# Device handles by UUID, valid for the current start only: nvmlDeviceGetHandleByUUID walks
# every device, and a sampler reads one device's processes every few milliseconds.
handles: dict[str, Any] = {}


def start(nvml: ModuleType, timeout_s: float) -> None:
    """Start NVML through ``nvml`` unless we hold a reference through it already."""
    global _nvml_started
    with _nvml_lock:
        if _nvml_started is not nvml:
            _init_within(nvml, timeout_s)
            _nvml_started = nvml
            handles.clear()


def _init_within(nvml: ModuleType, timeout_s: float) -> None:
    """``nvml.nvmlInit()`` in a daemon thread, waited for at most ``timeout_s``; its error propagates.

    Past the deadline the call is left to itself (a thread cannot be stopped) and NVML counts as
    failed for the rest of the process: :class:`GpuShareError`, at once on every later start.
    """
    global _nvml_hung
    if _nvml_hung is not None and _nvml_hung[0] is nvml:
        raise GpuShareError(_nvml_hung[1])
    failure: list[BaseException] = []

    def call() -> None:
        try:
            nvml.nvmlInit()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            failure.append(exc)

    thread = daemon_thread(call, "gpushare-nvml-init")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        words = (
            f"nvmlInit did not return within {timeout_s:g}s (a hung driver or GPU?): "
            "NVML counts as failed for the rest of this process"
        )
        _nvml_hung = (nvml, words)
        raise GpuShareError(words)
    if failure:
        raise failure[0]


def forget() -> None:
    """Drop our claim without calling NVML, which someone else shut down under us."""
    global _nvml_started
    with _nvml_lock:
        _nvml_started = None


def _forget_in_child() -> None:
    global _nvml_lock, _nvml_started, _nvml_hung
    _nvml_started = None
    _nvml_hung = None  # the hung call is the parent's: a new process tries once on its own
    # The child may inherit the lock held by a thread that does not exist there.
    _nvml_lock = threading.Lock()


def shutdown() -> None:
    """Give our reference back (at exit)."""
    global _nvml_started
    with _nvml_lock:
        nvml, _nvml_started = _nvml_started, None
    if nvml is not None:
        # At interpreter exit there is nobody left to tell.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    # NVML state does not survive fork reliably; a child starts its own reference.
    os.register_at_fork(after_in_child=_forget_in_child)


def with_nvml(nvml: Any, read: Callable[[Any], _T], init_timeout_s: float = NVML_INIT_TIMEOUT_S) -> _T:
    """Start NVML (once per process) and ``read(nvml)``; NVMLError propagates, and so does the
    :class:`GpuShareError` of a start that passed ``init_timeout_s``.

    When someone in this process called nvmlShutdown once too often, NVML is started again,
    once.
    """
    for attempt in (1, 2):
        try:
            start(nvml, init_timeout_s)
            return read(nvml)
        except nvml.NVMLError as exc:
            if exc.value != _NVML_ERROR_UNINITIALIZED or attempt == 2:
                raise
            forget()
    raise AssertionError("unreachable")  # pragma: no cover
