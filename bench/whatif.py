"""What-if patches: measure a proposed change to the ledger before anyone makes it.

Not part of the plugin. Each patch replaces one piece of :mod:`pytest_gpushare.ledgerfs` or
:mod:`pytest_gpushare.ledger` in the running process, so a benchmark can show what the change
would buy. Call :func:`install`, or load this module as a pytest plugin (``-p whatif`` with
``bench/`` on ``PYTHONPATH``) with ``BENCH_WHATIF=name[,name]`` in the environment. Importing it
changes nothing.

* ``kernel-lock``: the ledger lock is a ``flock`` on a descriptor kept open for the process's
  life; a contended lock is waited for in the kernel (a helper thread blocks in ``flock`` on a
  descriptor of its own, the caller waits on an event until its deadline) instead of polling.
  Waiters then sleep until the holder lets go, take the lock in the kernel's order, and burn no
  CPU that the holder needs.
* ``handover``: a lease given back is parked, not written: when the same process next asks for
  the same need and no request waits on its GPUs (the ledgers are read without the lock, and only
  when their identity changed since the last look), the parked lease is handed to the new holder
  with no locked access at all. Anything else gives the parked lease back first, as does a timer
  50 ms after parking, so memory is held for nobody at most that long.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_gpushare import ledger as _ledger
from pytest_gpushare import ledgerfs
from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledgerstate import parse_gpu_state

ENV = "BENCH_WHATIF"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PARK_S = 0.05


# --- kernel-lock ------------------------------------------------------------------------------


class KernelLock:
    """A ledger lock of this process; same interface as ``ledgerfs._PathLock``'s use in _take/_drop."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.thread_lock = threading.Lock()
        self._fd: int | None = None
        self._held: int | None = None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, self.mode)
        if os.fstat(fd).st_nlink == 0:  # pragma: no cover - removed between open and check
            os.close(fd)
            raise LedgerError(f"{self.path} vanished while being opened")
        return fd

    def _current(self) -> int:
        # A lock file someone removed guards nothing: take the one at the path now.
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self._fd = self._open()
        return self._fd

    def acquire(self, timeout: float) -> None:
        fd = self._current()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held = fd
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
        # A descriptor of its own: were the wait abandoned, its late grant must not be taken
        # for (and released as) a lock the caller holds later on its main descriptor.
        wait_fd = self._open()
        done = threading.Event()
        guard = threading.Lock()
        state: dict[str, Any] = {"abandoned": False, "error": None}

        def wait() -> None:
            try:
                fcntl.flock(wait_fd, fcntl.LOCK_EX)
            except OSError as exc:
                state["error"] = exc
                os.close(wait_fd)
                done.set()
                return
            with guard:
                if state["abandoned"]:
                    os.close(wait_fd)  # closing the only descriptor lets the lock go
                    return
                done.set()  # under the guard: the caller decides "given up" or "got it" once

        threading.Thread(target=wait, name="gpushare-lock-wait", daemon=True).start()
        got = done.wait(max(0.0, timeout))
        with guard:
            if not got and not done.is_set():
                state["abandoned"] = True
                raise ledgerfs.Timeout(str(self.path))
        if state["error"] is not None:
            raise state["error"]
        self._held = wait_fd

    def release(self) -> None:
        fd, self._held = self._held, None
        if fd is None:
            return
        if fd == self._fd:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            os.close(fd)


def _install_kernel_lock() -> None:
    def path_lock(folder: ledgerfs.LedgerFolder, name: str) -> Any:
        path = folder.path / name
        with ledgerfs._LOCKS_GUARD:
            lock = ledgerfs._LOCKS.get(str(path))
            if lock is None:
                lock = ledgerfs._LOCKS[str(path)] = KernelLock(path, folder.file_mode)  # type: ignore[assignment]
            return lock

    def take(lock: Any, deadline: float) -> None:
        if not lock.thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise LedgerError(f"could not lock {lock.path}: another thread of this process holds it")
        try:
            lock.acquire(deadline - time.monotonic())
        except ledgerfs.Timeout:
            lock.thread_lock.release()
            raise LedgerError(f"could not lock {lock.path} in time: another process holds it") from None
        except BaseException:
            lock.thread_lock.release()
            raise

    def drop(lock: Any) -> None:
        try:
            lock.release()
        finally:
            lock.thread_lock.release()

    ledgerfs._path_lock = path_lock  # type: ignore[assignment]
    ledgerfs._take = take
    ledgerfs._drop = drop


