"""How many workers run GPU tests, and when: the worker-count plan of dispatch, pure.

A worker books a CUDA context on a GPU with its first lease there and keeps it until it exits
(the broker books it; ``--gpushare-context-mem``). Where contexts crowd a GPU, fewer workers
with GPU tests can be faster: on issue 14's mix (21GiB usable), 7 workers book 3.5GiB, so no
6GiB test fits beside a 14GiB one, while 2 workers book 1GiB and run them side by side. Since a
worker books its context only with its first lease, the others may join later: once the 14GiB
and 6GiB tests are out, all 7 run the 1GiB ones.

The plan tries each count ``w`` of GPU workers, from all of them down to one: the first ``w``
workers in :func:`spread` order run GPU tests (the others only tests without GPU work, so they
book no context), the rooms count only their contexts, and the dispatcher is played over the
tests with the known durations (:func:`dispatch_makespan`) to say how long the run takes. Then
it tries phased plans: ``k`` workers while a pending GPU test needs more than ``x`` (for every
``k`` below all of them and every distinct need ``x`` but the largest), then every worker, the
rooms counting every context (:class:`~.lines.Joining`). Of the plans whose makespan is
within :data:`TOLERANCE` of the best it keeps the one with the most GPU workers: all of them
from the start, else all of them in the end (the most at first, then the earliest joining),
else the most; so fewer only where it clearly pays. Where a GPU test's duration is unknown (a
first run), or the suite is too large for the plan to be cheap (:data:`PLAN_LIMIT`), every
worker runs GPU tests, as without a plan.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pytest_gpushare.dispatch.dispatcher import Dispatcher
from pytest_gpushare.dispatch.lines import Joining
from pytest_gpushare.dispatch.order import Demand
from pytest_gpushare.units import format_size

__all__ = ["PLAN_LIMIT", "TOLERANCE", "Plan", "dispatch_makespan", "make_plan", "rooms_for", "spread"]

Parts = tuple[tuple[str, int], ...]

#: A plan with fewer GPU workers is kept only if it is faster than this share of the best.
TOLERANCE = 0.03
#: Plans are made only while tests x workers² stay under this: it plays the dispatcher once per
#: worker count, at most a few tenths of a second of the controller's time on a 2-core box (200
#: tests on 15 workers: 0.2 to 0.3 s), once, before the first test is sent. Phased plans are
#: tried while tests x workers x the phased plays stay under it too.
PLAN_LIMIT = 50_000


@dataclass(frozen=True)
class Plan:
    """Which workers (indices into the session's list) run GPU tests: ``gpu`` from the start,
    and every worker once no pending GPU test needs more than ``threshold`` bytes (None: never).
    """

    gpu: tuple[int, ...]
    threshold: int | None = None

    def describe(self, workers: int) -> str:
        """The plan as ``-v`` says it after "memory"; empty where every worker runs GPU tests."""
        if len(self.gpu) == workers:
            return ""
        said = f", GPU tests on {len(self.gpu)} of {workers} workers"
        if self.threshold is None:
            return said + " (fewer CUDA contexts)"
        return said + f", all {workers} once no test over {format_size(self.threshold)} waits"


def spread(homes: Sequence[str]) -> list[int]:
    """The workers (indices into ``homes``) in the order in which they take GPU work: the first
    worker at home on each GPU, then the second of each, and so on, so that any first ``w`` of
    them spread over the GPUs."""
    seen: Counter[str] = Counter()
    rank = []
    for i, home in enumerate(homes):
        rank.append((seen[home], i))
        seen[home] += 1
    return [i for _, i in sorted(rank)]


def rooms_for(usable: Mapping[str, int], homes: Sequence[str], context_bytes: int) -> dict[str, int]:
    """Per GPU: the usable memory less one CUDA context for each worker in ``homes`` there."""
    booked = Counter(homes)
    return {u: max(0, n - booked[u] * context_bytes) for u, n in usable.items()}


def make_plan(
    homes: Sequence[str],
    usable: Mapping[str, int],
    context_bytes: int,
    demands_for: Callable[[Mapping[str, int]], Sequence[Demand]],
    durations: Sequence[float | None],
) -> Plan:
    """The plan for workers at ``homes`` (their home GPU uuids; see the module docstring).

    ``demands_for(rooms)``: every test's demand where the GPUs have ``rooms`` for tests (an
    exclusive test takes the whole room); ``durations``: each test's, None where unknown."""
    everyone = Plan(tuple(range(len(homes))))
    if context_bytes <= 0 or len(homes) < 2:
        return everyone
    full = rooms_for(usable, homes, context_bytes)
    all_demands = demands_for(full)
    if any(d is None for d, demand in zip(durations, all_demands, strict=True) if demand.count):
        return everyone  # a first run: how long tests take is not known yet
    if len(durations) * len(homes) ** 2 > PLAN_LIMIT:
        return everyone
    known = [d or 0.0 for d in durations]
    order = spread(homes)
    played: list[tuple[float, tuple[int, int, float], Plan]] = []  # makespan, preference, plan
    best = math.inf

    def play(first: int, threshold: int | None) -> None:
        nonlocal best
        gpu = set(order[:first])
        rooms = rooms_for(usable, [homes[i] for i in gpu], context_bytes)
        joining = None if threshold is None else Joining(threshold, full, all_demands)
        team = [(home, i in gpu) for i, home in enumerate(homes)]
        # A play slower than the best so far by more than the tolerance is never chosen: cut it short.
        span = dispatch_makespan(
            rooms,
            demands_for(rooms),
            known,
            team,
            limit=best * (1 + TOLERANCE),
            joining=joining,
            context_bytes=context_bytes,
        )
        best = min(best, span)
        last = len(homes) if threshold is not None else first
        preference = (last, first, math.inf if threshold is None else threshold)
        played.append((span, preference, Plan(tuple(sorted(gpu)), threshold)))

    for w in range(len(homes), 0, -1):
        play(w, None)
    for first, threshold in _phases(homes, known, usable, context_bytes, demands_for):
        play(first, threshold)
    if best == math.inf:
        return everyone
    return max((p for p in played if p[0] <= best * (1 + TOLERANCE)), key=lambda p: p[1])[2]


