"""The lease lifecycle around a GPU test, the ``gpu``/``gpus`` fixtures and :func:`lease`.

One :class:`Runtime` per process holds the session's ledger. A GPU test's lease is taken in a
``pytest_runtest_setup`` wrapper, before any fixture of the test runs, and given back after
its teardown in every outcome (the ``pytest_runtest_protocol`` wrapper is the safety net for
interrupts; a crashed process is covered by the ledger's liveness locks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest

from pytest_gpushare.credits import nvml_refresh
from pytest_gpushare.errors import GpuShareError, NeverFits, SettingError
from pytest_gpushare.ledger import (
    Lease,
    Ledger,
    Need,
    Owner,
    default_ledger_dir,
    ledger_gpus,
    prepare_ledger_dir,
)
from pytest_gpushare.planner import Plan
from pytest_gpushare.units import MemRequest, parse_mem

__all__ = ["GpuLease", "Runtime", "lease", "need_from_marker"]

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
    """This process's part of the session: the plan, the ledger, and what it leased."""

    config: pytest.Config
    plan: Plan
    session: str
    worker: str
    ledger_dir: str
    context_bytes: int
    policy: str
    timeout: float
    home: str | None
    default_mem: MemRequest
    hook: Any = None
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
                refresh=nvml_refresh(self.plan, self.ledger_dir or None),
            )
        return self._ledger

    def ledger_folder(self) -> str:
        """The session's ledger folder: the setting, or the account's private default."""
        return self.ledger_dir or str(default_ledger_dir())

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def device_index(self, uuid: str) -> int:
        """``N`` of ``cuda:N`` for ``uuid`` in this process."""
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if uuid in visible:
            return visible.index(uuid)
        return self.plan.by_uuid(uuid).gpu.index

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
        grant = Grant(lease, gpus, record)
        self._notify("pytest_gpushare_lease_acquired", gpus=gpus, test_id=test_id, waited=lease.waited_s)
        return grant

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

    def _notify(self, name: str, **kwargs: Any) -> None:
        """Call an observer hook; an observer that raises is reported, never fails the test."""
        if self.hook is None:
            return
        caller = getattr(self.hook, name)
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                self.log.append(f"{name} in {impl.plugin_name} raised {type(exc).__name__}: {exc} (ignored)")


class RuntimeProvider(Protocol):
    """What makes this process's :class:`Runtime` on first use (the session's lease plugin)."""

    @property
    def runtime(self) -> Runtime: ...


#: The providers of the sessions active in this process (pytester can nest one in another).
_ACTIVE: list[RuntimeProvider] = []


def active_runtime() -> Runtime:
    """This process's runtime, made on first use: a ``lease()`` in a fixture may come before
    any GPU test of the session."""
    if not _ACTIVE:
        raise GpuShareError("pytest_gpushare.lease() needs a pytest session with pytest-gpushare active")
    return _ACTIVE[-1].runtime


@contextmanager
def lease(
    mem: object = None, count: int = 1, exclusive: bool = False, *, name: str | None = None
) -> Iterator[list[GpuLease]]:
    """Hold GPU memory for as long as the ``with`` block lives (module/session fixtures).

    Yields the list of :class:`GpuLease`, one per device, like the ``gpus`` fixture; ``name``
    is what ledgers and reports show as the holder (default: the calling test's id or
    ``lease()``). Waits like a test would; a need that can never be met raises
    :class:`NeverFits`, a wait past ``--gpushare-timeout`` raises :class:`LeaseTimeout`.
    """
    rt = active_runtime()
    label = name or os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0] or "lease()"
    need = need_from_marker(
        (),
        {"mem": mem, "count": count, "exclusive": exclusive},
        rt.default_mem,
        f"pytest_gpushare.lease() of {label}",
    )
    if not rt.plan.gpus:
        raise NeverFits("pytest_gpushare.lease(): no GPU on this box")
    grant = rt.acquire(need, f"{label} [lease()]", anywhere=True, block=True)
    try:
        yield grant.gpus
    finally:
        rt.release(grant)
