"""This process's part of the session: the ledger it opened and the leases it holds.

One :class:`Runtime` per process (an xdist worker, or the single pytest process) takes a
:class:`GpuNeed` from the ledger and hands back a :class:`Grant`: the ledger's lease, the
per-device :class:`GpuLease` views the ``gpu``/``gpus`` fixtures and :func:`lease` give, and
the :class:`LeaseRecord` the summary and the JSON report show. When a test's lease is taken
and given back is testhooks.py's business.

The runtime is shared by every thread of the process (a fixture may call ``lease()`` from
several threads at once): its ledger, and so the process's one ledger owner, is opened under
a lock. A test is only ever placed on a device this process can see (:attr:`Runtime.visible`):
a worker whose home is a MIG instance sees that instance alone, other processes their whole
GPUs (CUDA shows a process at most one MIG instance).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import pytest

from pytest_gpushare import hookcalls
from pytest_gpushare import ledger as ledgers  # the facade: its modules load on first use
from pytest_gpushare.credits import nvml_refresh
from pytest_gpushare.errors import LedgerError, SettingError
from pytest_gpushare.gpus.visible import cuda_ordinal, one_process_view
from pytest_gpushare.units import MemRequest, parse_mem

if TYPE_CHECKING:
    from pytest_gpushare.broker import BrokerInput
    from pytest_gpushare.carrying import CarriedLease
    from pytest_gpushare.ledger import Lease, Need
    from pytest_gpushare.planner import Plan

__all__ = ["GpuLease", "GpuLeases", "GpuNeed", "Grant", "LeaseRecord", "Runtime", "need_from_marker"]

_KNOWN_KWARGS = ("mem", "count", "exclusive")


class Lessor(Protocol):
    """Where this process's leases come from: the box :class:`Ledger`, or in an xdist worker
    the session's broker (:class:`pytest_gpushare.broker.BrokerClient`), which lease alike."""

    def acquire(self, need: Need, test_id: str, timeout: float) -> Lease: ...
    def release(self, lease: Lease) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class GpuLease:
    """The memory a test (or a :func:`lease` block) holds on one device.

    ``device`` is ``"cuda:N"`` as this process numbers its CUDA devices, or ``"cpu"`` on CPU
    fallback and on simulated GPUs (which have no CUDA device behind them; ``simulated`` says
    so, and the memory is still leased in the ledger).
    """

    device: str
    index: int | None
    uuid: str | None
    name: str
    mem: int
    total: int
    is_cpu: bool
    simulated: bool = False

    @classmethod
    def cpu(cls) -> GpuLease:
        return cls(device="cpu", index=None, uuid=None, name="cpu", mem=0, total=0, is_cpu=True)


class GpuLeases:
    """What :func:`pytest_gpushare.lease` yields: the :class:`GpuLease` of each device, in
    order, like the ``gpus`` fixture (``gpus[0]``, ``len(gpus)``, ``for g in gpus``,
    ``(gpu,) = gpus``), that also answers :class:`GpuLease`'s attributes with its first
    device's, like the ``gpu`` fixture: ``with lease(mem="2GiB") as gpu: gpu.device``.

    Not a ``list``: a list's ``index()`` method would hide the device's ``index``.
    """

    def __init__(self, gpus: Sequence[GpuLease]) -> None:
        if not gpus:
            raise ValueError("a lease holds at least one device")
        self._gpus = tuple(gpus)

    @overload
    def __getitem__(self, i: int) -> GpuLease: ...
    @overload
    def __getitem__(self, i: slice) -> list[GpuLease]: ...
    def __getitem__(self, i: int | slice) -> GpuLease | list[GpuLease]:
        return list(self._gpus[i]) if isinstance(i, slice) else self._gpus[i]

    def __len__(self) -> int:
        return len(self._gpus)

    def __iter__(self) -> Iterator[GpuLease]:
        return iter(self._gpus)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GpuLeases):
            return self._gpus == other._gpus
        return isinstance(other, (list, tuple)) and self._gpus == tuple(other)

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"GpuLeases({list(self._gpus)!r})"

    # The first device's attributes, as the ``gpu`` fixture gives them.

    @property
    def device(self) -> str:
        return self._gpus[0].device

    @property
    def index(self) -> int | None:
        return self._gpus[0].index

    @property
    def uuid(self) -> str | None:
        return self._gpus[0].uuid

    @property
    def name(self) -> str:
        return self._gpus[0].name

    @property
    def mem(self) -> int:
        return self._gpus[0].mem

    @property
    def total(self) -> int:
        return self._gpus[0].total

    @property
    def is_cpu(self) -> bool:
        return self._gpus[0].is_cpu

    @property
    def simulated(self) -> bool:
        return self._gpus[0].simulated


