"""What the session's workers may hold on each GPU, and when: the fit model of dispatch, pure.

An xdist worker runs the tests it was sent one at a time, in order, so the most it can hold on a
GPU is the largest need among its tests sent and not yet completed there (its *hold*,
:class:`Holds`: a counter of the needs sent, so sending and completing cost O(distinct needs)).

Where durations are known, a worker's queue also says *when* it holds what: each test from the
expected end of those ahead of it (:func:`lane`). The :class:`Timeline` of a GPU sums these
expected uses over the workers, a profile of memory over time (as conservative backfilling in
batch schedulers keeps one); a test fits a worker when, over the window in which the worker is
expected to run it, the profile plus its need stays within the GPU's *room*: the session's
usable memory there less the CUDA contexts its GPU workers book (what the broker can grant to
tests). A test of unknown duration, and every test queued behind it, may run at any time from
its earliest start on: it counts until it completes, so with nothing known the timeline is the
holds.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["OVERRUN_S", "Holds", "Lane", "Timeline", "lane"]

#: A running test that has outlasted its expected duration is expected to end this much later.
OVERRUN_S = 0.05

W = TypeVar("W", bound=Hashable)
Parts = tuple[tuple[str, int], ...]
#: ``(start, end, bytes)``: a worker expects to hold ``bytes`` on a GPU over [start, end).
Segment = tuple[float, float, int]


class Holds(Generic[W]):
    """The holds of every worker on every GPU, and their sum per GPU."""

    def __init__(self, rooms: Mapping[str, int]) -> None:
        self.rooms = dict(rooms)
        self._sum = dict.fromkeys(rooms, 0)
        self._needs: dict[W, dict[str, Counter[int]]] = {}

    def hold(self, worker: W, uuid: str) -> int:
        """What ``worker`` may hold on ``uuid``: its largest need there not yet completed."""
        needs = self._needs.get(worker, {}).get(uuid)
        return max(needs) if needs else 0

    def total(self, uuid: str) -> int:
        """The sum of every worker's hold on ``uuid``."""
        return self._sum[uuid]

    def held_by_larger(self, uuid: str, need: int) -> int:
        """What the workers that hold at least ``need`` on ``uuid`` hold there together
        (O(workers): asked only when a test is passed over)."""
        holds = (max(per[uuid]) for per in self._needs.values() if per.get(uuid))
        return sum(h for h in holds if h >= need)

    def free(self, uuid: str, kept: int = 0) -> int:
        """Room left on ``uuid`` by the holds, less ``kept`` (held back for a reserved test)."""
        return self.rooms[uuid] - self._sum[uuid] - kept

    def fits(self, worker: W, uuid: str, need: int, kept: int = 0) -> bool:
        """Whether ``worker`` may be sent a test of ``need`` bytes on ``uuid``, ``kept`` bytes
        held back there for another test."""
        held = self.hold(worker, uuid)
        return self._sum[uuid] - held + max(held, need) + kept <= self.rooms[uuid]

    def add(self, worker: W, parts: Iterable[tuple[str, int]]) -> None:
        """``worker`` was sent a test that takes ``parts`` (``(uuid, bytes)``)."""
        mine = self._needs.setdefault(worker, {})
        for uuid, need in parts:
            counter = mine.setdefault(uuid, Counter())
            before = max(counter) if counter else 0
            counter[need] += 1
            self._sum[uuid] += max(before, need) - before

    def remove(self, worker: W, parts: Iterable[tuple[str, int]]) -> None:
        """A test of ``worker`` that takes ``parts`` completed or left its queue."""
        mine = self._needs.get(worker, {})
        for uuid, need in parts:
            counter = mine[uuid]
            before = max(counter)
            counter[need] -= 1
            if not counter[need]:
                del counter[need]
            after = max(counter) if counter else 0
            self._sum[uuid] += after - before

    def forget(self, worker: W) -> None:
        """``worker`` is gone: its holds end."""
        for uuid, counter in self._needs.pop(worker, {}).items():
            if counter:
                self._sum[uuid] -= max(counter)


class Lane:
    """A worker's queue on the time axis.

    ``segments``: what it is expected to hold on each GPU, as the other workers must count it;
    ``mine``: the same as the worker itself counts it when it is sent one more test (which lets
    xdist's worker start its first); ``next_start``: when a test sent to it next would start;
    ``certain``: whether that start is expected (every test queued has a known duration) or only
    the earliest possible."""

    __slots__ = ("certain", "mine", "next_start", "segments")

    def __init__(
        self,
        segments: dict[str, list[Segment]],
        mine: dict[str, list[Segment]],
        next_start: float,
        certain: bool,
    ) -> None:
        self.segments = segments
        self.mine = mine
        self.next_start = next_start
        self.certain = certain

    def window(self, duration: float | None) -> tuple[float, float]:
        """Where a test of ``duration`` (None: unknown) sent next would run: its expected start
        and end, the end infinite where either is not known."""
        start = self.next_start
        if duration is None or not self.certain:
            return start, math.inf
        return start, start + duration


