"""How long each worker waited for memory, and how much of that wait had room for another test.

Pure: lease records in (the dicts of :meth:`pytest_gpushare.runtime.LeaseRecord.to_dict`, as
the JSON report's ``leases`` holds them), figures out; no pytest, no I/O.

A lease's **wait** is ``[taken_at - waited_s, taken_at)``: the time its test (or ``lease()``
block) stood in line for memory. A moment ``t`` of a wait **had room for another pending
test** when, on one of the GPUs the lease was finally granted::

    usable(g) - held(g, t) >= the smallest need among the other records not yet taken at t

where

* ``usable(g)`` is the usable memory the plan computed for ``g``;
* ``held(g, t)`` is what this session's records hold on ``g`` at ``t`` (a lease from its
  ``taken_at`` to its ``released_at``, or to the end of the run where it was never given back),
  plus one CUDA context (``context_bytes``) for each process from its first lease on ``g`` on,
  as the ledger books them;
* a record is **pending** at ``t`` when its ``taken_at`` is later than ``t``, whether or not it
  had been sent to a worker yet; its need is the most it leased on one GPU. The waiting record
  itself is not "another" test and never counts.

This is issue 14's measure ("workers sat blocked for 67 of 121 worker-seconds, 57 of those
seconds with at least 1GiB free" with 1GiB the smallest test): time a worker spent waiting
while a test that would have fitted sat in line behind it. A dispatcher that never leaves a
worker waiting while a pending test fits keeps it near 0.

What the records cannot show is not counted: memory that other sessions or programs took
after the plan was made (a wait behind them counts as having room wherever this session's own
bookings left some), tests that never got a lease (no record), and a context's end before the
run's (a worker that crashed). A lease on a GPU the plan does not know (another host's) never
has room.

The time a lease takes when memory is free at once (a fraction of a millisecond) is a wait too,
with room while a pending test fits.

Cost: ``O(n log n)`` in the number of records, once for the pending needs and once per GPU that
had a wait (its room set), plus ``O(log n)`` per wait and the room stretches handed back.
"""

from __future__ import annotations

import itertools
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Wait", "WorkerWaits", "find_waits", "natural_key", "per_worker"]

Stretch = tuple[float, float]  # [start, end) in seconds since the epoch


@dataclass(frozen=True)
class Wait:
    """One lease's wait for memory, with the stretches of it that had room for another test."""

    worker: str
    test_id: str
    start: float
    end: float
    room: tuple[Stretch, ...]  # sorted, disjoint, inside [start, end)

    @property
    def room_s(self) -> float:
        return sum(b - a for a, b in self.room)


@dataclass(frozen=True)
class WorkerWaits:
    """One worker's totals: ``waited_s`` of all its leases, and the part of it with room."""

    worker: str
    waited_s: float
    waited_with_room_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "waited_s": round(self.waited_s, 4),
            "waited_with_room_s": round(self.waited_with_room_s, 4),
        }


@dataclass(frozen=True)
class _Record:
    worker: str
    test_id: str
    taken: float
    end: float
    waited: float
    parts: tuple[tuple[str, int], ...]  # (uuid, bytes)

    @property
    def need(self) -> int:
        return max((n for _, n in self.parts), default=0)


