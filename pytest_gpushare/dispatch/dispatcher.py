"""Which pending test each xdist worker gets, and when: the decisions of memory-aware dispatch.

Pure: test indices, worker keys, bytes and seconds in, decisions out; no xdist, no pytest, no
clock (``now`` is an argument). :mod:`pytest_gpushare.dispatch.scheduling` drives it from xdist's
scheduler calls. See docs/concepts/dispatch.rst for the reasoning.

* **Order.** Pending tests wait in one line per distinct :class:`~.order.Demand` (a *class*),
  longest first; a worker is offered the classes heaviest head first (:func:`~.order.weight`).
* **Fit.** A test goes to a worker only if, over the window in which the worker is expected to
  run it (after the tests queued ahead of it, from their durations), it fits beside what the
  workers are expected to hold then (:class:`~.fit.Timeline`); a test of unknown duration, and
  what is queued behind it, counts from its earliest start until it completes (the holds).
* **GPU workers.** Only the workers added with ``gpu=True`` are sent GPU tests; the others run
  tests without GPU work (a worker that leases nothing books no CUDA context: see
  :mod:`~.plan`). With a :class:`~.lines.Joining`, they join the GPU workers once no pending
  GPU test needs more than its threshold: from then on the rooms count their contexts too (the
  tests' demands with them), so a joining worker's first GPU test goes out only once it fits
  the smaller room, as the large tests still held drain.
* **Depth.** A worker is filled to two tests (xdist's worker cannot start a test before it has
  the next one), and beyond that while its queue is expected to take less than
  :data:`LOOKAHEAD_S`, up to xdist's own high-water mark (at least three), so that very short
  tests do not leave it waiting for the controller between two of them; it is refilled once its
  queue is expected to take less than half that (short tests go out in batches).
* **Stall.** A worker left with one test cannot start it (xdist's worker waits for the next
  one); if nothing that fits is pending, it waits for the next completion, which frees room.
  Only when no worker runs anything (no completion would come) is every such worker sent a test
  that does not fit: the smallest pending one. It may wait for memory in the broker; a worker
  whose first test is such a test does not count as running.
* **Starvation.** A class passed over (a later class was sent while its head did not fit, and
  it would have fitted but for what workers holding less than it hold) for
  :data:`STARVE_S` is *reserved*: its room on the GPUs it will use is kept until one of its
  tests is sent. Other workers there are sent only what fits beside it, or what is smaller than
  what they hold and fits without it (so their holds shrink as their queues run). A worker
  holds at least the test it holds next, so should every worker stall before the room is free
  (its need does not fit beside the others' smallest tests), the reservation is given up for
  another STARVE_S.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pytest_gpushare.dispatch.fit import Holds, Parts, Timeline
from pytest_gpushare.dispatch.lines import Joining, Line, make_lines, regroup
from pytest_gpushare.dispatch.order import Demand, guess_duration
from pytest_gpushare.dispatch.queues import Sent, WorkerQueue

__all__ = ["LOOKAHEAD_S", "STARVE_S", "Dispatcher"]

#: A test passed over this long keeps its room until it is sent.
STARVE_S = 2.0
#: A worker is kept fed with this many seconds of expected work after its running test.
LOOKAHEAD_S = 0.5

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class _Reservation:
    cls: Line
    parts: Mapping[str, int]


class Dispatcher(Generic[W]):
    """The pending tests of one session and what each worker was sent.

    ``rooms``: bytes per GPU uuid the session's tests may hold at once. ``demands[i]`` and
    ``durations[i]``: test ``i``'s demand and expected duration (None: unknown; it is expected to
    take :func:`~.order.guess_duration` of the known ones for its place in line, and, for how
    deep queues go, the mean of what the unknown tests completed so far took). ``workers``: how
    many workers the session runs (for the weights). ``joining``: when the workers added without
    GPU work join the others (None: never).
    """

    def __init__(
        self,
        rooms: Mapping[str, int],
        demands: Sequence[Demand],
        durations: Sequence[float | None],
        *,
        workers: int,
        starve_after: float = STARVE_S,
        lookahead: float = LOOKAHEAD_S,
        joining: Joining | None = None,
    ) -> None:
        self._holds: Holds[W] = Holds(rooms)
        self._timeline: Timeline[W] = Timeline(rooms)
        self._stale: set[W] = set()  # workers whose lane is to be worked out again
        self._now: float | None = None  # the clock when the lanes were worked out
        guess = guess_duration(d for d in durations if d is not None)
        self._durations = [guess if d is None else d for d in durations]
        self._unknown = [d is None for d in durations]
        self._seen: list[float] = [0.0, 0.0]  # what unknown tests took: sum, count
        self._guess = guess
        self._starve_after = starve_after
        self._lookahead = lookahead
        self._workers: dict[W, WorkerQueue] = {}
        self._reserved: _Reservation | None = None
        self._weigh_with = workers
        self._classes, self._class_of = make_lines(
            rooms, demands, workers, range(len(demands)), self._line_key
        )
        self.pending = len(demands)
        self._joining = joining
        #: Whether every worker runs GPU tests from now on (the joining happened).
        self.joined = False
        self._large = 0 if joining is None else sum(map(self._is_large, range(len(demands))))
        self._join_if_due()

    # --- workers -----------------------------------------------------------------------------

    def add_worker(self, worker: W, home: str | None, *, gpu: bool = True) -> None:
        """A worker at ``home`` (a GPU uuid); ``gpu``: it is sent GPU tests, else only tests
        without GPU work (until the joining, after which every worker is)."""
        self._workers[worker] = WorkerQueue(home if home in self._holds.rooms else None, gpu or self.joined)
        self._stale.add(worker)

    def gpu_workers_at(self, home: str | None) -> int:
        """How many workers at ``home`` are sent GPU tests."""
        return sum(1 for s in self._workers.values() if s.gpu and s.home == home)

    def close(self, worker: W) -> None:
        """``worker`` was told to shut down: it runs what it has and is sent nothing more."""
        self._workers[worker].closing = True
        self._stale.add(worker)

    def remove_worker(self, worker: W) -> int | None:
        """``worker`` is gone. Its first unfinished test (the one it was running when it died) is
        returned; the others wait again."""
        state = self._workers.pop(worker)
        self._holds.forget(worker)
        self._timeline.forget(worker)
        self._stale.discard(worker)
        if not state.queue:
            return None
        crashed = state.queue.popleft()
        for sent in state.queue:
            self._wait_again(sent.index)
        return crashed.index

    def queue(self, worker: W) -> list[int]:
        return [s.index for s in self._workers[worker].queue]

    def head(self, worker: W) -> tuple[int, Parts] | None:
        """``worker``'s first test and where it was placed (``(uuid, bytes)`` parts), if any."""
        queue = self._workers[worker].queue
        return (queue[0].index, queue[0].parts) if queue else None

    def hungry(self, exclude: Collection[W] = ()) -> list[W]:
        """The workers (not closing, not in ``exclude``) that would take more tests."""
        return [
            w for w, state in self._workers.items() if w not in exclude and self._wants_more(state, low=True)
        ]

    @property
    def done(self) -> bool:
        """Nothing waits to be sent and no worker has a test after its last one."""
        return not self.pending and all(len(s.queue) < 2 for s in self._workers.values())

    @property
    def busy(self) -> bool:
        """Some test is pending or sent and not yet completed."""
        return bool(self.pending) or any(s.queue for s in self._workers.values())

    # --- events ------------------------------------------------------------------------------

    def completed(self, worker: W, index: int, duration: float | None = None) -> None:
        """``worker`` finished test ``index`` (normally the first of its queue) in ``duration``."""
        self._take_out(self._workers[worker], worker, [index])
        if duration is not None and self._unknown[index]:
            self._seen[0] += duration
            self._seen[1] += 1
            self._guess = self._seen[0] / self._seen[1]

    def take_back(self, worker: W, indices: Sequence[int]) -> None:
        """Tests taken back from ``worker``'s queue (xdist's steal answer) wait again."""
        self._take_out(self._workers[worker], worker, indices)
        for index in indices:
            self._wait_again(index)

    def requeue(self, index: int) -> None:
        """Test ``index`` is to run again (a plugin asked, as after a crash)."""
        self._wait_again(index)

    def steal_plan(self, waiting: Collection[W]) -> tuple[W, list[int]] | None:
        """Tests to take back from a worker whose running test waits for memory: those not yet
        in its hands (after its running test and the next one, which xdist's worker already
        holds); None when no waiting worker has any."""
        for w in waiting:
            state = self._workers.get(w)
            if state is not None and len(state.queue) > 2:
                return w, [s.index for s in list(state.queue)[2:]]
        return None

    # --- sending -----------------------------------------------------------------------------

    def fill(self, worker: W, now: float, limit: int | None = None, *, refill: bool = False) -> list[int]:
        """The tests to send ``worker`` now, in order: at most ``limit`` (None: up to its depth).

        A caller that hands tests out a few at a time, to each worker in turn, passes
        ``refill=True`` after the first call of a round: the worker's queue is then filled up to
        its depth, not only when it ran below half of it."""
        state = self._workers[worker]
        if state.closing or not self.pending:
            return []
        self._reserve_starved(now)
        if not self._wants_more(state, low=not refill):
            return []
        sent = self._fill_fitting(worker, state, now, limit)
        if limit is not None and len(sent) >= limit:
            return sent  # its turn is over: the stall rule waits until every worker had one
        if len(state.queue) == 1 and self.pending and self._nothing_runs():
            if self._reserved is not None:
                # The reserved test does not fit beside what the stalled workers hold, and only
                # sending them more would free it: give up the reservation, for STARVE_S.
                self._reserved.cls.passed_since = now
                self._reserved = None
                sent += self._fill_fitting(worker, state, now)
            picked = self._stall_pick(worker, state) if len(state.queue) == 1 and self.pending else None
            if picked is not None:
                sent.append(self._send(worker, state, *picked, forced=True))
        return sent

    def _fill_fitting(self, worker: W, state: WorkerQueue, now: float, limit: int | None = None) -> list[int]:
        sent: list[int] = []
        while self.pending and self._wants_more(state) and (limit is None or len(sent) < limit):
            self._refresh_lanes(now)
            chosen = self._best(worker, state, now)
            if chosen is None:
                break
            sent.append(self._send(worker, state, *chosen))
        return sent

    def _wants_more(self, state: WorkerQueue, *, low: bool = False) -> bool:
        """Whether ``state``'s queue is below its depth (``low``: below half the lookahead, when
        a refill starts: short tests then go out in batches, as xdist's load sends them)."""
        if state.closing:
            return False
        depth = len(state.queue)
        if depth < 2:
            return True
        high = max(3, self.pending // max(1, len(self._workers)) // 2)
        return depth < high and state.queued_s < (self._lookahead / 2 if low else self._lookahead)

    def _best(self, worker: W, state: WorkerQueue, now: float) -> tuple[Line, Parts] | None:
        """The heaviest class whose head fits ``worker``; classes above it that did not fit
        have been passed over from now on."""
        skipped: list[Line] = []
        for cls in self._offer_order():
            parts = self._place(worker, state, cls, fitting=True)
            if parts is not None:
                for other in skipped:
                    if other.passed_since is None and self._kept_out_by_smaller(state, other):
                        other.passed_since = now
                return cls, parts
            if state.gpu or not cls.demand.count:  # not sent a GPU test at all: not passed over
                skipped.append(cls)
        return None

    def _kept_out_by_smaller(self, state: WorkerQueue, cls: Line) -> bool:
        """Whether ``cls``'s head would fit on a GPU it may use if the workers that hold less
        than it there gave their room up: then smaller tests keep it out (it is passed over);
        otherwise larger ones do, and waiting for them is its place in line."""
        d = cls.demand
        gpus = (
            [state.home]
            if d.count == 1 and not d.anywhere and state.home is not None
            else list(self._holds.rooms)
        )
        return any(0 < d.on(u) <= self._holds.rooms[u] - self._holds.held_by_larger(u, d.on(u)) for u in gpus)

    def _offer_order(self) -> Iterator[Line]:
        reserved = self._reserved.cls if self._reserved is not None else None
        if reserved is not None and reserved.tests:
            yield reserved
        live = [c for c in self._classes if c.tests and c is not reserved]
        live.sort(key=lambda c: c.head_weight(self._durations), reverse=True)
        yield from live

    def _stall_pick(self, worker: W, state: WorkerQueue) -> tuple[Line, Parts] | None:
        """For a worker left with one test when nothing fits and nothing runs anywhere: the
        smallest pending test it may run (None: none, it runs no GPU tests)."""
        allowed = [c for c in self._classes if c.tests and (state.gpu or not c.demand.count)]
        if not allowed:
            return None
        cls = min(allowed, key=lambda c: c.demand.largest)
        parts = self._place(worker, state, cls, fitting=False)
        assert parts is not None  # placed without fitting: always somewhere
        return cls, parts

    def _send(self, worker: W, state: WorkerQueue, cls: Line, parts: Parts, *, forced: bool = False) -> int:
        index = cls.tests.pop()
        self.pending -= 1
        self._large -= self._is_large(index)
        known = not self._unknown[index]
        state.append(Sent(index, parts, self._durations[index] if known else self._guess, known, forced))
        self._holds.add(worker, parts)
        self._stale.add(worker)
        cls.passed_since = None
        if self._reserved is not None and (self._reserved.cls is cls or not self._reserved.cls.tests):
            self._reserved = None
        self._join_if_due()
        return index

    # --- placing -----------------------------------------------------------------------------

    def _place(self, worker: W, state: WorkerQueue, cls: Line, *, fitting: bool) -> Parts | None:
        """Where ``cls``'s head would go on ``worker``: ``(uuid, bytes)`` parts (empty: no GPU
        memory that dispatch models), or None when it does not fit (``fitting``)."""
        d = cls.demand
        if d.count == 0:
            return ()
        if not state.gpu:
            return None
        kept = self._kept_for_others(cls)
        window = self._window(worker, cls) if fitting else (0.0, 0.0)
        if d.count == 1 and not d.anywhere:
            home = state.home
            if home is None or not d.on(home):
                return ()
            ok = not fitting or self._fits(worker, home, d.on(home), kept.get(home, 0), window)
            return ((home, d.on(home)),) if ok else None
        chosen = [
            u
            for u in self._by_room(state.home, kept)
            if d.on(u) and (not fitting or self._fits(worker, u, d.on(u), kept.get(u, 0), window))
        ][: d.count]
        if fitting and len(chosen) < d.count:
            return None
        return tuple((u, d.on(u)) for u in chosen)

    def _fits(self, worker: W, uuid: str, need: int, kept: int, window: tuple[float, float]) -> bool:
        """Whether ``worker`` may be sent ``need`` bytes on ``uuid`` to run over ``window`` with
        ``kept`` bytes held back there for a reserved test: it fits beside it, or it is smaller
        than what the worker holds there and fits without it (it raises no hold; once the larger
        tests ahead of it end, the worker holds less, which is how a reservation's room is
        freed)."""
        timeline = self._timeline
        if timeline.fits(worker, uuid, window, need, kept):
            return True
        return (
            kept > 0 and need < self._holds.hold(worker, uuid) and timeline.fits(worker, uuid, window, need)
        )

    def _window(self, worker: W, cls: Line) -> tuple[float, float]:
        """When ``worker`` is expected to run ``cls``'s head if it is sent it now."""
        index = cls.tests[-1]
        found = self._timeline.lane_of(worker)
        assert found is not None  # the lanes are worked out before each choice
        return found.window(None if self._unknown[index] else self._durations[index])

    def _refresh_lanes(self, now: float) -> None:
        """Work out again the lanes of the workers whose queue changed, of all when the clock moved
        (a running test's expected end, and with it what follows, depends on it)."""
        if now != self._now:
            self._now = now
            self._stale.update(self._workers)
        for worker in self._stale:
            self._timeline.set(worker, self._workers[worker].lane(now))
        self._stale.clear()

    def _by_room(self, home: str | None, kept: Mapping[str, int]) -> list[str]:
        """The GPUs, the home first, then those with the most room left."""
        rest = sorted(
            (u for u in self._holds.rooms if u != home), key=lambda u: -self._holds.free(u, kept.get(u, 0))
        )
        return ([home] if home is not None else []) + rest

    # --- starvation --------------------------------------------------------------------------

    def _reserve_starved(self, now: float) -> None:
        if self._reserved is not None and self._reserved.cls.tests:
            return
        self._reserved = None
        starved = [
            c
            for c in self._classes
            if c.tests and c.passed_since is not None and now - c.passed_since >= self._starve_after
        ]
        if not starved:
            return
        cls = min(starved, key=lambda c: c.passed_since or 0.0)
        d = cls.demand
        if d.count == 1 and not d.anywhere:
            homes = {s.home for s in self._workers.values() if s.gpu and s.home is not None and d.on(s.home)}
            gpus = sorted(homes, key=lambda u: -self._holds.free(u))[:1]
        else:
            gpus = [u for u in self._by_room(None, {}) if d.on(u)][: d.count]
        self._reserved = _Reservation(cls, {u: d.on(u) for u in gpus})

    def _kept_for_others(self, cls: Line) -> Mapping[str, int]:
        """What a reservation keeps on each GPU from tests other than its own."""
        if self._reserved is None or self._reserved.cls is cls:
            return {}
        return self._reserved.parts

    def _nothing_runs(self) -> bool:
        """No worker will complete a test without being sent one: each has at most one, which it
        cannot start (xdist's worker starts it only with the next one in hand), or its first was
        sent although it did not fit (it may wait for memory that only they would free)."""
        return not any(
            (len(s.queue) >= 2 or (s.closing and s.queue)) and not s.queue[0].forced
            for s in self._workers.values()
        )

    # --- pending lines -----------------------------------------------------------------------

    def _line_key(self, index: int) -> tuple[float, int]:
        # Shortest first and, among equals, the later in collection order first: pop() takes the
        # longest, and of equals the earliest collected (xdist's order where nothing is known).
        return (self._durations[index], -index)

    def _wait_again(self, index: int) -> None:
        cls = self._class_of[index]
        bisect.insort(cls.tests, index, key=self._line_key)
        self.pending += 1
        self._large += self._is_large(index)

    # --- the joining -------------------------------------------------------------------------

    def _is_large(self, index: int) -> bool:
        """Whether test ``index`` keeps the workers without GPU work from joining."""
        if self._joining is None or self.joined:
            return False
        d = self._class_of[index].demand
        return d.count > 0 and d.largest > self._joining.threshold

    def _join_if_due(self) -> None:
        """Once no pending test is large, every worker runs GPU tests: the rooms count every
        worker's context, and the pending tests wait again under their demands there."""
        joining = self._joining
        if joining is None or self.joined or self._large > 0:
            return
        self.joined = True
        self._reserved = None
        self._holds.rooms = dict(joining.rooms)
        self._timeline.rooms = dict(joining.rooms)
        self._classes, self._class_of = regroup(self._classes, joining, self._weigh_with, self._line_key)
        for state in self._workers.values():
            state.gpu = True
        self._stale.update(self._workers)

    def _take_out(self, state: WorkerQueue, worker: W, indices: Sequence[int]) -> None:
        self._stale.add(worker)
        for sent in state.take_out(indices):
            self._holds.remove(worker, sent.parts)
