"""Whether another owner lives, and what it holds: probing its liveness lock, reading its holdings.

An owner (:class:`~pytest_gpushare.ledger.records.Owner`) holds an exclusive ``flock`` on its
``live-<key>.lock`` for its whole life (:mod:`.liveness`). A probe takes a *shared* lock without
waiting: refused means a live holder; granted means nobody holds it, the owner is gone. Two
processes probing one dead owner at the same moment both see it dead, and a live owner's
exclusive lock refuses both. The answer is a :class:`Verdict` with three states:

* ``alive``: the lock is held;
* ``dead``: the file is there and nobody holds its lock (or a symbolic link stands in its place:
  we never make links, so whatever planted it is no live owner); or the file was renamed to its
  tombstone (``gone-<key>.lock``) by a process that found it dead before, which lets every other
  ledger that still lists the owner reclaim it at once;
* ``unverifiable``: there is nothing to lock, or we may not open it: the file is missing, cannot
  be opened (a mode-000 file planted in a group folder), or junk stands in its place. A missing
  file is **not** evidence of death: a temp cleaner or a person may have removed the file of a
  live owner, which puts it back within :data:`pytest_gpushare.ledger.liveness.WATCH_S`
  (issue 15). Nor is it evidence of life, or anyone could keep memory booked for ever by writing
  a booking for an owner without a file. So the caller trusts an unverifiable owner for a bounded
  time from when this process first saw it so (:func:`unverified_since`), then takes it for dead.

Descriptors of other owners' liveness files are kept open between probes (a probe is then an
``fstat`` and a ``flock`` instead of four system calls), at most :data:`KEEP_MAX` of them, least
recently used first out, and all of them given back when the process runs out of descriptors.

Holdings are read whole or not at all (framed with a CRC: a reader that catches the owner
mid-write reads again), and parsed once per generation (:func:`holdings_of`): a reader that has
seen this header line already reuses what it parsed.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.codec import HOLDINGS_FRAME, BadFrame, Damaged, parse_holdings, unframe
from pytest_gpushare.ledger.files import MAX_FILE_BYTES, on_descriptor_shortage, open_at, remove_file
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.liveness import gone_name, is_own, live_name
from pytest_gpushare.ledger.locks import try_flock
from pytest_gpushare.ledger.records import Holdings

__all__ = [
    "ALIVE",
    "DEAD",
    "KEEP_MAX",
    "UNVERIFIABLE",
    "Verdict",
    "holdings_of",
    "probe",
    "remove_owner_files",
    "unverified_since",
]

ALIVE = "alive"
DEAD = "dead"
UNVERIFIABLE = "unverifiable"
#: At most this many descriptors of other owners' liveness files are kept open.
KEEP_MAX = 32
#: A reader that catches the owner mid-write tries again this many times before giving up.
_READ_TRIES = 20
#: How much of a holdings file tells its versions apart: its header line.
_HEAD_BYTES = 64


@dataclass(frozen=True)
class Verdict:
    """What a probe found: ``state`` (:data:`ALIVE`, :data:`DEAD`, :data:`UNVERIFIABLE`), and for
    an unverifiable owner ``why``; ``junk`` says what stood in the liveness file's place (a
    directory, a FIFO...), for the caller to set it aside."""

    state: str
    why: str = ""
    junk: str | None = None


_ALIVE = Verdict(ALIVE)
_DEAD = Verdict(DEAD)
_MISSING = Verdict(UNVERIFIABLE, "its liveness file is missing")

# Reentrant: an open that runs out of descriptors closes the kept ones under it (_drop_all).
_GUARD = threading.RLock()
#: (folder, key) -> a descriptor of that owner's liveness file.
_KEPT: OrderedDict[tuple[str, str], int] = OrderedDict()
#: When (``time.monotonic()``) each owner was last found alive, for callers that accept an answer
#: that old. Only "alive" is kept: a stale "alive" keeps a dead owner's bookings a little longer
#: (the safe side); a stale "dead" would hand a live owner's memory to someone else.
_ALIVE_AT: dict[tuple[str, str], float] = {}
#: When this process first found each owner unverifiable (cleared once it is verified).
_UNVERIFIED: dict[tuple[str, str], float] = {}
#: (folder, key) -> the header line of the holdings last parsed, and what they said.
_HOLDINGS: dict[tuple[str, str], tuple[bytes, Holdings]] = {}


def probe(folder: LedgerFolder, key: str, max_age_s: float = 0.0) -> Verdict:
    """Whether the owner ``key`` lives (see the module docstring). With ``max_age_s``, an owner
    this process found alive less than that long ago is answered alive without probing again."""
    slot = (folder.dir, key)
    if is_own(folder, key):
        # Our own owners live by definition. Probing them would also be wrong on filesystems
        # that emulate flock with record locks, which drop when any descriptor closes.
        return _ALIVE
    with _GUARD:
        now = time.monotonic()
        if max_age_s > 0 and now - _ALIVE_AT.get(slot, -math.inf) < max_age_s:
            return _ALIVE
        verdict = _probe(folder, key, slot)
        if verdict.state == ALIVE:
            if len(_ALIVE_AT) >= 4 * KEEP_MAX:
                _ALIVE_AT.clear()
            _ALIVE_AT[slot] = now
        else:
            _ALIVE_AT.pop(slot, None)
        if verdict.state == UNVERIFIABLE:
            _UNVERIFIED.setdefault(slot, now)
        else:
            _UNVERIFIED.pop(slot, None)
        return verdict


def unverified_since(folder: LedgerFolder, key: str) -> float:
    """When (``time.monotonic()``) this process first found ``key`` unverifiable, or now."""
    return _UNVERIFIED.get((folder.dir, key), time.monotonic())


def _probe(folder: LedgerFolder, key: str, slot: tuple[str, str]) -> Verdict:
    found = _kept_fd(folder, key, slot)
    if isinstance(found, Verdict):
        return found
    try:
        taken = try_flock(found, shared=True)
    except OSError as exc:
        _drop(slot)
        raise LedgerError(f"cannot check the liveness of owner {key}: {exc.strerror}") from None
    if not taken:
        return _ALIVE
    _drop(slot)  # closing our only descriptor also lets go of the shared lock
    return _DEAD


def _kept_fd(folder: LedgerFolder, key: str, slot: tuple[str, str]) -> int | Verdict:
    """A descriptor of the owner's liveness file (kept, or opened and kept), or the verdict when
    there is no file to lock. The caller holds ``_GUARD``."""
    fd = _KEPT.get(slot)
    if fd is not None:
        if os.fstat(fd).st_nlink > 0:
            _KEPT.move_to_end(slot)
            return fd
        _drop(slot)  # removed (the owner closed) or recreated: look again
    try:
        fd = open_at(folder, live_name(key), os.O_RDONLY)
    except FileNotFoundError:
        return _DEAD if _exists(folder, gone_name(key)) else _MISSING
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _DEAD
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Verdict(UNVERIFIABLE, f"its liveness file cannot be opened: {exc.strerror}")
        raise LedgerError(f"cannot check the liveness of owner {key}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = folder.untrusted(os.lstat(live_name(key), dir_fd=folder.fd)) or "not a regular file"
        return Verdict(UNVERIFIABLE, f"its liveness file was {what}", junk=what)
    while len(_KEPT) >= KEEP_MAX:
        _drop(next(iter(_KEPT)))
    _KEPT[slot] = fd
    return fd


def _exists(folder: LedgerFolder, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=folder.fd)
    except OSError:
        return False
    return True


def _drop(slot: tuple[str, str]) -> None:
    fd = _KEPT.pop(slot, None)
    if fd is not None:
        os.close(fd)


def _drop_all() -> None:
    with _GUARD:
        for slot in list(_KEPT):
            _drop(slot)


on_descriptor_shortage(_drop_all)


# --- holdings -----------------------------------------------------------------------------------


class HoldingsUnreadable(Exception):
    """An owner's holdings could not be read whole; ``str()`` says why."""