def natural_key(text: str) -> list[Any]:
    """Sort key that puts ``gw2`` before ``gw10``."""
    return [(0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.split(r"(\d+)", text) if c]


def _records(leases: Iterable[Mapping[str, Any]], finished: float) -> list[_Record]:
    out = []
    for x in leases:
        taken = float(x["taken_at"])
        released = x.get("released_at")
        end = max(finished, taken) if released is None else max(float(released), taken)
        parts = tuple((str(p["uuid"]), int(p["bytes"])) for p in x["gpus"])
        out.append(_Record(str(x["worker"]), str(x["test_id"]), taken, end, float(x["waited_s"]), parts))
    return out


# --- step functions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pending:
    """The smallest and second smallest need among records not yet taken, as step functions.

    ``times`` are the distinct ``taken_at`` values, sorted; at moment ``t`` the pending records
    are those taken at or after ``times[j]`` with ``j = bisect_right(times, t)``, and their two
    smallest needs are ``first[j]`` and ``second[j]`` (the same value twice when two records
    share it; ``inf`` where there are none). ``first`` never decreases: the set only shrinks.
    """

    times: list[float]
    first: list[float]
    second: list[float]

    @classmethod
    def of(cls, records: Sequence[_Record]) -> _Pending:
        times = sorted({r.taken for r in records})
        needs_at: dict[float, list[int]] = {}
        for r in records:
            needs_at.setdefault(r.taken, []).append(r.need)
        first, second = [math.inf] * (len(times) + 1), [math.inf] * (len(times) + 1)
        low = [math.inf, math.inf]
        for j in range(len(times) - 1, -1, -1):  # the suffix from times[j] on
            low = sorted([*low, *needs_at[times[j]]])[:2]
            first[j], second[j] = low
        return cls(times, first, second)

    def since_own_need_is_smallest(self, need: int) -> float:
        """The moment from which no pending record needs less than ``need`` (``-inf``: always)."""
        j = bisect_left(self.first, need)
        return -math.inf if j == 0 else self.times[j - 1]


def _held(records: Sequence[_Record], uuid: str, context_bytes: int) -> tuple[list[float], list[int]]:
    """What the session holds on ``uuid``: ``values[k]`` on ``[times[k], times[k+1])``, 0 before."""
    deltas: dict[float, int] = {}
    first_lease: dict[str, float] = {}
    for r in records:
        for u, n in r.parts:
            if u != uuid:
                continue
            deltas[r.taken] = deltas.get(r.taken, 0) + n
            deltas[r.end] = deltas.get(r.end, 0) - n
            first_lease[r.worker] = min(first_lease.get(r.worker, math.inf), r.taken)
    for at in first_lease.values():  # booked with the process's first lease here, kept after it
        deltas[at] = deltas.get(at, 0) + context_bytes
    times = sorted(deltas)
    values, level = [], 0
    for t in times:
        level += deltas[t]
        values.append(level)
    return times, values


def _room_set(
    held: tuple[list[float], list[int]], pending_times: list[float], threshold: list[float], usable: int
) -> list[Stretch]:
    """The stretches of time where ``usable - held`` reaches the pending ``threshold``."""
    held_times, held_values = held
    edges = sorted({*held_times, *pending_times})
    bounds = [-math.inf, *edges, math.inf]
    out: list[Stretch] = []
    for a, b in itertools.pairwise(bounds):
        k = bisect_right(held_times, a) - 1
        level = held_values[k] if k >= 0 else 0
        if usable - level < threshold[bisect_right(pending_times, a)]:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class _Stretches:
    """Sorted, disjoint stretches, with their starts kept apart for bisecting."""

    stretches: list[Stretch]
    starts: list[float]

    @classmethod
    def of(cls, stretches: list[Stretch]) -> _Stretches:
        return cls(stretches, [a for a, _ in stretches])


def _clip(room: _Stretches, a: float, b: float) -> list[Stretch]:
    """The parts of ``room`` inside ``[a, b)``."""
    out = []
    stretches = room.stretches
    i = max(0, bisect_right(room.starts, a) - 1)
    while i < len(stretches) and stretches[i][0] < b:
        lo, hi = max(stretches[i][0], a), min(stretches[i][1], b)
        if lo < hi:
            out.append((lo, hi))
        i += 1
    return out


def _union(stretches: Iterable[Stretch]) -> tuple[Stretch, ...]:
    out: list[Stretch] = []
    for a, b in sorted(stretches):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


# --- the figures -------------------------------------------------------------------------------


class _RoomSets:
    """Room sets per GPU, built on first use: one against the smallest pending need, one against
    the second smallest (for a wait whose own need is the smallest, which does not count)."""

    def __init__(
        self, records: Sequence[_Record], usable: Mapping[str, int], context_bytes: int, pending: _Pending
    ) -> None:
        self._records, self._usable, self._context = records, usable, context_bytes
        self._pending = pending
        self._built: dict[tuple[str, bool], _Stretches] = {}

    def get(self, uuid: str, excluding_smallest: bool) -> _Stretches:
        key = (uuid, excluding_smallest)
        if key not in self._built:
            found: list[Stretch] = []
            if uuid in self._usable:
                p = self._pending
                held = _held(self._records, uuid, self._context)
                threshold = p.second if excluding_smallest else p.first
                found = _room_set(held, p.times, threshold, self._usable[uuid])
            self._built[key] = _Stretches.of(found)
        return self._built[key]


def find_waits(
    leases: Iterable[Mapping[str, Any]], usable: Mapping[str, int], *, context_bytes: int, finished: float
) -> list[Wait]:
    """Every wait of the run (records with ``waited_s > 0``), with the stretches that had room.

    ``usable`` maps GPU uuid to the plan's usable bytes; ``context_bytes`` is the CUDA context
    the ledger books per process and GPU; ``finished`` ends the leases never given back.
    """
    records = _records(leases, finished)
    pending = _Pending.of(records)
    rooms = _RoomSets(records, usable, context_bytes, pending)
    out = []
    for r in records:
        if r.waited <= 0:
            continue
        start, end = r.taken - r.waited, r.taken
        cut = min(max(pending.since_own_need_is_smallest(r.need), start), end)
        found: list[Stretch] = []
        for uuid, _ in r.parts:
            found += _clip(rooms.get(uuid, excluding_smallest=False), start, cut)
            found += _clip(rooms.get(uuid, excluding_smallest=True), cut, end)
        out.append(Wait(r.worker, r.test_id, start, end, _union(found)))
    return out


def per_worker(leases: Iterable[Mapping[str, Any]], waits: Iterable[Wait]) -> list[WorkerWaits]:
    """Each worker that leased, in natural order (``gw2`` before ``gw10``), with the sum of its
    leases' ``waited_s`` and of the room its waits had (0 for a worker that never waited)."""
    waited: dict[str, float] = {}
    room: dict[str, float] = {}
    for x in leases:
        worker = str(x["worker"])
        waited[worker] = waited.get(worker, 0.0) + float(x["waited_s"])
    for w in waits:
        room[w.worker] = room.get(w.worker, 0.0) + w.room_s
    return [WorkerWaits(w, waited[w], room.get(w, 0.0)) for w in sorted(waited, key=natural_key)]
