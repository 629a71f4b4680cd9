"""What a process sees of the ledgers without their locks: that one was written, and whether
another session waits on a GPU.

* **A write.** Every write of a ledger renames a new file over it (:func:`.files.write_file`).
  A request that waits sleeps on an inotify descriptor of the folder (:class:`Changes`) that
  such a rename wakes, so it tries again as soon as a ledger it waits on was written, instead of
  finding out at its next poll (up to ``BACKOFF_MAX_S`` later, issue 13 row 4). The descriptor
  is watching before the request's last try before it sleeps, so no write after that try is
  missed. Where inotify cannot be had (another kernel, the account's ``max_user_instances``
  spent) the request polls as before: :meth:`Changes.open` answers None. A ledger keeps its
  watches for its next waits (:class:`Watches`): closing one costs the kernel tens of
  milliseconds (it waits for an RCU grace period), which a request served after a wait would
  otherwise spend before it returns (issue 13, row 4). A write wakes every request waiting on
  the GPU; each reads the ledgers whole without the lock (:func:`read_states`) and takes the
  lock only when they could serve it now, so that a queue of passes that cannot succeed does
  not form behind the lock, ahead of the writer's next pass.
* **Another session waits.** A ledger's head names the sessions that wait on its GPU
  (:func:`.codec.waiting_in_head`); :class:`WaitingLook` reads those first bytes, and the whole
  file only when it was written by an older version, once per version of the file. A waiter
  killed with SIGKILL stays named until any process's next locked pass over the ledger drops it
  with its dead owner (:meth:`.access.Access.reclaim`): the broker that reads it gives its spare
  memory back (such a pass) and reads it no more.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.access import ledger_name
from pytest_gpushare.ledger.codec import (
    WAITING_HEAD_BYTES,
    Damaged,
    parse_gpu_state,
    session_tag,
    waiting_in_head,
    waiting_sessions,
)
from pytest_gpushare.ledger.files import FileTooLarge, Unusable, read_file, read_head
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.records import GpuState

__all__ = ["BACKOFF_MAX_S", "BACKOFF_MIN_S", "Changes", "Sleeper", "WaitingLook", "Watches", "read_states"]

#: Where the folder cannot be watched, a waiter looks again after this long, doubling up to
#: :data:`BACKOFF_MAX_S`.
BACKOFF_MIN_S = 0.001
BACKOFF_MAX_S = 0.025

_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library's inotify calls, or None where there are none."""
    try:
        # The symbols the process has loaded, the C library's among them: find_library("c")
        # would start ldconfig, tens of milliseconds on a loaded box, on a request's first wait.
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "inotify_init1") and hasattr(libc, "inotify_add_watch") else None
    except OSError:
        return None


