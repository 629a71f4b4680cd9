"""What a test takes while it runs, and which pending test goes first: pure, no I/O.

A :class:`Demand` is a test's memory as dispatch models it (bytes per GPU, how many GPUs, whether
it may leave its worker's home GPU). Tests go out larger and longer first: by their **weight**,
the share of the box a test occupies times its expected duration (:func:`weight`), an LPT-like
order in which a test that fills a GPU for seconds comes before one that takes a sliver of it
for a moment, and a long test with no GPU work still comes early (it takes one worker of the
box for its whole duration).

Durations come from earlier runs; a test never seen gets :func:`guess_duration`: the median of
the known durations of this run's tests, else :data:`UNKNOWN_S`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pytest_gpushare.units import MemRequest

__all__ = [
    "NO_GPU",
    "UNKNOWN_S",
    "Demand",
    "MarkedNeed",
    "demand_of",
    "guess_duration",
    "memory_binds",
    "weight",
]

#: The expected duration of a test when no test of the run has a known one.
UNKNOWN_S = 1.0


@dataclass(frozen=True)
class Demand:
    """What one test takes of the GPUs while it runs, as dispatch models it.

    ``mem``: ``(uuid, bytes)`` for every GPU the test could run on, what it would take there (a
    percentage resolved against that GPU, an exclusive test the GPU's whole room, never more than
    the room). ``count``: how many GPUs it takes at once (0: no GPU work). ``anywhere``: it takes
    the ``gpu``/``gpus`` fixture, so it may be placed on any GPU; otherwise a one-GPU test runs on
    its worker's home GPU.
    """

    mem: tuple[tuple[str, int], ...] = ()
    count: int = 0
    anywhere: bool = False

    def on(self, uuid: str) -> int:
        """Bytes it takes on ``uuid`` (0 where it cannot go)."""
        for u, n in self.mem:
            if u == uuid:
                return n
        return 0

    @property
    def largest(self) -> int:
        """The most it takes on any one GPU."""
        return max((n for _, n in self.mem), default=0)


#: A test without GPU work.
NO_GPU = Demand()


def weight(demand: Demand, duration_s: float, rooms: Mapping[str, int], workers: int) -> float:
    """How much of the box the test occupies, times how long: ``max(count × largest / Σ rooms,
    1 / workers) × duration``. The larger share counts: memory for a GPU test that fills a GPU,
    the one worker it takes for any test."""
    total = sum(rooms.values())
    memory = demand.count * demand.largest / total if total > 0 else 0.0
    return max(memory, 1.0 / max(1, workers)) * duration_s


def guess_duration(known: Iterable[float]) -> float:
    """The expected duration of a test never seen: the median of the known ones, else 1 s."""
    values = list(known)
    import statistics  # here: it loads fractions and decimal, which a worker writing needs never uses

    return statistics.median(values) if values else UNKNOWN_S


@dataclass(frozen=True)
class MarkedNeed:
    """A test's memory as its marker says (what a worker reports for each GPU test)."""

    mem: MemRequest
    count: int = 1
    exclusive: bool = False
    anywhere: bool = False  # it takes the gpu/gpus fixture


def demand_of(need: MarkedNeed | None, totals: Mapping[str, int], rooms: Mapping[str, int]) -> Demand:
    """The demand of a test with ``need`` (None: no GPU test) on GPUs of ``totals`` bytes (by
    uuid) with ``rooms`` for tests. A test that takes more GPUs than there are never runs (the
    broker says so at once): it is modelled as taking none."""
    if need is None or need.count > len(rooms):
        return NO_GPU
    mem = tuple(
        (u, room if need.exclusive else min(room, need.mem.resolve(totals[u]))) for u, room in rooms.items()
    )
    return Demand(mem, need.count, need.anywhere)


def memory_binds(demands: Iterable[Demand], homes: Iterable[str], rooms: Mapping[str, int]) -> bool:
    """Whether memory can ever limit what runs at once: a test on more than one GPU, or a GPU whose
    workers (``homes``: each worker's home uuid) could not all hold its largest test together."""
    largest = dict.fromkeys(rooms, 0)
    for d in demands:
        if d.count > 1:
            return True
        for u, n in d.mem:
            largest[u] = max(largest[u], n)
    per_gpu = Counter(homes)
    return any(per_gpu[u] * largest[u] > rooms[u] for u in rooms)
