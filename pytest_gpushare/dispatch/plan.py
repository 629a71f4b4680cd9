"""How many workers run GPU tests: the worker-count plan of dispatch, pure.

A worker books a CUDA context on a GPU with its first lease there and keeps it until it exits
(the broker books it; ``--gpushare-context-mem``). Where contexts crowd a GPU, fewer workers
with GPU tests can be faster: on issue 14's mix (21GiB usable), 7 workers book 3.5GiB, so no
6GiB test fits beside a 14GiB one, while 2 workers book 1GiB and run them side by side.

The plan tries each count ``w`` of GPU workers, from all of them down to one: the first ``w``
workers in :func:`spread` order run GPU tests (the others only tests without GPU work, so they
book no context), the rooms count only their contexts, and a list schedule with the known
durations (:func:`list_makespan`: whenever a worker is free it starts the heaviest pending test
that fits now, as dispatch offers them) says how long the run takes. The plan keeps the most
workers whose makespan is within :data:`TOLERANCE` of the best: fewer only where it clearly
pays. Where a GPU test's duration is unknown (a first run), or the suite is too large for the
plan to be cheap (:data:`PLAN_LIMIT`), every worker runs GPU tests, as without a plan.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from pytest_gpushare.dispatch.dispatcher import Dispatcher
from pytest_gpushare.dispatch.order import Demand

__all__ = ["PLAN_LIMIT", "TOLERANCE", "dispatch_makespan", "gpu_workers", "rooms_for", "spread"]

Parts = tuple[tuple[str, int], ...]

#: A plan with fewer GPU workers is kept only if it is faster than this share of the best.
TOLERANCE = 0.03
#: Plans are made only while tests x workers² stay under this: it plays the dispatcher once per
#: worker count, at most a few tenths of a second of the controller's time on a 2-core box (200
#: tests on 15 workers: 0.2 to 0.3 s), once, before the first test is sent.
PLAN_LIMIT = 50_000


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


def gpu_workers(
    homes: Sequence[str],
    usable: Mapping[str, int],
    context_bytes: int,
    demands_for: Callable[[Mapping[str, int]], Sequence[Demand]],
    durations: Sequence[float | None],
) -> list[int]:
    """The workers (indices into ``homes``, their home GPU uuids) that should run GPU tests.

    ``demands_for(rooms)``: every test's demand where the GPUs have ``rooms`` for tests (an
    exclusive test takes the whole room); ``durations``: each test's, None where unknown."""
    order = spread(homes)
    everyone = list(range(len(homes)))
    if context_bytes <= 0 or len(homes) < 2:
        return everyone
    first = demands_for(rooms_for(usable, homes, context_bytes))
    if any(d is None for d, demand in zip(durations, first, strict=True) if demand.count):
        return everyone  # a first run: how long tests take is not known yet
    if len(durations) * len(homes) ** 2 > PLAN_LIMIT:
        return everyone
    known = [d or 0.0 for d in durations]
    found: list[tuple[float, int]] = []
    best = math.inf
    for w in range(len(homes), 0, -1):
        chosen = [homes[i] for i in order[:w]]
        rooms = rooms_for(usable, chosen, context_bytes)
        gpu = set(order[:w])
        team = [(home, i in gpu) for i, home in enumerate(homes)]
        # A play slower than the best so far by more than the tolerance is never chosen: cut it short.
        span = dispatch_makespan(rooms, demands_for(rooms), known, team, limit=best * (1 + TOLERANCE))
        best = min(best, span)
        found.append((span, w))
    if best == math.inf:
        return everyone
    w = max(w for span, w in found if span <= best * (1 + TOLERANCE))
    return sorted(order[:w])


def dispatch_makespan(
    rooms: Mapping[str, int],
    demands: Sequence[Demand],
    durations: Sequence[float],
    workers: Sequence[tuple[str, bool]],
    limit: float = math.inf,
) -> float:
    """How long :class:`~.dispatcher.Dispatcher` takes over the tests on ``workers`` (home
    uuid, whether it runs GPU tests), played as the session plays it: xdist's worker starts its
    first test only with the next one in hand (or once told that nothing more will come), the
    broker starts a test once its memory is free, and after each completion the worker and every
    hungry worker are filled. Infinite where the play stalls or passes ``limit``."""
    core: Dispatcher[int] = Dispatcher(rooms, demands, durations, workers=len(workers))
    for w, (home, gpu) in enumerate(workers):
        core.add_worker(w, home, gpu=gpu)
    free = dict(rooms)
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

    for w in range(len(workers)):
        check(w)
    while core.busy:
        for w in range(len(workers)):
            head = core.head(w)
            if w in busy or head is None or (len(core.queue(w)) < 2 and w not in closed):
                continue
            index, parts = head
            if all(need <= free[u] for u, need in parts):
                for u, need in parts:
                    free[u] -= need
                busy.add(w)
                heapq.heappush(running, (now + durations[index], w, index, parts))
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