# --- handover -------------------------------------------------------------------------------


def _install_handover() -> None:
    cls = _ledger.Ledger
    orig_acquire, orig_release, orig_close = cls.acquire, cls.release, cls.close

    def state(self: Any) -> dict[str, Any]:
        if "_whatif" not in self.__dict__:
            self.__dict__["_whatif"] = {
                "parked": None,
                "need": None,
                "seen": {},
                "deadline": None,
                "wake": None,
            }
        return self.__dict__["_whatif"]

    def nobody_waits(self: Any, uuids: Sequence[str]) -> bool:
        """No request waits on these GPUs: read without the lock (ledgers are replaced whole),
        and only when a ledger changed since the last look."""
        seen = state(self)["seen"]
        for uuid, sig in zip(uuids, self._signature(list(uuids)), strict=True):
            if sig is None:
                return False
            if seen.get(uuid, (None,))[0] != sig:
                data = ledgerfs.read_file(self._folder, _ledger.ledger_name(uuid))
                if data is None:
                    return False
                seen[uuid] = (sig, not parse_gpu_state(data, uuid).waiters)
            if not seen[uuid][1]:
                return False
        return True

    def give_back_parked(self: Any) -> None:
        st = state(self)
        parked, st["parked"], st["deadline"] = st["parked"], None, None
        if parked is not None:
            orig_release(self, parked)

    def watch(self: Any) -> None:
        # One thread per ledger gives a parked lease back once it has waited PARK_S for a taker.
        # It never holds its condition while taking the ledger's mutex (release takes them the
        # other way round).
        st = state(self)
        while not self._closed:
            with st["wake"]:
                deadline = st["deadline"]
                if deadline is None:
                    st["wake"].wait()
                    continue
                if deadline > time.monotonic():
                    st["wake"].wait(deadline - time.monotonic())
                    continue
            with self._mutex, contextlib.suppress(LedgerError):
                due = st["deadline"]
                if not self._closed and due is not None and due <= time.monotonic():
                    give_back_parked(self)

    def acquire(self: Any, need: Any, test_id: str, timeout: float) -> Any:
        with self._mutex:
            st = state(self)
            parked = st["parked"]
            if parked is not None and st["need"] == need and nobody_waits(self, [u for u, _ in parked.parts]):
                st["parked"], st["deadline"] = None, None
                return replace(parked, test_id=test_id, taken_at=time.time(), waited_s=0.0)
            give_back_parked(self)
        lease = orig_acquire(self, need, test_id, timeout)
        state(self)["need"] = need
        return lease

    def release(self: Any, lease: Any) -> None:
        with self._mutex:
            st = state(self)
            give_back_parked(self)
            if st["wake"] is None:
                st["wake"] = threading.Condition(threading.Lock())
                threading.Thread(target=watch, args=(self,), name="gpushare-parked", daemon=True).start()
            with st["wake"]:
                st["parked"], st["deadline"] = lease, time.monotonic() + PARK_S
                st["wake"].notify()

    def close(self: Any) -> None:
        with self._mutex:
            st = state(self)
            if not self._closed:
                with contextlib.suppress(LedgerError):
                    give_back_parked(self)
        orig_close(self)
        if st["wake"] is not None:
            with st["wake"]:
                st["wake"].notify()

    cls.acquire = acquire  # type: ignore[method-assign]
    cls.release = release  # type: ignore[method-assign]
    cls.close = close  # type: ignore[method-assign]


PATCHES = {"kernel-lock": _install_kernel_lock, "handover": _install_handover}
_installed: set[str] = set()


def install(names: str | Sequence[str]) -> None:
    """Apply the named patches (comma-separated or a list) in this process, once each."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for name in wanted:
        if not name or name in _installed:
            continue
        if name not in PATCHES:
            raise SystemExit(f"unknown what-if patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
        _installed.add(name)


def pytest_configure(config: Any) -> None:
    """Loaded as a pytest plugin (``-p whatif``): apply the patches ``BENCH_WHATIF`` names, in the
    controller and in every xdist worker, before any ledger is opened."""
    install(os.environ.get(ENV, ""))