@dataclass(frozen=True)
class GpuNeed:
    """What a test asked for, validated."""

    mem: MemRequest
    count: int = 1
    exclusive: bool = False

    def describe(self) -> str:
        text = self.mem.describe() if not self.exclusive else "exclusive use"
        return f"{text} on {self.count} GPUs" if self.count > 1 else text


def need_from_marker(
    args: Sequence[Any], kwargs: dict[str, Any], default_mem: MemRequest, source: str
) -> GpuNeed:
    """Validate ``@pytest.mark.gpu(...)`` or ``lease(...)`` arguments; a bad one is a SettingError
    whose message starts with ``source`` (``the marker on tests/test_x.py::test_y``)."""
    unknown = sorted(set(kwargs) - set(_KNOWN_KWARGS))
    if unknown:
        raise SettingError(f"{source}: unknown keyword {unknown[0]!r} (use mem=, count=, exclusive=)")
    if len(args) > 1:
        raise SettingError(f"{source}: takes at most one positional argument (mem), got {len(args)}")
    if args and "mem" in kwargs:
        raise SettingError(f"{source}: mem given twice")
    raw_mem = args[0] if args else kwargs.get("mem")
    mem = default_mem if raw_mem is None else parse_mem(raw_mem, source)
    count = kwargs.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SettingError(f"{source}: count must be an integer >= 1: {count!r}")
    exclusive = kwargs.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise SettingError(f"{source}: exclusive must be True or False: {exclusive!r}")
    return GpuNeed(mem=mem, count=count, exclusive=exclusive)


@dataclass
class LeaseRecord:
    """What the summary and the JSON report know of one lease (JSON-able via ``to_dict``)."""

    test_id: str
    worker: str
    parts: list[tuple[str, int, int]]  # (uuid, index, bytes)
    waited_s: float
    taken_at: float
    released_at: float | None = None
    block: bool = False  # a lease() block, not a test's lease
    carried: bool = False  # the lease of this process's previous test, handed on (waited 0 s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_id": self.test_id,
            "worker": self.worker,
            "gpus": [{"uuid": u, "index": i, "bytes": b} for u, i, b in self.parts],
            "waited_s": round(self.waited_s, 4),
            "taken_at": self.taken_at,
            "released_at": self.released_at,
            "held_s": None if self.released_at is None else round(self.released_at - self.taken_at, 4),
        }


@dataclass
class Grant:
    """A lease in the hands of this process, with the public per-device views."""

    lease: Lease | None
    gpus: list[GpuLease]
    record: LeaseRecord | None
    fallback: str | None = None  # "cpu" when the test ran on CPU for lack of a GPU
    released: bool = False
    need: Need | None = None  # what was asked of the lessor: a next test that asks the same may carry it

    @functools.cached_property
    def observable(self) -> bool:
        """Whether it holds a real GPU, where a test's use can be observed (not only simulated
        GPUs or the CPU)."""
        return any(not g.is_cpu and g.uuid and not g.simulated for g in self.gpus)


