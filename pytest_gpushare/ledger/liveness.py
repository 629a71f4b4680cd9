"""Whether an owner (:class:`~pytest_gpushare.ledger.records.Owner`) still lives, and what it holds.

Each owning process holds an exclusive ``flock`` on its own liveness file
(``live-<key>.lock``) for as long as it lives. The kernel drops the lock when the process dies,
however it dies (SIGKILL included), so "can the lock be taken?" answers "is the owner dead?"
without guessing from PIDs: it survives PID reuse and PID namespaces (containers sharing the
folder), where a PID names another process or none.

Probes take a *shared* lock without waiting: two processes probing one dead owner at the same
moment both see it dead, and a live owner's exclusive lock refuses both. The file is locked
before it gets its final name, so a probe never finds it unlocked while its owner starts.

The file's content is the owner's *holdings* (what it holds on every GPU, see
:mod:`.records`): the source of truth from which a damaged ledger is rebuilt. Only its owner
writes it, in place (no new inode per change: creating and renaming files is what costs on a
journalling filesystem), framed with its length and a CRC so that a reader that catches a write
half-way reads again, and one that cannot get a whole copy treats the holdings as unknown
(:func:`pytest_gpushare.ledger.codec.frame`).

Raw ``fcntl.flock`` rather than filelock: this lock lives as long as the process and is probed
from outside without waiting (:func:`pytest_gpushare.ledger.locks.try_flock`), which filelock's
acquire/release cycle does not model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import stat
import threading
import time

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.codec import HOLDINGS_FRAME, BadFrame, frame, unframe
from pytest_gpushare.ledger.folder import MAX_FILE_BYTES, LedgerFolder, open_nofollow, remove_file
from pytest_gpushare.ledger.locks import try_flock
from pytest_gpushare.ledger.records import Owner

__all__ = [
    "HoldingsUnreadable",
    "Liveness",
    "live_name",
    "probe_alive",
    "read_holdings",
    "remove_owner_files",
]

#: A reader that catches the owner mid-write tries again this many times before giving up.
_READ_TRIES = 20


def live_name(key: str) -> str:
    return f"live-{key}.lock"


class HoldingsUnreadable(Exception):
    """An owner's holdings could not be read whole; ``str()`` says why."""


class Liveness:
    """This process's liveness lock for one owner in one folder, held until :meth:`close`,
    carrying the owner's holdings (``payload``)."""

    def __init__(self, folder: LedgerFolder, owner: Owner, payload: bytes) -> None:
        self.folder = folder
        self.key = owner.key
        self._payload = payload
        self._slot = (str(folder.path), owner.key)
        with _REGISTRY_GUARD:
            if self._slot in _REGISTRY:
                raise LedgerError(
                    f"this process already has a ledger open for owner {owner.key} in {folder.path}; reuse it"
                )
            self._fd: int | None = self._create()
            _REGISTRY[self._slot] = self

    def _create(self) -> int:
        tmp = self.folder.path / f".tmp-{self.key}-live"
        try:
            fd = open_nofollow(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.folder.file_mode)
        except OSError as exc:
            raise LedgerError(
                f"cannot create a liveness file in {self.folder.path}: {exc.strerror}"
            ) from None
        try:
            if self.folder.shared:
                os.fchmod(fd, self.folder.file_mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, frame(HOLDINGS_FRAME, self._payload), 0)
            os.replace(tmp, self.folder.path / live_name(self.key))
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LedgerError(f"cannot hold a liveness lock in {self.folder.path}: {exc.strerror}") from None
        return fd

    def write(self, payload: bytes) -> None:
        """Replace the holdings in place. The file never shrinks: the frame says where they end."""
        if self._fd is None:
            raise LedgerError(f"the liveness lock of owner {self.key} was closed")
        data = frame(HOLDINGS_FRAME, payload)
        if len(data) > MAX_FILE_BYTES:
            raise LedgerError(f"the holdings of owner {self.key} would grow past the ledger size cap")
        try:
            os.pwrite(self._fd, data, 0)
        except OSError as exc:
            raise LedgerError(f"cannot write the holdings of owner {self.key}: {exc.strerror}") from None
        self._payload = payload

    def ensure(self) -> bool:
        """Recreate the liveness file if someone removed it (a temp cleaner, a person); True if so.

        Without it, every other process would take this live owner for dead.
        """
        if self._fd is None:
            raise LedgerError(f"the liveness lock of owner {self.key} was closed")
        if os.fstat(self._fd).st_nlink > 0:
            return False
        with _REGISTRY_GUARD:
            old, self._fd = self._fd, self._create()
            os.close(old)
        return True

    def close(self) -> None:
        """Give the lock up and remove the owner's files."""
        with _REGISTRY_GUARD:
            if self._fd is None:
                return
            remove_owner_files(self.folder, self.key, names=())
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


#: Descriptors of other owners' liveness files, kept open between probes (a probe is then an
#: fstat and a flock instead of four system calls); dropped when the owner is found dead, when
#: its file was unlinked, and all at once past :data:`_PROBE_CACHE_MAX`.
_PROBE_FDS: dict[tuple[str, str], int] = {}
_PROBE_GUARD = threading.Lock()
_PROBE_CACHE_MAX = 256