def lane(
    tests: Sequence[tuple[Parts, float | None]], since: float | None, now: float, *, closing: bool = False
) -> Lane:
    """The :class:`Lane` of a worker whose queue holds ``tests`` (parts, expected duration or
    None when unknown), in order; the first started at ``since`` (None: not yet, it starts about
    ``now``, when xdist's worker has the next one in hand); ``closing``: it was told that nothing
    more will come, so it runs its last test without waiting for another.

    Each test starts when the one ahead of it is expected to end; a first test that has outlasted
    its duration is expected to end :data:`OVERRUN_S` from ``now``. From the first test of unknown
    duration on, a test may end at any time: it counts from its earliest start until it completes
    (with the running maximum of the needs, as a worker runs one test at a time).

    The other workers count the last test as of unknown duration too: xdist's worker starts it
    only once it holds another one, which comes only if one fits, and meanwhile it may hold its
    memory (a lease carried from the test before). The worker itself counts it as it will run
    when it is sent one more (``mine``)."""
    mine, next_start, certain = _segments(tests, now if since is None else since, now, since is not None)
    if closing or not tests or tests[-1][1] is None:
        return Lane(mine, mine, next_start, certain)
    held = [*tests[:-1], (tests[-1][0], None)]
    seen, _, _ = _segments(held, now if since is None else since, now, since is not None)
    return Lane(seen, mine, next_start, certain)


def _segments(
    tests: Sequence[tuple[Parts, float | None]], t: float, now: float, running: bool
) -> tuple[dict[str, list[Segment]], float, bool]:
    """The segments of ``tests`` run one after another from ``t`` (see :func:`lane`)."""
    segments: dict[str, list[Segment]] = {}
    uncertain: dict[str, int] = {}  # per GPU, the largest need since the first unknown duration
    certain = True
    for k, (parts, duration) in enumerate(tests):
        start = t
        if duration is not None:
            t = start + duration
            if k == 0 and running:  # one that overran ends soon
                t = max(t, now + OVERRUN_S)
        certain = certain and duration is not None
        for uuid, need in parts:
            runs = segments.setdefault(uuid, [])
            if certain:
                runs.append((start, t, need))
            elif need > uncertain.get(uuid, 0):
                uncertain[uuid] = need
                if runs and runs[-1][1] == math.inf:  # the staircase steps up here
                    runs[-1] = (runs[-1][0], start, runs[-1][2])
                runs.append((start, math.inf, need))
    return segments, t, certain


def _cut(segments: Sequence[Segment], start: float, end: float) -> list[Segment]:
    """``segments`` cut to [start, end)."""
    return [(max(a, start), min(b, end), n) for a, b, n in segments if a < end and b > start]


def _level(segments: Sequence[Segment], t: float) -> int:
    return max((n for a, b, n in segments if a <= t < b), default=0)


class Timeline(Generic[W]):
    """The expected memory use of every worker on every GPU over time (see the module docstring).

    Each worker's :class:`Lane` is set whenever its queue or the clock moves; a GPU's profile is
    merged from the lanes when it is next asked (O(segments log segments))."""

    def __init__(self, rooms: Mapping[str, int]) -> None:
        self.rooms = dict(rooms)
        self._lanes: dict[W, Lane] = {}
        self._profiles: dict[str, tuple[list[float], list[int]]] = {}

    def lane_of(self, worker: W) -> Lane | None:
        return self._lanes.get(worker)

    def set(self, worker: W, new: Lane) -> None:
        old = self._lanes.get(worker)
        self._lanes[worker] = new
        for uuid in set(new.segments) | set(old.segments if old is not None else ()):
            self._profiles.pop(uuid, None)

    def forget(self, worker: W) -> None:
        old = self._lanes.pop(worker, None)
        for uuid in old.segments if old is not None else ():
            self._profiles.pop(uuid, None)

    def fits(self, worker: W, uuid: str, window: tuple[float, float], need: int, kept: int = 0) -> bool:
        """Whether ``worker`` may run ``need`` bytes on ``uuid`` over ``window`` with ``kept``
        bytes held back there for another test: the others' expected use plus the larger of
        its own and ``need`` stays within the room at every moment of the window."""
        start, end = window[0], max(window[1], window[0] + 1e-9)  # a test of 0 s still starts
        limit = self.rooms[uuid] - kept
        found = self._lanes.get(worker)
        seen = _cut(found.segments.get(uuid, ()), start, end) if found is not None else []
        mine = _cut(found.mine.get(uuid, ()), start, end) if found is not None else []
        cuts = sorted({start, end, *(x for a, b, _ in seen + mine for x in (a, b))})
        for a, b in itertools.pairwise(cuts):
            # the others' use is the profile less what the worker counts for them; its own is
            # what it holds itself then, or the test, whichever is larger (one at a time)
            own = _level(mine, a)
            if self._peak(uuid, a, b) - _level(seen, a) + max(own, need) > limit:
                return False
        return True

    def _peak(self, uuid: str, start: float, end: float) -> int:
        """The most all workers are expected to hold on ``uuid`` at once over [start, end)."""
        times, levels = self._profile(uuid)
        i = bisect.bisect_right(times, start) - 1  # the last step at or before start
        peak = levels[i] if i >= 0 else 0
        for j in range(i + 1, len(times)):
            if times[j] >= end:
                break
            peak = max(peak, levels[j])
        return peak

    def _profile(self, uuid: str) -> tuple[list[float], list[int]]:
        """``uuid``'s expected use as a step function: ``levels[i]`` from ``times[i]`` on."""
        found = self._profiles.get(uuid)
        if found is None:
            deltas: dict[float, int] = {}
            for lane in self._lanes.values():
                for a, b, n in lane.segments.get(uuid, ()):
                    deltas[a] = deltas.get(a, 0) + n
                    if b != math.inf:
                        deltas[b] = deltas.get(b, 0) - n
            times = sorted(deltas)
            levels, level = [], 0
            for t in times:
                level += deltas[t]
                levels.append(level)
            found = self._profiles[uuid] = (times, levels)
        return found