class Changes:
    """An inotify descriptor on the folder that wakes :meth:`wait` when a file is renamed into
    it (a ledger written); see the module docstring. :meth:`close` gives it back."""

    def __init__(self, fd: int, folder: LedgerFolder) -> None:
        self._fd = fd
        self.folder = folder
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(cls, folder: LedgerFolder) -> Changes | None:
        """A watch on ``folder``, or None where inotify cannot be had."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None  # EMFILE: the account's inotify instances are spent; poll instead
        # The folder as held open, not its path: a folder put in its place is not ours.
        if libc.inotify_add_watch(fd, f"/proc/self/fd/{folder.fd}".encode(), _IN_MOVED_TO) < 0:
            os.close(fd)
            return None
        return cls(fd, folder)

    def wait(self, timeout: float, names: Collection[str]) -> bool:
        """Sleep up to ``timeout`` seconds, until one of ``names`` is written; whether one was
        (or events were lost, which may hide one)."""
        if not self._poll.poll(max(0, round(timeout * 1000))):
            return False
        return self._drain(names)

    def _drain(self, names: Collection[str]) -> bool:
        wanted = {n.encode() for n in names}
        hit = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return hit
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return True
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                hit = hit or name in wanted or bool(mask & _IN_Q_OVERFLOW)

    def clear(self) -> None:
        """Forget the writes seen so far."""
        self._drain(())

    def close(self) -> None:
        os.close(self._fd)


class Watches:
    """A ledger's idle :class:`Changes`, kept for its next waits (see the module docstring);
    each wait takes one of its own (a watch wakes one reader). Thread-safe."""

    def __init__(self) -> None:
        self._idle: list[Changes] = []
        self._lock = threading.Lock()

    def take(self, folder: LedgerFolder) -> Changes | None:
        """A watch on ``folder`` with no write seen yet, or None where there can be none."""
        with self._lock:
            kept = self._idle.pop() if self._idle else None
        if kept is not None and kept.folder is folder:
            kept.clear()
            return kept
        if kept is not None:
            kept.close()  # on a folder that was made again since
        return Changes.open(folder)

    def put(self, changes: Changes) -> None:
        with self._lock:
            self._idle.append(changes)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for changes in idle:
            changes.close()


class Sleeper:
    """How a request sleeps between its tries, on the ledgers of the GPUs ``uuids`` in the folder
    that ``current`` gives (the folder as it is now, should it have been made again): woken by a
    write where the folder can be watched (:attr:`watched`, a watch taken from ``watches``),
    else polling their header lines with back-off. :meth:`close` gives the watch back."""

    def __init__(self, uuids: Sequence[str], current: Callable[[], LedgerFolder], watches: Watches) -> None:
        self._names = [ledger_name(u) for u in uuids]
        self._current = current
        self._watches = watches
        self._changes = watches.take(current())
        self._delay = BACKOFF_MIN_S
        self._seen: tuple[bytes | None, ...] = ()

    @property
    def watched(self) -> bool:
        return self._changes is not None

    def mark(self) -> None:
        """Remember the files' versions now: a later write is what :meth:`sleep` waits for."""
        if self._changes is None:
            self._seen = self._signature()

    def sleep(self, most: float) -> bool:
        """Up to ``most`` seconds, until one of the files is written (the back-off's sleep only
        where the folder is not watched); whether one was."""
        if self._changes is not None:
            return self._changes.wait(most, self._names)
        time.sleep(min(self._delay, most))
        self._delay = min(self._delay * 2, BACKOFF_MAX_S)
        return self._signature() != self._seen

    def _signature(self) -> tuple[bytes | None, ...]:
        """What tells the files' versions apart: their header lines, whose generation and
        checksum change with every write (a rebuilt file starts over, with another checksum)."""
        folder = self._current()
        return tuple(read_head(folder, name) for name in self._names)

    def close(self) -> None:
        if self._changes is not None:
            self._watches.put(self._changes)
            self._changes = None


def read_states(folder: LedgerFolder, uuids: Sequence[str]) -> dict[str, GpuState] | None:
    """The ledgers of ``uuids`` as they are now, read without their locks (each whole: files are
    replaced, never written in place); None when one is missing or cannot be read."""
    states = {}
    for uuid in uuids:
        try:
            data = read_file(folder, ledger_name(uuid))
            if data is None:
                return None
            states[uuid] = parse_gpu_state(data, uuid)
        except (Damaged, FileTooLarge, Unusable, LedgerError):
            return None
    return states


class WaitingLook:
    """Whether a session other than ``session_id`` waits on a GPU, read without the lock; see
    the module docstring."""

    def __init__(self, session_id: str) -> None:
        self._tag = session_tag(session_id)
        self._seen: dict[str, tuple[bytes, bool]] = {}  # uuid -> (header line, answer)

    def others_wait(self, folder: LedgerFolder, uuid: str) -> bool:
        name = ledger_name(uuid)
        head = read_head(folder, name, WAITING_HEAD_BYTES)
        if not head:
            return False
        line = head.partition(b"\n")[0]
        seen = self._seen.get(uuid)
        if seen is not None and seen[0] == line:
            return seen[1]  # the same version of the file (its generation and checksum)
        tags = waiting_in_head(head)
        if tags is None:
            tags = self._read_whole(folder, name, uuid)
        answer = any(t != self._tag for t in tags)
        self._seen[uuid] = (line, answer)
        return answer

    @staticmethod
    def _read_whole(folder: LedgerFolder, name: str, uuid: str) -> list[str]:
        """The waiting sessions of a ledger that an older version wrote; none when it cannot be
        read (the next locked pass repairs it)."""
        states = read_states(folder, [uuid])
        return [] if states is None else waiting_sessions(states[uuid])
