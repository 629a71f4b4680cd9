"""The locks of the ledger folder: :func:`locked` holds the flocks of some lock files.

A free lock is taken by filelock (``FileLock.acquire(blocking=False)``: one non-blocking
``flock`` on the lock file, with filelock's checks for a removed or foreign lock file). filelock
can only poll for a busy lock: each waiter wakes, tries, and sleeps again, so 15 waiters spend
the CPU that the holder needs, and the lock goes to whoever polls at the right moment rather
than to a waiter as soon as it is free. So a busy lock is waited for in the kernel instead: a
helper thread opens a second descriptor of the same lock file and blocks in ``flock(LOCK_EX)``
on it, while the caller waits on an event until its deadline. The kernel wakes the waiters when
the holder lets go, and the descriptor that won holds the lock until it is closed. filelock
cannot do this itself (it has no blocking acquire: it opens, tries ``LOCK_NB``, closes and
sleeps), and its lock object cannot adopt a descriptor locked elsewhere, hence the second
descriptor. A wait given up at its deadline leaves the thread blocked in the kernel; when it is
granted, the thread closes its descriptor, which lets the lock go again.

flock belongs to the open file description, which a forked child shares: the child closes its
copies of the waiting descriptors (never ``LOCK_UN``, which would drop the parent's lock), as
filelock does with its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.folder import LedgerFolder, file_error, open_nofollow, symlink_refused

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


class _PathLock:
    """One ledger lock of this process: a thread lock, then the kernel flock.

    One object per path per process, because flock belongs to an open file description: a second
    object on the same path would wait for the first. filelock's lock is made reentrant across
    threads (``thread_local=False``), so the thread lock is what keeps two threads apart.
    ``wait_fd`` is the descriptor that holds the lock when a kernel wait won it (None when
    filelock holds it, or nobody).
    """

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.thread_lock = threading.Lock()
        self.file_lock = FileLock(path, mode=mode, thread_local=False, fallback_to_soft=False)
        self.wait_fd: int | None = None

    def acquire(self, deadline: float) -> None:
        """Take the flock (the caller holds ``thread_lock``); :class:`Timeout` at ``deadline``."""
        while True:
            try:
                self.file_lock.acquire(blocking=False)
                return
            except Timeout:
                pass
            fd = _wait_in_kernel(self.path, deadline)
            if _guards_path(fd, self.path):
                self.wait_fd = fd
                return
            # The lock file was removed (or replaced) while we waited: our lock guards nothing.
            _close_wait_fd(fd)

    def release(self) -> None:
        fd, self.wait_fd = self.wait_fd, None
        if fd is None:
            self.file_lock.release()
        else:
            _close_wait_fd(fd)  # closing the only descriptor of the description lets the lock go


#: Descriptors opened for kernel waits (waiting, holding, or abandoned and still waiting), so a
#: forked child can close its copies; guarded across fork (see :func:`_open_wait_fd`).
_WAIT_FDS: set[int] = set()
_WAIT_GUARD = threading.Lock()


def _open_wait_fd(path: Path) -> int:
    # Opened and recorded under the guard that fork takes first, so a child never inherits a
    # descriptor it does not know of (it would keep a lock granted to it alive in the child).
    with _WAIT_GUARD:
        fd = open_nofollow(path, os.O_RDWR)
        _WAIT_FDS.add(fd)
    return fd


def _close_wait_fd(fd: int) -> None:
    with _WAIT_GUARD:
        _WAIT_FDS.discard(fd)
        os.close(fd)


def _guards_path(fd: int, path: Path) -> bool:
    """Whether the locked descriptor ``fd`` is still the file at ``path``."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (
        stat.S_ISREG(mine.st_mode)
        and mine.st_nlink > 0
        and (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)
    )


def _wait_in_kernel(path: Path, deadline: float) -> int:
    """A descriptor of ``path`` that holds its flock, waited for in the kernel until ``deadline``."""
    if time.monotonic() >= deadline:
        raise Timeout(str(path))
    fd = _open_wait_fd(path)
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
        threading.Thread(target=wait, name="gpushare-lock-wait", daemon=True).start()
    except BaseException:
        _close_wait_fd(fd)
        raise
    granted.wait(max(0.0, deadline - time.monotonic()))
    with guard:
        if not granted.is_set():
            outcome["abandoned"] = True
            raise Timeout(str(path))
    if "error" in outcome:
        _close_wait_fd(fd)
        raise outcome["error"]
    return fd


_LOCKS: dict[str, _PathLock] = {}
_LOCKS_GUARD = threading.Lock()


def _path_lock(folder: LedgerFolder, name: str) -> _PathLock:
    key = os.path.join(folder.dir, name)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            path = folder.path / name
            _check_lock_file(folder, path)
            lock = _LOCKS[key] = _PathLock(path, folder.file_mode)
        return lock


def _check_lock_file(folder: LedgerFolder, path: Path) -> None:
    """Refuse a lock file already there that is a link or not ours to trust (a missing one is
    created by filelock)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise symlink_refused(path)
    folder.check_file(st, path)


def _take(lock: _PathLock, deadline: float) -> None:
    if not lock.thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise LedgerError(f"could not lock {lock.path}: another thread of this process holds it")
    try:
        lock.acquire(deadline)
    except Timeout:
        lock.thread_lock.release()
        raise LedgerError(
            f"could not lock {lock.path} in time: another process holds it (a stopped or hung process?)"
        ) from None
    except OSError as exc:
        lock.thread_lock.release()
        raise file_error(exc, lock.path, "lock") from None
    except BaseException:
        lock.thread_lock.release()
        raise


def _drop(lock: _PathLock) -> None:
    try:
        lock.release()
    finally:
        lock.thread_lock.release()


@contextlib.contextmanager
def locked(folder: LedgerFolder, names: Iterable[str], timeout: float) -> Iterator[None]:
    """Hold the locks of ``names`` (lock files in the folder), taken in sorted order so that two
    processes locking overlapping sets never wait on each other in a cycle."""
    deadline = time.monotonic() + timeout
    held: list[_PathLock] = []
    try:
        for name in sorted(set(names)):
            lock = _path_lock(folder, name)
            _take(lock, deadline)
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            _drop(lock)


def _forget_locks_in_child() -> None:
    # A forked child holds nothing; the parent's lock objects refuse to work there (filelock
    # raises for an inherited lock), so the child builds its own on first use. Its copies of the
    # waiting descriptors are closed, never unlocked: the parent's locks stay where they are.
    global _LOCKS_GUARD, _WAIT_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()
    for fd in _WAIT_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _WAIT_FDS.clear()
    _WAIT_GUARD = threading.Lock()


def _before_fork() -> None:
    _WAIT_GUARD.acquire()


def _after_fork_in_parent() -> None:
    _WAIT_GUARD.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forget_locks_in_child
)
