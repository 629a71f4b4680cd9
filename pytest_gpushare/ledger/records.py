"""What the ledger files record: owners, bookings, waiters, one GPU's ledger, one owner's holdings;
and the lease a process is granted.

A ledger (``gpu-<uuid>.json``) lists, for one GPU, the owners that use it with the usable memory
each one's session computed, the bookings (test leases, CUDA contexts) and the waiters. An
owner's holdings (the content of its liveness file, :mod:`.liveness`) list what it holds on every
GPU: they are the source of truth from which a damaged ledger is rebuilt.

Plain values, no I/O (:meth:`Owner.current` alone asks the system about the calling process);
:mod:`.codec` turns them into bytes and back.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CONTEXT",
    "KEY_RE",
    "TEST",
    "UNKNOWN",
    "Booking",
    "GpuState",
    "Holdings",
    "Lease",
    "Owner",
    "Waiter",
]

TEST = "test"
CONTEXT = "context"
#: Stands for what a live owner holds when its holdings file could not be read during a rebuild:
#: the whole GPU, until that owner rewrites its bookings itself.
UNKNOWN = "unknown"
KINDS = (TEST, CONTEXT, UNKNOWN)
#: An owner's key: its pid, then a random token (see :class:`Owner`).
KEY_RE = re.compile(r"^[0-9]{1,10}-[0-9a-f]{8,64}$")
#: How many history entries a ledger keeps.
HISTORY_KEEP = 20


def _process_start_time() -> str:
    """This boot's id and the process's start time in clock ticks (``/proc/self/stat`` field 22)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 of the file (the state), so field 22 is fields[19].
        return f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return "unknown"


@dataclass(frozen=True)
class Owner:
    """One process that takes leases, as it opens its ledger and as the ledgers record it.

    ``key`` (``<pid>-<token>``, :data:`KEY_RE`) makes the owner unique among all processes that
    ever used the folder (PIDs are reused, and repeat across PID namespaces) and names its files.
    ``worker_id`` is ``"controller"``, ``"gw0"``..., ``"main"`` without xdist, or
    ``"gpushare-run"``; ``command`` is the command line that ``gpushare run`` holds a lease for.
    A ledger also records ``usable_bytes``, what the owner's session may use on its GPU, and
    ``joined_at``, when the owner opened its ledger.
    """

    key: str
    pid: int
    host: str
    start_time: str
    session_id: str
    worker_id: str
    command: str | None = None
    usable_bytes: int | None = None
    joined_at: float = 0.0

    @classmethod
    def current(cls, session_id: str, worker_id: str, command: str | None = None) -> Owner:
        """The owner record of the calling process, with a fresh key."""
        pid = os.getpid()
        return cls(
            key=f"{pid}-{secrets.token_hex(8)}",
            pid=pid,
            host=socket.gethostname(),
            start_time=_process_start_time(),
            session_id=session_id,
            worker_id=worker_id,
            command=command,
        )

    def to_row(self) -> list[Any]:
        """The record as the files keep it: its values in the order of its fields."""
        return [
            self.key,
            self.pid,
            self.host,
            self.start_time,
            self.session_id,
            self.worker_id,
            self.command,
            self.usable_bytes,
            self.joined_at,
        ]

    def summary(self) -> dict[str, Any]:
        """What status shows of the owner: every field but ``joined_at``."""
        return {
            "key": self.key,
            "pid": self.pid,
            "host": self.host,
            "start_time": self.start_time,
            "session_id": self.session_id,
            "worker_id": self.worker_id,
            "command": self.command,
            "usable_bytes": self.usable_bytes,
        }

    def describe(self) -> str:
        where = f"pid {self.pid} on {self.host}, session {self.session_id}, worker {self.worker_id}"
        return where if self.command is None else f"{where}, command {self.command!r}"


@dataclass(frozen=True)
class Booking:
    """Memory booked on one GPU: a test's lease (one part of it) or a process's CUDA context."""

    lease_id: str
    owner: str
    test_id: str
    bytes: int
    kind: str
    taken_at: float

    def to_row(self) -> list[Any]:
        return [self.lease_id, self.owner, self.test_id, self.bytes, self.kind, self.taken_at]


@dataclass(frozen=True)
class Waiter:
    """A request that waits for memory on this GPU.

    ``bytes`` is what it needs here, ``context_bytes`` the context it would book here first.
    """

    ticket: str
    owner: str
    test_id: str
    bytes: int
    context_bytes: int
    count: int
    exclusive: bool
    since: float

    def to_row(self) -> list[Any]:
        return [
            self.ticket,
            self.owner,
            self.test_id,
            self.bytes,
            self.context_bytes,
            self.count,
            self.exclusive,
            self.since,
        ]


@dataclass
class GpuState:
    """One GPU's ledger; ``generation`` counts its writes (it is in the file's header line).

    ``grace_until`` (wall clock, 0: none) ends the grace period of a ledger that was made anew
    while a live owner may have lost its liveness file: until then it admits only the restores
    of live owners, no new grant (:mod:`.admission`).
    """

    uuid: str
    name: str = ""
    total_bytes: int = 0
    owners: dict[str, Owner] = field(default_factory=dict)
    bookings: list[Booking] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    generation: int = 0
    grace_until: float = 0.0

    def limit(self) -> int | None:
        """The admission limit: the least usable memory any live owner's session computed."""
        values = [o.usable_bytes for o in self.owners.values() if o.usable_bytes is not None]
        return min(values) if values else None

    def booked(self) -> int:
        return sum(b.bytes for b in self.bookings)

    def has_context(self, key: str) -> bool:
        return any(b.owner == key and b.kind == CONTEXT for b in self.bookings)

    def add_waiter(self, waiter: Waiter) -> bool:
        """Record ``waiter``, in place of an older record of its ticket; whether that changed anything."""
        if waiter in self.waiters:
            return False
        self.waiters = [w for w in self.waiters if w.ticket != waiter.ticket] + [waiter]
        return True

    def remember(self, at: float, event: str, text: str) -> None:
        self.history.append({"at": at, "event": event, "text": text})
        del self.history[:-HISTORY_KEEP]


@dataclass
class Holdings:
    """What one owner holds: its record, its usable memory per GPU, its bookings per GPU."""

    owner: Owner
    usable: dict[str, int]
    bookings: dict[str, list[Booking]]
    _records: dict[str, Owner] = field(default_factory=dict, repr=False, compare=False)

    def record_on(self, uuid: str) -> Owner:
        """The owner as the ledger of GPU ``uuid`` records it: with its usable memory there.
        Made once per GPU (holdings are parsed once and read at every access)."""
        record = self._records.get(uuid)
        if record is None:
            record = self._records[uuid] = replace(self.owner, usable_bytes=self.usable.get(uuid))
        return record


@dataclass(frozen=True)
class Lease:
    """Granted memory: ``parts`` are ``(gpu uuid, bytes)`` in the order the holder should use them."""

    lease_id: str
    test_id: str
    owner: Owner
    parts: tuple[tuple[str, int], ...]
    taken_at: float
    waited_s: float
    exclusive: bool = False
