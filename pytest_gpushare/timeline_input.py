"""A ``--gpushare-report`` document read for the timeline: its GPUs as panels, its leases as parts,
and each worker's waits for memory (:mod:`pytest_gpushare.waits`, as the report's ``workers``).

:func:`read_run` checks every field the picture needs and raises ``ValueError`` with a one-line
message naming the field; :mod:`pytest_gpushare.timeline` draws what it returns. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_gpushare.report import REPORT_VERSION
from pytest_gpushare.waits import Wait, WorkerWaits, find_waits, natural_key, per_worker

__all__ = ["Panel", "Part", "Run", "read_run"]


@dataclass(frozen=True)
class Part:
    """One lease on one GPU, as drawn."""

    test_id: str
    worker: str
    start: float
    end: float
    bytes: int
    gpu_index: int
    gpu_count: int
    waited_s: float
    held_s: float | None  # None: still held when the run finished
    outcome: str | None


@dataclass
class Panel:
    uuid: str
    index: int
    name: str | None  # None: the GPU is not in the report's plan
    total: int | None
    usable: int | None
    parts: list[Part] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    started: float
    t0: float
    t1: float
    panels: list[Panel]
    workers: list[str]
    leases: int
    not_run: int
    lost: int
    waits: list[Wait]
    worker_waits: list[WorkerWaits]


# --- reading the report ------------------------------------------------------------------------


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(obj: object, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {_short(obj)}")
    if key not in obj:
        raise ValueError(f"{where}: missing {key!r}")
    return obj[key]


def _number(obj: object, key: str, where: str) -> float:
    value = _get(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} must be a finite number, got {_short(value)}")
    return float(value)


def _count(obj: object, key: str, where: str) -> int:
    value = _get(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key!r} must be a whole number >= 0, got {_short(value)}")
    return value


def _text(obj: object, key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {_short(value)}")
    return value


def _list(obj: object, key: str, where: str) -> list[Any]:
    value = _get(obj, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} must be a list, got {_short(value)}")
    return value


def _read_lease(raw: object, where: str, finished: float) -> list[tuple[str, int, Part]]:
    """The parts of one lease as ``(uuid, index the lease names, part)``."""
    start = _number(raw, "taken_at", where)
    released = _get(raw, "released_at", where)
    end = finished if released is None else _number(raw, "released_at", where)
    outcome = raw.get("outcome") if isinstance(raw, dict) else None
    gpus = _list(raw, "gpus", where)
    template = Part(
        test_id=_text(raw, "test_id", where),
        worker=_text(raw, "worker", where),
        start=start,
        end=max(start, end),
        bytes=0,
        gpu_index=0,
        gpu_count=len(gpus),
        waited_s=_number(raw, "waited_s", where),
        held_s=None if released is None else max(0.0, end - start),
        outcome=outcome if isinstance(outcome, str) else None,
    )
    parts = []
    for i, entry in enumerate(gpus):
        at = f"{where}.gpus[{i}]"
        index = _count(entry, "index", at)
        part = replace(template, bytes=_count(entry, "bytes", at), gpu_index=index)
        parts.append((_text(entry, "uuid", at), index, part))
    return parts


def read_run(report: object) -> Run:
    if not isinstance(report, dict):
        raise ValueError(f"not a gpushare report: expected a JSON object, got {_short(report)}")
    version = report.get("version")
    if version != REPORT_VERSION:
        raise ValueError(
            f"unsupported report version {_short(version)} (this gpushare reads version {REPORT_VERSION})"
        )
    started = _number(report, "started", "report")
    finished = max(started, _number(report, "finished", "report"))
    raw_usable = _get(report, "usable_bytes", "report")
    if not isinstance(raw_usable, dict):
        raise ValueError(f"report: 'usable_bytes' must be an object, got {_short(raw_usable)}")
    usable_by_uuid = {uuid: _count(raw_usable, uuid, "report usable_bytes") for uuid in raw_usable}

    panels: dict[str, Panel] = {}
    for i, entry in enumerate(_list(_get(report, "plan", "report"), "gpus", "report plan")):
        where = f"report plan.gpus[{i}]"
        gpu = _get(entry, "gpu", where)
        uuid = _text(gpu, "uuid", f"{where}.gpu")
        panels[uuid] = Panel(
            uuid=uuid,
            index=_count(gpu, "index", f"{where}.gpu"),
            name=_text(gpu, "name", f"{where}.gpu"),
            total=_count(gpu, "total_bytes", f"{where}.gpu"),
            usable=_count(entry, "usable_bytes", where),
        )
    for uuid, usable in usable_by_uuid.items():
        if uuid in panels:
            panels[uuid].usable = usable

    leases = _list(report, "leases", "report")
    for i, raw in enumerate(leases):
        for uuid, index, part in _read_lease(raw, f"report leases[{i}]", finished):
            if uuid not in panels:
                # A lease on a GPU the plan does not list: draw it rather than hide memory.
                panels[uuid] = Panel(uuid, index, None, None, usable_by_uuid.get(uuid))
            panels[uuid].parts.append(replace(part, gpu_index=panels[uuid].index))

    parts = [p for panel in panels.values() for p in panel.parts]
    # The leases are checked above; the waits are the report's ``workers`` figures, recomputed.
    context = _count(_get(report["plan"], "budget", "report plan"), "context_bytes", "report plan.budget")
    waits = find_waits(leases, usable_by_uuid, context_bytes=context, finished=finished)
    not_run, lost = report.get("not_run", []), report.get("lost", [])
    return Run(
        started=started,
        t0=min([started, *(p.start for p in parts), *(w.start for w in waits)]),
        t1=max([finished, *(p.end for p in parts)]),
        panels=sorted(panels.values(), key=lambda p: (p.index, p.uuid)),
        workers=sorted({p.worker for p in parts}, key=natural_key),
        leases=len(leases),
        not_run=len(not_run) if isinstance(not_run, list) else 0,
        lost=len(lost) if isinstance(lost, list) else 0,
        waits=waits,
        worker_waits=per_worker(leases, waits),
    )
