"""The locks of the ledger folder: :func:`locked` holds the flocks of some lock files until a deadline.

A lock file is opened once per process, relative to the folder's descriptor (:mod:`.files`), and
kept open: a free lock is then one non-blocking ``flock`` (``LOCK_EX | LOCK_NB``), and letting
go is ``LOCK_UN``. After each grant the descriptor is checked to still be the file at the lock's
name (a lock on a file that was removed or replaced guards nothing: issue 3), as filelock checks
its own. filelock is not used for this any more: it opens files by their full path, which a
folder swapped for a symbolic link would redirect, and it opens, locks and closes the file on
every acquire.

A busy lock is waited for in the kernel: a helper thread opens a second descriptor of the same
lock file and blocks in ``flock(LOCK_EX)`` on it, while the caller waits on an event until its
deadline. Polling (filelock's way: try, sleep, try) would have 15 waiters spend the CPU that the
holder needs, and hand the lock to whoever polls at the right moment rather than to a waiter as
soon as it is free. The kernel wakes the waiters when the holder lets go, and the descriptor
that won holds the lock until it is closed. A wait given up at its deadline leaves the thread
blocked in the kernel; when it is granted, the thread closes its descriptor, which lets the lock
go again.

Every wait ends at the caller's deadline, whoever holds the lock: a stopped or hung holder makes
the wait fail with :class:`~pytest_gpushare.errors.LockTimeout`, which names it as the kernel
sees it (:func:`pytest_gpushare.ledger.procfs.lock_holder`).

Junk in a lock file's place (a directory, a FIFO, a file we may not open) is set aside and a
fresh lock file made. Only ever junk: a regular lock file is never renamed or removed, since a
process may hold it. Two processes that find the same junk could otherwise race (the second
renaming the fresh lock file the first just made), so the repair holds a ``flock`` on the folder
itself while it looks again and renames.

flock belongs to the open file description, which a forked child shares: the child closes its
copies of the lock descriptors (never ``LOCK_UN``, which would drop the parent's lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pytest_gpushare.errors import LedgerError, LockTimeout
from pytest_gpushare.ledger.files import (
    Unusable,
    create_new,
    file_error,
    on_descriptor_shortage,
    open_checked,
    remove_file,
    set_aside,
)
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.procfs import lock_holder
from pytest_gpushare.threads import daemon_thread

__all__ = ["locked", "try_flock"]

#: What a non-blocking flock fails with while another open file description holds the lock.
_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """Take the flock of ``fd`` without waiting: True when taken, False when someone else holds
    it; any other failure raises ``OSError``."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


class _Timeout(Exception):
    """A kernel wait reached its deadline."""


class _PathLock:
    """One lock file of this process: a thread lock, then the kernel flock.

    One object per lock file per process, because flock belongs to an open file description: a
    second descriptor of the same file would wait for the first. The thread lock keeps the
    threads of this process apart. ``fd`` is the descriptor kept open between accesses;
    ``wait_fd`` the one that holds the lock when a kernel wait won it (None otherwise).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread_lock = threading.Lock()
        self.fd: int | None = None
        self.wait_fd: int | None = None

    def acquire(self, folder: LedgerFolder, deadline: float, log: Callable[[str], None]) -> None:
        """Take the flock (the caller holds ``thread_lock``); :class:`_Timeout` at ``deadline``."""
        while True:
            fd = self._descriptor(folder, log)
            if try_flock(fd):
                if _guards(folder, self.name, fd):
                    return
                fcntl.flock(fd, fcntl.LOCK_UN)
                self.forget()
                continue
            wait_fd = _wait_in_kernel(folder, self.name, deadline, log)
            if _guards(folder, self.name, wait_fd):
                self.wait_fd = wait_fd
                return
            # The lock file was removed (or replaced) while we waited: our lock guards nothing.
            _close_wait_fd(wait_fd)
            self.forget()

    def _descriptor(self, folder: LedgerFolder, log: Callable[[str], None]) -> int:
        if self.fd is None:
            with _WAIT_GUARD:  # see _open_wait_fd: a child must know every descriptor it inherits
                self.fd = open_lock_file(folder, self.name, log)
        return self.fd

    def release(self) -> None:
        fd, self.wait_fd = self.wait_fd, None
        if fd is not None:
            _close_wait_fd(fd)  # closing the only descriptor of the description lets the lock go
        elif self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def forget(self) -> None:
        """Close the kept descriptor (the next acquire opens the file at the name again)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_lock_file(folder: LedgerFolder, name: str, log: Callable[[str], None]) -> int:
    """A descriptor of the lock file ``name``, made when missing; junk in its place is set
    aside first (under the folder's own flock, see the module docstring)."""
    for _ in range(3):
        try:
            fd = open_checked(folder, name, os.O_RDWR)
        except Unusable as exc:
            _repair(folder, name, str(exc), log)
            continue
        if fd is not None:
            return fd
        _make_lock_file(folder, name)
    raise LedgerError(f"cannot make a lock file at {folder.path / name}: something keeps taking its place")