def _phases(
    homes: Sequence[str],
    durations: Sequence[float],
    usable: Mapping[str, int],
    context_bytes: int,
    demands_for: Callable[[Mapping[str, int]], Sequence[Demand]],
) -> list[tuple[int, int]]:
    """The phased plans worth playing, ``(first workers, threshold)``: every count below all of
    them, every distinct need of a GPU test but the largest (the needs where one worker books
    its context: a threshold only tells large from small); none where they would cost more than
    :data:`PLAN_LIMIT`."""
    one = demands_for(rooms_for(usable, homes[:1], context_bytes))
    needs = sorted({d.largest for d in one if d.count})[:-1]
    plays = (len(homes) - 1) * len(needs)
    if len(durations) * len(homes) * plays > PLAN_LIMIT:
        return []
    return [(first, x) for first in range(len(homes) - 1, 0, -1) for x in needs]


def dispatch_makespan(
    rooms: Mapping[str, int],
    demands: Sequence[Demand],
    durations: Sequence[float],
    workers: Sequence[tuple[str, bool]],
    limit: float = math.inf,
    *,
    joining: Joining | None = None,
    context_bytes: int = 0,
) -> float:
    """How long :class:`~.dispatcher.Dispatcher` takes over the tests on ``workers`` (home
    uuid, whether it runs GPU tests from the start; ``rooms`` count their contexts), played as
    the session plays it: xdist's worker starts its first test only with the next one in hand
    (or once told that nothing more will come), the broker starts a test once its memory is
    free, and after each completion the worker and every hungry worker are filled. With
    ``joining``, a worker that joins books its ``context_bytes`` at home with its first GPU test.
    Infinite where the play stalls or passes ``limit``."""
    core: Dispatcher[int] = Dispatcher(rooms, demands, durations, workers=len(workers), joining=joining)
    for w, (home, gpu) in enumerate(workers):
        core.add_worker(w, home, gpu=gpu)
    free = dict(rooms)
    unbooked = {w for w, (_home, gpu) in enumerate(workers) if not gpu}
    running: list[tuple[float, int, int, Parts]] = []  # end, worker, test, parts
    busy: set[int] = set()
    closed: set[int] = set()
    now = 0.0

    def check(w: int) -> None:
        if w in closed:
            return
        if core.pending:
            core.fill(w, now)
        else:
            core.close(w)
            closed.add(w)

    def start(w: int, index: int, parts: Parts) -> bool:
        """Starts ``w``'s first test if its memory (and a joining worker's context) is free."""
        context = context_bytes if parts and w in unbooked else 0
        home = workers[w][0]
        if not all(need + (context if u == home else 0) <= free[u] for u, need in parts):
            return False
        if context and home in free:
            free[home] -= context
            unbooked.discard(w)
        for u, need in parts:
            free[u] -= need
        busy.add(w)
        heapq.heappush(running, (now + durations[index], w, index, parts))
        return True

    for w in range(len(workers)):
        check(w)
    while core.busy:
        for w in range(len(workers)):
            head = core.head(w)
            if w in busy or head is None or (len(core.queue(w)) < 2 and w not in closed):
                continue
            start(w, *head)
        if not running:
            return math.inf
        now, w, index, parts = heapq.heappop(running)
        if now > limit:
            return math.inf
        for u, need in parts:
            free[u] += need
        busy.discard(w)
        core.completed(w, index)
        check(w)
        for other in core.hungry():
            check(other)
    return now