@dataclass
class Runtime:
    """This process's part of the session: the plan, the ledger, and what it leased.

    ``ledger_dir`` is the setting (None: the account's own folder) and ``ledger_source`` where
    it came from; ``home`` is the home GPU the controller gave this worker (one the plan does not
    know, inherited from another session's worker, is ignored); ``broker`` is how an xdist worker
    reaches its session's broker (None: lease from the box ledger directly); ``log`` collects one-line notes
    (the ledger's, ignored observer errors, a release that failed) until testhooks.py hands them
    to a report.
    """

    plan: Plan
    session: str
    worker: str
    ledger_dir: str | None
    context_bytes: int
    policy: str
    timeout: float
    home: str | None
    default_mem: MemRequest
    pluginmanager: pytest.PytestPluginManager | None = None  # None: no observer hooks
    ledger_source: str | None = None
    broker: BrokerInput | None = None
    _ledger: Lessor | None = None
    _carried: CarriedLease | None = None  # where the ledger can carry leases: one kept for the next test
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False)
    records: list[LeaseRecord] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    #: What the lessor is asked for each need (:meth:`ledger_need`): asked twice per test, of few needs.
    _asks: dict[tuple[GpuNeed, bool], Need] = field(default_factory=dict, repr=False)
    #: The views of the devices leased so far, by uuid, size and CUDA_VISIBLE_DEVICES (:meth:`_device`).
    _devices: dict[tuple[str, int, str | None], tuple[GpuLease, int]] = field(
        default_factory=dict, repr=False
    )

    @property
    def ledger(self) -> Lessor:
        """This process's one ledger (and ledger owner) or broker connection, opened on first
        use, under a lock: threads that lease at once must not each open their own."""
        if self._ledger is None:
            with self._opening:
                if self._ledger is None:
                    self._ledger = self._open_ledger()
        return self._ledger

    def _open_ledger(self) -> Lessor:
        if self.broker is not None:
            from pytest_gpushare.broker.client import BrokerClient  # only workers of a broker session
            from pytest_gpushare.carrying import CarriedLease

            client = BrokerClient(self.broker, self.worker)
            self._carried = CarriedLease(client, lambda lease: self._give_back(lease, lease.test_id))
            return client
        try:
            folder = ledgers.prepare_ledger_dir(self.ledger_folder())
        except LedgerError as exc:
            where = f" ({self.ledger_source})" if self.ledger_source else ""
            raise LedgerError(f"{exc}{where}") from None
        return ledgers.Ledger(
            folder,
            ledgers.ledger_gpus(self.plan),
            ledgers.Owner.current(self.session, self.worker),
            context_bytes=self.context_bytes,
            policy=self.policy,
            log=self.log.append,
            refresh=nvml_refresh(self.plan, self.ledger_dir),
        )

    @functools.cached_property
    def visible(self) -> tuple[str, ...]:
        """The uuids of the planned devices this process can use, in CUDA's order here: its home
        first when it has one the plan knows, then what one process can see with it."""
        known = {g.gpu.uuid for g in self.plan.gpus}
        home = self.home if self.home in known else None
        order = [g.gpu for g in self.plan.gpus if g.gpu.uuid == home]
        order += [g.gpu for g in self.plan.gpus if g.gpu.uuid != home]
        return tuple(g.uuid for g in one_process_view(order))

    def ledger_folder(self) -> str:
        """The session's ledger folder: the setting, or the account's private default."""
        return str(ledgers.ledger_dir_for(self.ledger_dir))

    def close(self) -> str | None:
        """Close the ledger; what went wrong, in one line, where the folder refused (the
        process's bookings then stay until it ends, when the ledger reclaims them)."""
        ledger, self._ledger = self._ledger, None
        if ledger is None:
            return None
        if self._carried is not None:
            self._carried.forget()  # closing returns it with the rest
        try:
            ledger.close()
        except (LedgerError, OSError) as exc:
            return f"the ledger could not be closed ({exc}); its bookings stay until this process ends"
        return None

    def device_index(self, uuid: str) -> int:
        """``N`` of ``cuda:N`` for ``uuid`` in this process: its place in a ``CUDA_VISIBLE_DEVICES``
        that lists it by UUID, else its place among the devices this process can see."""
        ordinal = cuda_ordinal(uuid, os.environ)
        if ordinal is not None:
            return ordinal
        return self.visible.index(uuid) if uuid in self.visible else self.plan.by_uuid(uuid).gpu.index

    def acquire(self, need: GpuNeed, test_id: str, *, anywhere: bool, block: bool = False) -> Grant:
        """Lease ``need`` for ``test_id``; raises NeverFits or LeaseTimeout.

        ``anywhere``: the test takes ``gpu``/``gpus`` and so learns its device; others stay
        on the home GPU, where their memory really goes. Either way only devices this process
        can see are candidates (:attr:`visible`).
        """
        ledger_need = self.ledger_need(need, anywhere=anywhere)
        carried = None if block or self._carried is None else self._carried.take(ledger_need, test_id)
        lease = carried if carried is not None else self.ledger.acquire(ledger_need, test_id, self.timeout)
        # Recorded times lie inside the real grant (taken after, released before), so an
        # overlap of records is a real overlap: peaks computed from them never overstate.
        taken = time.time()
        gpus: list[GpuLease] = []
        parts: list[tuple[str, int, int]] = []
        for uuid, n_bytes in lease.parts:
            view, plan_index = self._device(uuid, n_bytes)
            gpus.append(view)
            parts.append((uuid, plan_index, n_bytes))
        record = LeaseRecord(
            test_id, self.worker, parts, lease.waited_s, taken, block=block, carried=carried is not None
        )
        self.records.append(record)
        self._notify("pytest_gpushare_lease_acquired", gpus=gpus, test_id=test_id, waited=lease.waited_s)
        return Grant(lease, gpus, record, need=ledger_need)

    def _device(self, uuid: str, n_bytes: int) -> tuple[GpuLease, int]:
        """The view a test gets of ``n_bytes`` leased on ``uuid``, and that GPU's index in the
        plan; made once per device, size and ``CUDA_VISIBLE_DEVICES`` (which decides the ``N``
        of ``cuda:N``: :meth:`device_index`). A :class:`GpuLease` is immutable: tests share it."""
        key = (uuid, n_bytes, os.environ.get("CUDA_VISIBLE_DEVICES"))
        found = self._devices.get(key)
        if found is None:
            g = self.plan.by_uuid(uuid).gpu
            idx = self.device_index(uuid)
            view = GpuLease(
                device="cpu" if g.simulated else f"cuda:{idx}",
                index=idx,
                uuid=uuid,
                name=g.name,
                mem=n_bytes,
                total=g.total_bytes,
                is_cpu=False,
                simulated=g.simulated,
            )
            found = self._devices[key] = (view, g.index)
        return found

    def ledger_need(self, need: GpuNeed, *, anywhere: bool) -> Need:
        """What the lessor is asked for ``need``: a test that does not take ``gpu``/``gpus`` stays
        on the home GPU, where its memory really goes (see :meth:`acquire`)."""
        found = self._asks.get((need, anywhere))
        if found is None:
            prefer = self.visible[0] if self.visible else None
            allowed = self.visible if anywhere or need.count > 1 or prefer is None else (prefer,)
            found = self._asks[need, anywhere] = ledgers.Need(
                mem=need.mem, count=need.count, exclusive=need.exclusive, prefer=prefer, allowed=allowed
            )
        return found

    def drop_carried(self, *, unless: Need | None = None) -> None:
        """Give back a lease kept for a next test that did not take it, unless it was kept for
        ``unless`` (:meth:`CarriedLease.drop`)."""
        if self._carried is not None:
            self._carried.drop(unless)

    def release(self, grant: Grant, *, then: Need | None = None) -> None:
        """Give the lease back. Where the ledger folder refuses (full, read-only), the lease stays
        booked until this process ends (the safe side: nobody is granted memory that may still be
        in use), one line in the log says so, and the test's outcome is left alone.

        ``then``: what this process's next test will ask for (:meth:`ledger_need`). Where it is
        what this lease was granted for and the lessor may carry it (the broker granted it so and
        has not asked for it back), the lease is kept for that test instead of going back; for
        this test it ends here all the same (its record, the released hook)."""
        if grant.released:
            return
        grant.released = True
        if grant.lease is None or grant.record is None:
            return
        grant.record.released_at = time.time()
        if self._carried is None or not self._carried.keep(grant.lease, grant.need, then):
            self._give_back(grant.lease, grant.record.test_id)
        held = grant.record.released_at - grant.record.taken_at
        self._notify(
            "pytest_gpushare_lease_released", gpus=grant.gpus, test_id=grant.record.test_id, held=held
        )

    def _give_back(self, lease: Lease, test_id: str) -> None:
        try:
            self.ledger.release(lease)
        except (LedgerError, OSError) as exc:
            if str(exc) not in self.log:  # a ledger that defers the release says so itself
                self.log.append(
                    f"could not give back the lease of {test_id}: {exc}; "
                    "it stays booked until this process ends"
                )

    def _notify(self, name: str, **kwargs: object) -> None:
        """Call an observer hook; an observer that raises is reported, never fails the test."""
        if self.pluginmanager is not None:
            hookcalls.notify(self.pluginmanager, name, self.log.append, **kwargs)