def _drop_probe(slot: tuple[str, str]) -> None:
    fd = _PROBE_FDS.pop(slot, None)
    if fd is not None:
        os.close(fd)


def _probe_fd(folder: LedgerFolder, key: str, slot: tuple[str, str]) -> int | bool:
    """A descriptor of the owner's liveness file, or the verdict when there is nothing to lock."""
    fd = _PROBE_FDS.get(slot)
    if fd is not None:
        if os.fstat(fd).st_nlink > 0:
            return fd
        _drop_probe(slot)  # removed (the owner closed) or recreated: look again
    try:
        fd = open_nofollow(folder.path / live_name(key), os.O_RDONLY)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # another account's file we cannot read: the safe side is "alive"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False  # we never make links: whatever planted it is no live owner
        raise LedgerError(f"cannot check the liveness of owner {key}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return False
    if len(_PROBE_FDS) >= _PROBE_CACHE_MAX:
        for old in list(_PROBE_FDS):
            _drop_probe(old)
    _PROBE_FDS[slot] = fd
    return fd


#: When (``time.monotonic()``) each owner was last found alive, for callers that accept an answer
#: that old (``max_age_s``). Only "alive" is kept: a stale "alive" keeps a dead owner's bookings a
#: little longer (the safe side); a stale "dead" would hand a live owner's memory to someone else.
_ALIVE_AT: dict[tuple[str, str], float] = {}


def probe_alive(folder: LedgerFolder, key: str, max_age_s: float = 0.0) -> bool:
    """Whether the owner ``key`` lives: its liveness lock is held by someone.

    With ``max_age_s``, an owner this process found alive less than that long ago is answered
    alive without probing again.
    """
    slot = (str(folder.path), key)
    if slot in _REGISTRY:
        # Our own owners live by definition. Probing them would also be wrong on filesystems
        # that emulate flock with record locks, which drop when any descriptor closes.
        return True
    with _PROBE_GUARD:
        now = time.monotonic()
        if max_age_s > 0 and now - _ALIVE_AT.get(slot, -math.inf) < max_age_s:
            return True
        alive = _probe(folder, key, slot)
        if alive:
            if len(_ALIVE_AT) >= _PROBE_CACHE_MAX:
                _ALIVE_AT.clear()
            _ALIVE_AT[slot] = now
        else:
            _ALIVE_AT.pop(slot, None)
        return alive


def _probe(folder: LedgerFolder, key: str, slot: tuple[str, str]) -> bool:
    fd = _probe_fd(folder, key, slot)
    if isinstance(fd, bool):
        return fd
    try:
        taken = try_flock(fd, shared=True)
    except OSError as exc:
        _drop_probe(slot)
        raise LedgerError(f"cannot check the liveness of owner {key}: {exc.strerror}") from None
    if not taken:
        return True
    _drop_probe(slot)  # closing our only descriptor also lets go of the shared lock
    return False


def read_holdings(folder: LedgerFolder, key: str) -> bytes | None:
    """The holdings an owner last wrote, or None when its liveness file is gone.

    Raises :class:`HoldingsUnreadable` when no whole copy can be read.
    """
    path = folder.path / live_name(key)
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HoldingsUnreadable(f"cannot open {path.name}: {exc.strerror}") from None
    try:
        try:
            folder.check_file(os.fstat(fd), path)
        except LedgerError as exc:
            raise HoldingsUnreadable(str(exc)) from None
        return _read_whole(fd, path.name)
    finally:
        os.close(fd)


def _read_whole(fd: int, name: str) -> bytes:
    """The holdings in ``fd``, read again while a write of the owner is caught half-way."""
    why = "empty"
    for _ in range(_READ_TRIES):
        try:
            return unframe(HOLDINGS_FRAME, os.pread(fd, MAX_FILE_BYTES + 1, 0))[0]
        except BadFrame as exc:
            why = str(exc)
        time.sleep(0.0002)  # the owner may be writing right now
    raise HoldingsUnreadable(f"{name}: {why}")


def remove_owner_files(
    folder: LedgerFolder, key: str, names: tuple[str, ...] | list[str] | None = None
) -> None:
    """Remove a gone owner's liveness file and half-written temporary files.

    ``names`` is a listing of the folder to search for temporary files (None lists it; an empty
    sequence skips them).
    """
    remove_file(folder, live_name(key))
    listing = os.listdir(folder.path) if names is None else names
    prefix = f".tmp-{key}-"
    for name in listing:
        if name.startswith(prefix):
            remove_file(folder, name)


def _forget_in_child() -> None:
    global _REGISTRY_GUARD, _PROBE_GUARD
    for live in _REGISTRY.values():
        live._forget_in_child()
    _REGISTRY.clear()
    _REGISTRY_GUARD = threading.RLock()
    for fd in _PROBE_FDS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _PROBE_FDS.clear()
    _ALIVE_AT.clear()
    _PROBE_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
