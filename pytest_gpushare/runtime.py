"""This process's part of the session: the ledger it opened and the leases it holds.

One :class:`Runtime` per process (an xdist worker, or the single pytest process) takes a
:class:`GpuNeed` from the ledger and hands back a :class:`Grant`: the ledger's lease, the
per-device :class:`GpuLease` views the ``gpu``/``gpus`` fixtures and :func:`lease` give, and
the :class:`LeaseRecord` the summary and the JSON report show. When a test's lease is taken
and given back is testhooks.py's business.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_gpushare import hookcalls
from pytest_gpushare.credits import nvml_refresh
from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.visible import cuda_ordinal
from pytest_gpushare.ledger import Lease, Ledger, Need, Owner, ledger_dir_for, ledger_gpus, prepare_ledger_dir
from pytest_gpushare.planner import Plan
from pytest_gpushare.units import MemRequest, parse_mem

__all__ = ["GpuLease", "GpuNeed", "Grant", "LeaseRecord", "Runtime", "need_from_marker"]

_KNOWN_KWARGS = ("mem", "count", "exclusive")


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


@dataclass
class Runtime:
    """This process's part of the session: the plan, the ledger, and what it leased.

    ``ledger_dir`` is the setting (None: the account's own folder); ``log`` collects one-line
    notes (the ledger's, ignored observer errors) until testhooks.py hands them to a report.
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
    _ledger: Ledger | None = None
    records: list[LeaseRecord] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            folder = prepare_ledger_dir(self.ledger_folder())
            gpus = ledger_gpus(self.plan)
            owner = Owner.current(self.session, self.worker)
            self._ledger = Ledger(
                folder,
                gpus,
                owner,
                context_bytes=self.context_bytes,
                policy=self.policy,
                log=self.log.append,
                refresh=nvml_refresh(self.plan, self.ledger_dir),
            )
        return self._ledger

    def ledger_folder(self) -> str:
        """The session's ledger folder: the setting, or the account's private default."""
        return str(ledger_dir_for(self.ledger_dir))

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def device_index(self, uuid: str) -> int:
        """``N`` of ``cuda:N`` for ``uuid`` in this process."""
        ordinal = cuda_ordinal(uuid, os.environ)
        return self.plan.by_uuid(uuid).gpu.index if ordinal is None else ordinal

    def acquire(self, need: GpuNeed, test_id: str, *, anywhere: bool, block: bool = False) -> Grant:
        """Lease ``need`` for ``test_id``; raises NeverFits or LeaseTimeout.

        ``anywhere``: the test takes ``gpu``/``gpus`` and so learns its device; others stay
        on the home GPU, where their memory really goes.
        """
        prefer = self.home or (self.plan.gpus[0].gpu.uuid if self.plan.gpus else None)
        allowed = None if anywhere or need.count > 1 or prefer is None else (prefer,)
        ledger_need = Need(
            mem=need.mem, count=need.count, exclusive=need.exclusive, prefer=prefer, allowed=allowed
        )
        lease = self.ledger.acquire(ledger_need, test_id, self.timeout)
        # Recorded times lie inside the real grant (taken after, released before), so an
        # overlap of records is a real overlap: peaks computed from them never overstate.
        taken = time.time()
        gpus: list[GpuLease] = []
        parts: list[tuple[str, int, int]] = []
        for uuid, n_bytes in lease.parts:
            g = self.plan.by_uuid(uuid).gpu
            idx = self.device_index(uuid)
            gpus.append(
                GpuLease(
                    device="cpu" if g.simulated else f"cuda:{idx}",
                    index=idx,
                    uuid=uuid,
                    name=g.name,
                    mem=n_bytes,
                    total=g.total_bytes,
                    is_cpu=False,
                    simulated=g.simulated,
                )
            )
            parts.append((uuid, g.index, n_bytes))
        record = LeaseRecord(test_id, self.worker, parts, lease.waited_s, taken, block=block)
        self.records.append(record)
        self._notify("pytest_gpushare_lease_acquired", gpus=gpus, test_id=test_id, waited=lease.waited_s)
        return Grant(lease, gpus, record)

    def release(self, grant: Grant) -> None:
        if grant.released:
            return
        grant.released = True
        if grant.lease is None or grant.record is None:
            return
        grant.record.released_at = time.time()
        self.ledger.release(grant.lease)
        held = grant.record.released_at - grant.record.taken_at
        self._notify(
            "pytest_gpushare_lease_released", gpus=grant.gpus, test_id=grant.record.test_id, held=held
        )

    def _notify(self, name: str, **kwargs: object) -> None:
        """Call an observer hook; an observer that raises is reported, never fails the test."""
        if self.pluginmanager is not None:
            hookcalls.notify(self.pluginmanager, name, self.log.append, **kwargs)
