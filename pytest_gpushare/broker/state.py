"""The broker's state of each connected worker and each waiting request (the engine's, on the
serving thread only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_gpushare.broker.pool import Ask
from pytest_gpushare.broker.slot import SlotReader
from pytest_gpushare.broker.status import RunningLease
from pytest_gpushare.ledger import Lease

__all__ = ["Growth", "Pending", "Worker"]


@dataclass
class Worker:
    conn: int
    worker_id: str
    contexts: set[str] = field(default_factory=set)  # GPUs where its context is booked in the box
    pool_leases: dict[str, RunningLease] = field(default_factory=dict)
    direct_leases: dict[str, tuple[Lease, RunningLease]] = field(default_factory=dict)
    requests: dict[int, Pending] = field(default_factory=dict)
    recalled: set[str] = field(default_factory=set)  # pool leases asked back
    slot: SlotReader | None = None  # where it writes which test holds its carried lease
    fds: list[int] = field(default_factory=list)  # liveness descriptors still to hand over


@dataclass(eq=False)
class Pending:
    worker: Worker
    request: int
    ask: Ask
    candidates: list[str]
    start: float
    deadline: float
    direct: bool
    job: bool = False  # a growth or pass-through is under way in the box


@dataclass(eq=False)
class Growth:
    """A growth of the pool under way in the box: ``size`` bytes on one of ``uuids``, asked for
    at ``asked_at`` for ``ask`` (None once its request is gone: the growth goes on, an orphan)."""

    ticket: str
    uuids: list[str]
    size: int
    asked_at: float
    ask: Ask | None