def _make_lock_file(folder: LedgerFolder, name: str) -> None:
    """Put a lock file at ``name`` unless one is there: made under a temporary name with its final
    mode, then linked into place, so that no process ever finds it with the umask's mode."""
    tmp = f".tmp-lock-{secrets.token_hex(4)}-{name}"
    try:
        os.close(create_new(folder, tmp))
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.link(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd, follow_symlinks=False)
    except OSError as exc:
        raise file_error(exc, folder.path / name, "make the lock file") from None
    finally:
        remove_file(folder, tmp)


def _repair(folder: LedgerFolder, name: str, why: str, log: Callable[[str], None]) -> None:
    with _folder_flock(folder):
        try:
            fd = open_checked(folder, name, os.O_RDONLY)
        except Unusable:
            aside = set_aside(folder, name)
            log(
                f"gpushare: {folder.path / name} was {why}, not a lock file; moved it to {aside} "
                "and made a new one"
            )
            return
        if fd is not None:  # another process repaired it meanwhile
            os.close(fd)


@contextlib.contextmanager
def _folder_flock(folder: LedgerFolder) -> Iterator[None]:
    """The folder's own flock (on its descriptor), held by whoever repairs a lock file."""
    fd = os.dup(folder.fd)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock on folders: repair anyway
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _guards(folder: LedgerFolder, name: str, fd: int) -> bool:
    """Whether the locked descriptor ``fd`` is still the file at ``name`` in the folder."""
    try:
        here = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (
        stat.S_ISREG(mine.st_mode)
        and mine.st_nlink > 0
        and (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)
    )


#: Descriptors of this process's lock files and kernel waits (waiting, holding, or abandoned and
#: still waiting), so a forked child can close its copies; guarded across fork (see
#: :func:`_open_wait_fd`).
_WAIT_FDS: set[int] = set()
# Reentrant: an open that runs out of descriptors closes kept ones under it (_drop_kept_descriptors).
_WAIT_GUARD = threading.RLock()


def _open_wait_fd(folder: LedgerFolder, name: str, log: Callable[[str], None]) -> int:
    # Opened and recorded under the guard that fork takes first, so a child never inherits a
    # descriptor it does not know of (it would keep a lock granted to it alive in the child).
    with _WAIT_GUARD:
        fd = open_lock_file(folder, name, log)
        _WAIT_FDS.add(fd)
    return fd


def _close_wait_fd(fd: int) -> None:
    with _WAIT_GUARD:
        _WAIT_FDS.discard(fd)
        os.close(fd)


def _wait_in_kernel(folder: LedgerFolder, name: str, deadline: float, log: Callable[[str], None]) -> int:
    """A descriptor of the lock file that holds its flock, waited for in the kernel until
    ``deadline``; :class:`_Timeout` (with who holds it) after that."""
    if time.monotonic() >= deadline:
        raise _Timeout()
    fd = _open_wait_fd(folder, name, log)
    granted = threading.Event()
    guard = threading.Lock()
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            outcome["error"] = exc
        with guard:  # the caller decides "given up" or "got it" exactly once, under the same guard
            if outcome.get("abandoned"):
                _close_wait_fd(fd)
                return
            granted.set()

    try:
        daemon_thread(wait, "gpushare-lock-wait").start()
    except BaseException:
        _close_wait_fd(fd)
        raise
    granted.wait(max(0.0, deadline - time.monotonic()))
    with guard:
        if not granted.is_set():
            outcome["abandoned"] = True
            raise _Timeout(lock_holder(fd))
    if "error" in outcome:
        _close_wait_fd(fd)
        raise outcome["error"]
    return fd