def holdings_of(folder: LedgerFolder, key: str) -> Holdings | None:
    """What a live owner holds, as its liveness file says; None when the file is gone. Raises
    :class:`~pytest_gpushare.ledger.codec.Damaged` when no whole, trusted copy can be read.

    Parsed once per version of the file (its header line names the generation and CRC): an
    access that finds the same header as last time reuses what it parsed.
    """
    slot = (folder.dir, key)
    with _GUARD:
        found = _kept_fd(folder, key, slot)
        if isinstance(found, Verdict):
            if found is _MISSING:
                return None
            raise Damaged(found.why or "its liveness file is a symbolic link")
        why = folder.untrusted(os.fstat(found))
        if why is not None:
            raise Damaged(f"{live_name(key)} is {why}")
        head = os.pread(found, _HEAD_BYTES, 0)
        seen = _HOLDINGS.get(slot)
        if seen is not None and seen[0] == head:
            return seen[1]
        try:
            data = _read_whole(found, live_name(key))
        except HoldingsUnreadable as exc:
            raise Damaged(str(exc)) from None
    holdings = parse_holdings(data, key)
    with _GUARD:
        if len(_HOLDINGS) >= 4 * KEEP_MAX:
            _HOLDINGS.clear()
        _HOLDINGS[slot] = (head, holdings)
    return holdings


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


def read_holdings(folder: LedgerFolder, key: str) -> bytes | None:
    """The holdings an owner last wrote, unparsed, or None when its liveness file is gone.
    Raises :class:`HoldingsUnreadable` when no whole copy can be read."""
    try:
        fd = open_at(folder, live_name(key), os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HoldingsUnreadable(f"cannot open {live_name(key)}: {exc.strerror}") from None
    try:
        why = folder.untrusted(os.fstat(fd))
        if why is not None:
            raise HoldingsUnreadable(f"{live_name(key)} is {why}")
        return _read_whole(fd, live_name(key))
    finally:
        os.close(fd)


def remove_owner_files(folder: LedgerFolder, key: str, names: list[str] | tuple[str, ...]) -> None:
    """Turn a dead owner's liveness file into its tombstone, and remove its half-written
    temporary files (``names``: a listing of the folder)."""
    with contextlib.suppress(OSError):
        os.replace(live_name(key), gone_name(key), src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    prefix = f".tmp-{key}-"
    for name in names:
        if name.startswith(prefix):
            remove_file(folder, name)
    with _GUARD:
        _HOLDINGS.pop((folder.dir, key), None)
        _UNVERIFIED.pop((folder.dir, key), None)


def _forget_in_child() -> None:
    global _GUARD
    for fd in _KEPT.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _KEPT.clear()
    _ALIVE_AT.clear()
    _UNVERIFIED.clear()
    _HOLDINGS.clear()
    _GUARD = threading.RLock()


os.register_at_fork(after_in_child=_forget_in_child)
