"""The lines in which pending tests wait, one per distinct demand: pure.

A line (a *class* of tests) keeps its tests lightest first, so that ``pop()`` takes its head,
and its weight per second of a test (:func:`~.order.weight`). Where a phased plan's workers
join (:class:`Joining`), the rooms change, and with them the demands of the tests still waiting
(an exclusive test takes the room): :func:`regroup` makes the lines again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pytest_gpushare.dispatch.order import Demand, weight

__all__ = ["Joining", "Line", "make_lines", "regroup"]


@dataclass(frozen=True)
class Joining:
    """The second phase of a phased plan: once no pending GPU test needs more than ``threshold``
    bytes on a GPU, every worker runs GPU tests, the rooms are ``rooms`` (every worker's context
    counted) and test ``i``'s demand is ``demands[i]`` (an exclusive test takes the room)."""

    threshold: int
    rooms: Mapping[str, int]
    demands: Sequence[Demand]


@dataclass(eq=False)
class Line:
    """The pending tests of one demand."""

    demand: Demand
    share: float  # weight per second
    tests: list[int] = field(default_factory=list)  # lightest first: pop() takes the head
    passed_since: float | None = None

    def head_weight(self, durations: Sequence[float]) -> float:
        return self.share * durations[self.tests[-1]]


def make_lines(
    rooms: Mapping[str, int],
    demands: Sequence[Demand],
    workers: int,
    waiting: Iterable[int],
    key: Callable[[int], tuple[float, int]],
) -> tuple[list[Line], list[Line]]:
    """One line per distinct demand of ``demands`` (weighed against ``rooms`` and ``workers``),
    with the tests ``waiting`` in it in ``key`` order; returns the lines and each test's line."""
    lines: dict[Demand, Line] = {}
    line_of = []
    for demand in demands:
        line = lines.get(demand)
        if line is None:
            line = lines[demand] = Line(demand, weight(demand, 1.0, rooms, workers))
        line_of.append(line)
    for index in waiting:
        line_of[index].tests.append(index)
    for line in lines.values():
        line.tests.sort(key=key)
    return list(lines.values()), line_of


def regroup(
    old: Sequence[Line], joining: Joining, workers: int, key: Callable[[int], tuple[float, int]]
) -> tuple[list[Line], list[Line]]:
    """The lines again under ``joining``'s rooms and demands, with the tests waiting in ``old``;
    each new line was passed over since the oldest such time of the old lines it takes tests
    from (a test passed over stays passed over)."""
    passed: dict[Demand, float] = {}
    for line in old:
        if line.passed_since is None:
            continue
        for index in line.tests:
            d = joining.demands[index]
            passed[d] = min(passed.get(d, line.passed_since), line.passed_since)
    waiting = [i for line in old for i in line.tests]
    lines, line_of = make_lines(joining.rooms, joining.demands, workers, waiting, key)
    for line in lines:
        line.passed_since = passed.get(line.demand)
    return lines, line_of