_LOCKS: dict[tuple[str, str], _PathLock] = {}
_LOCKS_GUARD = threading.Lock()
#: Lock files of at most this many (folder, name) pairs keep a descriptor open between accesses;
#: past it, those not held now are closed (a process that opens many folders, a test suite,
#: must not run out of descriptors).
_KEEP_MAX = 32


def _path_lock(folder: LedgerFolder, name: str) -> _PathLock:
    key = (folder.dir, name)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            if len(_LOCKS) >= _KEEP_MAX:
                _evict_unheld()
            lock = _LOCKS[key] = _PathLock(name)
        return lock


def _evict_unheld() -> None:
    """Close and forget the locks that nobody holds now (the caller holds ``_LOCKS_GUARD``)."""
    for key, lock in list(_LOCKS.items()):
        if lock.thread_lock.acquire(blocking=False):
            try:
                with _WAIT_GUARD:
                    lock.forget()
                del _LOCKS[key]
            finally:
                lock.thread_lock.release()


def _drop_kept_descriptors() -> None:
    # Called by an open that ran short, which may hold _WAIT_GUARD: never wait for _LOCKS_GUARD
    # here (_path_lock takes them the other way round); whoever holds it evicts anyway.
    if _LOCKS_GUARD.acquire(blocking=False):
        try:
            _evict_unheld()
        finally:
            _LOCKS_GUARD.release()


on_descriptor_shortage(_drop_kept_descriptors)


def _take(
    folder: LedgerFolder, lock: _PathLock, deadline: float, timeout: float, log: Callable[[str], None]
) -> None:
    if not lock.thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise _timed_out(folder, lock, timeout, "another thread of this process")
    try:
        lock.acquire(folder, deadline, log)
    except _Timeout as exc:
        lock.thread_lock.release()
        raise _timed_out(
            folder, lock, timeout, str(exc) or lock_holder(-1 if lock.fd is None else lock.fd)
        ) from None
    except OSError as exc:
        lock.thread_lock.release()
        lock.forget()
        raise file_error(exc, folder.path / lock.name, "lock") from None
    except BaseException:
        lock.thread_lock.release()
        raise


def _timed_out(folder: LedgerFolder, lock: _PathLock, timeout: float, holder: str) -> LockTimeout:
    path = str(folder.path / lock.name)
    return LockTimeout(f"could not lock {path} within {timeout:.1f}s: it is held by {holder}", path, holder)


def _drop(lock: _PathLock) -> None:
    try:
        lock.release()
    finally:
        lock.thread_lock.release()


@contextlib.contextmanager
def locked(
    folder: LedgerFolder, names: Iterable[str], timeout: float, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the locks of ``names`` (lock files in the folder), taken in sorted order so that two
    processes locking overlapping sets never wait on each other in a cycle. All of them within
    ``timeout`` seconds, or :class:`~pytest_gpushare.errors.LockTimeout`; ``log`` hears about
    junk set aside."""
    deadline = time.monotonic() + max(0.0, timeout)
    say = log if log is not None else (lambda _line: None)
    held: list[_PathLock] = []
    try:
        for name in sorted(set(names)):
            lock = _path_lock(folder, name)
            _take(folder, lock, deadline, timeout, say)
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            _drop(lock)


def _forget_locks_in_child() -> None:
    # A forked child holds nothing; it builds its own lock objects on first use. Its copies of
    # the kept and waiting descriptors are closed, never unlocked: the parent's locks stay.
    global _LOCKS_GUARD, _WAIT_GUARD
    for lock in _LOCKS.values():
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()
    for fd in _WAIT_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _WAIT_FDS.clear()
    _WAIT_GUARD = threading.RLock()


def _before_fork() -> None:
    _WAIT_GUARD.acquire()


def _after_fork_in_parent() -> None:
    _WAIT_GUARD.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forget_locks_in_child
)
