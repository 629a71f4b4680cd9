"""This process's liveness: the lock it holds on its own ``live-<key>.lock`` for as long as it
lives, the holdings written into that file, and the watch that puts the file back when someone
removes it.

Each owning process holds an exclusive ``flock`` on its own liveness file for its whole life.
The kernel drops the lock when the process dies, however it dies (SIGKILL included), so other
processes ask the lock, not the PID, whether the owner lives (:mod:`.probe`): that survives PID
reuse and PID namespaces (containers sharing the folder). The file is locked before it gets its
final name, so a probe never finds it unlocked while its owner starts.

The file's content is the owner's *holdings* (what it holds on every GPU, see :mod:`.records`):
the source of truth from which other processes check and rebuild the ledgers. Only its owner
writes it, in place (no new inode per change: creating and renaming files is what costs on a
journalling filesystem), framed with its length, a CRC and a generation that grows with every
write, so that a reader that catches a write half-way reads again, and one that has read this
generation already need not parse it again (:func:`pytest_gpushare.ledger.codec.frame`).

A liveness file that disappears while its owner lives (a temp cleaner, a person, the whole
folder removed) is put back by the owner: at its next access, and within :data:`WATCH_S` by the
watch (:func:`watch`), a thread that looks at every live owner of the process and calls the
owner's ledger back when its file or its folder is gone. Until then other processes cannot
verify the owner and trust it only for a bounded time (:mod:`.probe`).

Raw ``fcntl.flock`` rather than filelock: this lock lives as long as the process and is probed
from outside without waiting (:func:`pytest_gpushare.ledger.locks.try_flock`), which filelock's
acquire/release cycle does not model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.codec import HOLDINGS_FRAME, frame
from pytest_gpushare.ledger.files import MAX_FILE_BYTES, create_new, remove_file
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.records import Owner
from pytest_gpushare.threads import daemon_thread

__all__ = ["WATCH_S", "Liveness", "gone_name", "is_own", "live_name", "watch"]

#: How often the watch looks whether this process's liveness files and folders are still there.
WATCH_S = 0.5


def live_name(key: str) -> str:
    return f"live-{key}.lock"


def gone_name(key: str) -> str:
    """The name a dead owner's liveness file is renamed to by whoever reclaims it (a tombstone:
    :mod:`.probe` tells a dead owner from one whose file went missing)."""
    return f"gone-{key}.lock"


class Liveness:
    """This process's liveness lock for one owner in one folder, held until :meth:`close`,
    carrying the owner's holdings (``payload``)."""

    def __init__(self, folder: LedgerFolder, owner: Owner, payload: bytes) -> None:
        self.folder = folder
        self.key = owner.key
        self._payload = payload
        self._generation = 0
        self._slot = (folder.dir, owner.key)
        with _REGISTRY_GUARD:
            if self._slot in _REGISTRY:
                raise LedgerError(
                    f"this process already has a ledger open for owner {owner.key} in {folder.path}; reuse it"
                )
            self._fd: int | None = self._create(folder)
            _REGISTRY[self._slot] = self

    @property
    def fd(self) -> int:
        """The descriptor that holds the lock (whoever keeps a copy keeps the owner alive)."""
        if self._fd is None:
            raise LedgerError(f"the liveness lock of owner {self.key} was closed")
        return self._fd

    def _create(self, folder: LedgerFolder) -> int:
        tmp = f".tmp-{self.key}-live"
        try:
            # Others only read it and probe its lock (a shared flock needs no write access): in a
            # group folder no other member may rewrite what this owner holds.
            fd = create_new(folder, tmp, os.O_RDWR, 0o640 if folder.shared else 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot create a liveness file in {folder.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, self._framed(), 0)
            os.replace(tmp, live_name(self.key), src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except OSError as exc:
            os.close(fd)
            remove_file(folder, tmp)
            raise LedgerError(f"cannot hold a liveness lock in {folder.path}: {exc.strerror}") from None
        return fd

    def _framed(self) -> bytes:
        self._generation += 1
        return frame(HOLDINGS_FRAME, self._payload, self._generation)

    def write(self, payload: bytes) -> None:
        """Replace the holdings in place. The file never shrinks: the frame says where they end."""
        fd = self.fd
        previous, self._payload = self._payload, payload
        data = self._framed()
        if len(data) > MAX_FILE_BYTES:
            self._payload = previous
            raise LedgerError(f"the holdings of owner {self.key} would grow past the ledger size cap")
        try:
            os.pwrite(fd, data, 0)
        except OSError as exc:
            raise LedgerError(f"cannot write the holdings of owner {self.key}: {exc.strerror}") from None

    def lost(self) -> bool:
        """Whether the liveness file is no longer at its name (removed, renamed, replaced, or its
        folder removed): others cannot see us alive."""
        if self._fd is None:
            return False
        mine = os.fstat(self._fd)
        if mine.st_nlink == 0:
            return True
        try:
            here = os.stat(live_name(self.key), dir_fd=self.folder.fd, follow_symlinks=False)
        except OSError:
            return True
        return (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino)

    def ensure(self, folder: LedgerFolder) -> bool:
        """Put the liveness file, with the holdings, back in ``folder`` (the folder now at the
        path, which may be a new one) if it is gone from there; True if it was.

        Without it, every other process would soon take this live owner for dead. The old
        descriptor is closed only once the new file holds the lock, so the owner never looks
        dead in between.
        """
        fd = self.fd
        if folder is self.folder and not self.lost():
            return False
        with _REGISTRY_GUARD:
            self._fd = self._create(folder)
            old, self.folder = self.folder, folder
            os.close(fd)
            if old is not folder:
                remove_file(old, live_name(self.key))  # a folder renamed away keeps no dead owner
        return True

    def vacate(self) -> None:
        """Rename the liveness file to the owner's tombstone, keeping its lock: the owner is
        leaving, and whatever of it a ledger still lists is reclaimed by the next access."""
        with contextlib.suppress(OSError):
            os.replace(
                live_name(self.key), gone_name(self.key), src_dir_fd=self.folder.fd, dst_dir_fd=self.folder.fd
            )

    def close(self, *, tombstone: bool = False) -> None:
        """Give the lock up and remove the owner's files; with ``tombstone``, its tombstone stays
        (see :meth:`vacate`). A folder that takes no writes any more keeps the file: without its
        lock it is a dead owner's, reclaimed by the next access."""
        with _REGISTRY_GUARD:
            if self._fd is None:
                return
            remove_file(self.folder, live_name(self.key))
            if not tombstone:
                remove_file(self.folder, gone_name(self.key))
            os.close(self._fd)
            self._fd = None
            _REGISTRY.pop(self._slot, None)

    def _forget_in_child(self) -> None:
        # The child shares the parent's open file description; closing the child's descriptor
        # leaves the parent's lock in place (LOCK_UN here would drop the parent's lock).
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_REGISTRY: dict[tuple[str, str], Liveness] = {}
_REGISTRY_GUARD = threading.RLock()


def is_own(folder: LedgerFolder, key: str) -> bool:
    """Whether ``key`` is an owner of this process in ``folder``."""
    return (folder.dir, key) in _REGISTRY


# --- the watch ----------------------------------------------------------------------------------

#: The checks the watch runs, one per open ledger of this process (weakly held: a ledger that is
#: dropped without being closed stops being watched).
_WATCHED: weakref.WeakSet[_Check] = weakref.WeakSet()
_WATCH_GUARD = threading.Lock()
_watcher: threading.Thread | None = None


class _Check:
    """A callable the watch runs; ``stop`` ends it."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run: Callable[[], None] | None = run

    def stop(self) -> None:
        self.run = None


def watch(run: Callable[[], None]) -> _Check:
    """Have ``run`` called every :data:`WATCH_S` from the watch thread until the returned check is
    stopped or dropped; ``run`` must be quick when nothing is wrong, and not raise."""
    global _watcher
    check = _Check(run)
    with _WATCH_GUARD:
        _WATCHED.add(check)
        if _watcher is None or not _watcher.is_alive():
            _watcher = daemon_thread(_watch_loop, "gpushare-liveness-watch")
            _watcher.start()
    return check


def _watch_loop() -> None:
    while True:
        time.sleep(WATCH_S)
        with _WATCH_GUARD:
            checks = list(_WATCHED)
        for check in checks:
            run = check.run
            if run is not None:
                run()


def _forget_in_child() -> None:
    global _REGISTRY_GUARD, _WATCH_GUARD, _watcher
    for live in _REGISTRY.values():
        live._forget_in_child()
    _REGISTRY.clear()
    _REGISTRY_GUARD = threading.RLock()
    _WATCHED.clear()
    _WATCH_GUARD = threading.Lock()
    _watcher = None


os.register_at_fork(after_in_child=_forget_in_child)
