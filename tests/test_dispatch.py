"""The pure part of memory-aware dispatch: order, fit, depth, stalls, starvation, crashes.

The runs here are simulated: :func:`simulate` plays xdist's workers (a worker starts the first
test of its queue only with the next one in hand, or once told to shut down) and the broker (a
test starts only when the memory it needs is free, else it waits), and drives the dispatcher as
pytest_gpushare.dispatch.scheduling does after each completion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from pytest_gpushare.dispatch.dispatcher import Dispatcher
from pytest_gpushare.dispatch.fit import OVERRUN_S, Holds, Timeline, lane
from pytest_gpushare.dispatch.lines import Joining
from pytest_gpushare.dispatch.order import (
    NO_GPU,
    Demand,
    MarkedNeed,
    demand_of,
    guess_duration,
    memory_binds,
    weight,
)
from pytest_gpushare.dispatch.plan import Plan, dispatch_makespan, make_plan, rooms_for, spread
from pytest_gpushare.units import GiB, MemRequest, MiB

G = "GPU-0"


def one_gpu(gib: float) -> Demand:
    return Demand(((G, int(gib * GiB)),), 1)


# --- order ----------------------------------------------------------------------------------------


def test_weight_puts_larger_and_longer_first() -> None:
    rooms = {G: 21 * GiB}
    mix = {"14GiB/3s": (one_gpu(14), 3.0), "6GiB/1s": (one_gpu(6), 1.0), "1GiB/0.2s": (one_gpu(1), 0.2)}
    ranked = sorted(mix, key=lambda k: -weight(*mix[k], rooms, workers=7))
    assert ranked == ["14GiB/3s", "6GiB/1s", "1GiB/0.2s"]
    # a long test without GPU work still takes a worker for its whole duration: it goes early
    assert weight(NO_GPU, 10.0, rooms, workers=4) > weight(one_gpu(14), 3.0, rooms, workers=4)


def test_unknown_durations_are_the_median_of_the_known_else_one_second() -> None:
    assert guess_duration([0.1, 5.0, 0.3]) == 0.3
    assert guess_duration([]) == 1.0


def test_demand_resolves_percent_per_gpu_and_exclusive_takes_the_room() -> None:
    totals = {"a": 24 * GiB, "b": 80 * GiB}
    rooms = {"a": 20 * GiB, "b": 70 * GiB}
    half = demand_of(MarkedNeed(MemRequest(percent=50.0)), totals, rooms)
    assert half.mem == (("a", 12 * GiB), ("b", 40 * GiB)) and half.count == 1
    alone = demand_of(MarkedNeed(MemRequest(bytes=GiB), exclusive=True, anywhere=True), totals, rooms)
    assert alone.mem == (("a", 20 * GiB), ("b", 70 * GiB)) and alone.anywhere
    huge = demand_of(MarkedNeed(MemRequest(bytes=60 * GiB)), totals, rooms)
    assert huge.on("a") == 20 * GiB  # clamped to the room: it runs alone there, or waits
    assert demand_of(MarkedNeed(MemRequest(bytes=GiB), count=3), totals, rooms) == NO_GPU  # never runs
    assert demand_of(None, totals, rooms) == NO_GPU


def test_memory_binds_only_where_the_workers_largest_tests_do_not_fit_together() -> None:
    rooms = {G: 22 * GiB}
    assert not memory_binds([one_gpu(1), NO_GPU], [G, G], rooms)
    assert memory_binds([one_gpu(12)], [G, G], rooms)
    assert not memory_binds([one_gpu(12)], [G], rooms)
    two = Demand(((G, GiB), ("GPU-1", GiB)), 2)
    assert memory_binds([two], [G], {G: 22 * GiB, "GPU-1": 22 * GiB})


# --- fit ------------------------------------------------------------------------------------------


def test_a_worker_holds_the_largest_need_of_its_queue() -> None:
    holds: Holds[str] = Holds({G: 10})
    holds.add("w1", [(G, 6)])
    holds.add("w1", [(G, 2)])
    assert (holds.hold("w1", G), holds.total(G)) == (6, 6)
    assert holds.fits("w1", G, 9)  # w1 runs one test at a time: 9 replaces its 6
    assert holds.fits("w2", G, 4) and not holds.fits("w2", G, 5)
    assert not holds.fits("w2", G, 4, kept=1)
    holds.remove("w1", [(G, 6)])
    assert (holds.hold("w1", G), holds.total(G)) == (2, 2)
    holds.forget("w1")
    assert holds.total(G) == 0


def test_a_queued_test_counts_from_its_expected_start_and_the_last_until_it_completes() -> None:
    small, large = ((G, 1 * GiB),), ((G, 16 * GiB),)
    queue = lane([(small, 1.0), (large, 2.0)], since=0.0, now=0.5)
    assert queue.mine == {G: [(0.0, 1.0, GiB), (1.0, 3.0, 16 * GiB)]}
    # The others count the last from its start on: xdist's worker starts it only with another
    # test in hand, and may hold its memory (a carried lease) until then.
    assert queue.segments == {G: [(0.0, 1.0, GiB), (1.0, math.inf, 16 * GiB)]}
    assert (queue.next_start, queue.certain) == (3.0, True)
    assert queue.window(0.5) == (3.0, 3.5)
    # A running test that overran is expected to end soon.
    assert lane([(small, 1.0)], since=0.0, now=4.0).mine == {G: [(0.0, 4.0 + OVERRUN_S, GiB)]}
    # Unknown durations: from the earliest start until completed, the largest so far (the holds).
    unknown = lane([(small, None), (large, 1.0), (small, None)], since=0.0, now=0.5)
    assert unknown.mine == {G: [(0.0, 0.0, GiB), (0.0, math.inf, 16 * GiB)]}
    assert unknown.window(1.0) == (1.0, math.inf)

    timeline: Timeline[str] = Timeline({G: 17 * GiB})
    timeline.set("gw0", queue)
    # 1GiB fits beside gw0's small test at once, and while its large one runs; 2GiB only before
    assert timeline.fits("gw1", G, (0.0, 1.0), 2 * GiB) and timeline.fits("gw1", G, (2.0, 2.5), GiB)
    assert not timeline.fits("gw1", G, (0.5, 1.5), 2 * GiB)
    # gw0 itself runs one test at a time: a test after its queue counts beside nothing of its own
    assert timeline.fits("gw0", G, queue.window(1.0), 17 * GiB)


def test_a_large_test_goes_out_behind_a_small_one_that_runs_beside_others() -> None:
    # gw1 holds a 2GiB test running and a 1GiB one next; gw0 runs an 8GiB test for 1 s. A 16GiB
    # test queued behind gw0's runs when gw1's 2GiB test has ended: 1 + 16 <= 17. Counted from
    # when it is sent (the holds), 2 + 16 would not fit, and gw0 could not start its 8GiB test.
    demands = [one_gpu(8), one_gpu(2), one_gpu(1), one_gpu(16)]
    d: Dispatcher[str] = Dispatcher({G: 17 * GiB}, demands, [1.0, 1.0, 0.9, 0.2], workers=4)
    d.add_worker("gw0", G)
    d.add_worker("gw1", G)
    assert d.fill("gw0", 0.0, limit=1) == [0]
    assert d.fill("gw1", 0.0) == [1, 2]
    assert d.fill("gw0", 0.0, refill=True) == [3]
    holds: Holds[str] = Holds({G: 17 * GiB})
    holds.add("gw1", [(G, 2 * GiB)])
    holds.add("gw1", [(G, GiB)])
    holds.add("gw0", [(G, 8 * GiB)])
    assert not holds.fits("gw0", G, 16 * GiB)


def test_workers_without_gpu_work_are_sent_only_tests_without_gpu_work() -> None:
    demands = [one_gpu(1), NO_GPU, one_gpu(1), NO_GPU]
    d: Dispatcher[str] = Dispatcher({G: 21 * GiB}, demands, [1.0] * 4, workers=2)
    d.add_worker("gw0", G, gpu=False)
    assert d.fill("gw0", 0.0) == [1, 3]
    assert d.fill("gw0", 0.0) == [] and d.pending == 2
    d.add_worker("gw1", G)
    assert d.fill("gw1", 0.0) == [0, 2]


def mix_needs() -> tuple[list[MarkedNeed], list[float]]:
    demands, durations = realistic_mix()
    return [MarkedNeed(MemRequest(bytes=d.on(G))) for d in demands], durations


def test_the_plan_runs_gpu_tests_on_fewer_workers_where_contexts_crowd_the_card() -> None:
    needs, durations = mix_needs()
    usable = {G: 21 * GiB}

    def demands(rooms: Mapping[str, int]) -> list[Demand]:
        return [demand_of(n, {G: 24 * GiB}, rooms) for n in needs]

    # 7 contexts of 512MiB leave 17.5GiB: no 6GiB test beside a 14GiB one (about 23 s); 2 leave
    # 20GiB: 19 s. Better still, 2 until the 14GiB and 6GiB tests are out (15 s side by side),
    # then all 7, whose contexts fit once those have ended, run the 1GiB tests (1.2 s).
    plan = make_plan([G] * 7, usable, 512 * MiB, demands, durations)
    assert plan == Plan((0, 1), GiB)
    assert plan.describe(7) == ", GPU tests on 2 of 7 workers, all 7 once no test over 1.0GiB waits"
    two = rooms_for(usable, [G, G], 512 * MiB)
    seven = rooms_for(usable, [G] * 7, 512 * MiB)
    team = [(G, i in plan.gpu) for i in range(7)]
    joining = Joining(GiB, seven, demands(seven))
    phased = dispatch_makespan(two, demands(two), durations, team, joining=joining, context_bytes=512 * MiB)
    assert phased < 17.5
    assert dispatch_makespan(two, demands(two), durations, team) == pytest.approx(19.0)
    assert make_plan([G] * 7, usable, 0, demands, durations) == Plan(tuple(range(7)))
    # A first run: how long tests take is not known, every worker runs GPU tests.
    assert make_plan([G] * 7, usable, 512 * MiB, demands, [None] * len(needs)) == Plan(tuple(range(7)))
    assert Plan(tuple(range(7))).describe(7) == ""
    assert Plan((0, 1)).describe(7) == ", GPU tests on 2 of 7 workers (fewer CUDA contexts)"
    assert rooms_for(usable, [G, G], 512 * MiB) == {G: 20 * GiB}
    assert spread(["a", "a", "b", "b", "a"]) == [0, 2, 1, 3, 4]  # any first w spread over the GPUs


def test_workers_join_once_no_large_test_waits_and_only_where_the_smaller_room_fits() -> None:
    # 10GiB usable, contexts of 1GiB: gw0 alone leaves 9GiB, both leave 8GiB. gw1 joins once the
    # 8GiB test is out; its 2GiB test goes out once gw0's 8GiB test has ended (8 + 2 > 8).
    needs = [MarkedNeed(MemRequest(bytes=8 * GiB)), MarkedNeed(MemRequest(bytes=2 * GiB))] * 2
    needs.append(MarkedNeed(MemRequest(bytes=GiB), exclusive=True))

    def demands(rooms: Mapping[str, int]) -> list[Demand]:
        return [demand_of(n, {G: 12 * GiB}, rooms) for n in needs]

    one, both = {G: 9 * GiB}, {G: 8 * GiB}
    d: Dispatcher[str] = Dispatcher(
        one, demands(one), [0.1] * 5, workers=2, joining=Joining(2 * GiB, both, demands(both))
    )
    d.add_worker("gw0", G)
    d.add_worker("gw1", G, gpu=False)
    assert d.fill("gw1", 0.0) == [] and not d.joined  # no GPU work for it yet
    assert d.fill("gw0", 0.0, limit=2) == [4, 0]  # the exclusive test (the whole 9GiB), an 8GiB one
    assert not d.joined
    assert d.fill("gw0", 0.0, refill=True, limit=1) == [2]  # the last 8GiB test: none waits now
    assert d.joined
    assert d.fill("gw1", 0.0) == []  # 8GiB held and 2GiB more overfill the smaller room
    for index in (4, 0, 2):
        d.completed("gw0", index, 0.1)
    assert d.fill("gw1", 0.3) == [1, 3]
    # After the joining, a worker added (a crashed one's replacement) runs GPU tests, and a test
    # that waits again takes its demand in the smaller room (an exclusive one, all of it).
    d.completed("gw1", 1, 0.1)
    d.completed("gw1", 3, 0.1)
    d.add_worker("gw2", G, gpu=False)
    d.requeue(4)
    assert d.fill("gw2", 0.5) == [4]
    assert d.head("gw2") == (4, ((G, 8 * GiB),))


# --- a simulated run ------------------------------------------------------------------------------


@dataclass
class Run:
    """What happened in a simulated run."""

    start: dict[int, float] = field(default_factory=dict)
    end: dict[int, float] = field(default_factory=dict)
    worker: dict[int, str] = field(default_factory=dict)
    waited: dict[int, float] = field(default_factory=dict)  # for memory, in the broker
    stuck: list[int] = field(default_factory=list)  # queued next behind a test that waited
    peak: int = 0

    @property
    def makespan(self) -> float:
        return max(self.end.values())


def simulate(
    dispatcher: Dispatcher[str],
    demands: list[Demand],
    durations: list[float],
    workers: int,
    room: int,
    limit: float = 1000.0,
) -> Run:
    """Play the run to its end; fails on a deadlock (nothing runs, tests left).

    The broker is played as the session's broker behaves: a test asks for its memory when it
    starts and waits while it does not fit; a worker hands its lease on to its next test when
    that one needs the same and nobody waits for memory (so a worker that holds a test it
    cannot start yet may still hold its predecessor's memory).
    """
    names = [f"gw{i}" for i in range(workers)]
    for w in names:
        dispatcher.add_worker(w, G)
    run = Run()
    running: dict[str, tuple[int, float]] = {}  # worker -> (test, end)
    held: dict[str, int] = dict.fromkeys(names, 0)  # the memory each worker's lease holds
    asked: dict[str, float] = {}  # worker -> when its first test began to wait for memory
    closed: set[str] = set()
    now = 0.0

    def check(w: str) -> None:
        if w in closed:
            return
        if dispatcher.pending:
            dispatcher.fill(w, now)
        else:
            dispatcher.close(w)
            closed.add(w)

    def start_what_can() -> None:
        for w in names:  # xdist's rule first, then the broker's
            queue = dispatcher.queue(w)
            if w in running or not queue or (len(queue) < 2 and w not in closed):
                continue
            index = queue[0]
            need = demands[index].on(G)
            if held[w] != need and sum(held.values()) - held[w] + need > room:
                asked.setdefault(w, now)
                continue
            since = asked.pop(w, now)
            run.waited[index] = now - since
            if now > since and len(queue) > 1:
                run.stuck.append(queue[1])
            run.start[index], run.worker[index] = now, w
            running[w] = (index, now + durations[index])
            held[w] = need
            run.peak = max(run.peak, sum(held.values()))

    for w in names:
        check(w)
    while len(run.end) < len(demands):
        start_what_can()
        if not running:
            pytest.fail(f"deadlock at {now:.2f}s: {len(demands) - len(run.end)} tests left")
        w, (index, now) = min(running.items(), key=lambda kv: kv[1][1])
        del running[w]
        run.end[index] = now
        dispatcher.completed(w, index)
        queue = dispatcher.queue(w)
        if asked or not queue or demands[queue[0]].on(G) != held[w]:
            held[w] = 0  # given back; otherwise carried to the next test
        check(w)
        for other in dispatcher.hungry():
            check(other)
        assert now < limit
    return run


def realistic_mix() -> tuple[list[Demand], list[float]]:
    """Issue 14's mix: 40 × 1GiB/0.2 s, 15 × 6GiB/1 s, 5 × 14GiB/3 s, in a shuffled order."""
    tests = [(1, 0.2)] * 40 + [(6, 1.0)] * 15 + [(14, 3.0)] * 5
    random.Random(14).shuffle(tests)
    return [one_gpu(g) for g, _ in tests], [s for _, s in tests]


def test_the_realistic_mix_runs_near_its_lower_bound_and_no_small_test_is_stuck() -> None:
    demands, durations = realistic_mix()
    room, workers = int(17.5 * GiB), 7  # 21GiB usable, 7 contexts of 512MiB
    run = simulate(
        Dispatcher({G: room}, demands, durations, workers=workers), demands, durations, workers, room
    )
    # A lower bound: no two 14GiB tests overlap (5 × 3 s), a 6GiB test never runs beside one
    # (14 + 6 > 17.5) and at most two 6GiB tests run at once (15 × 1 s / 2).
    bound = 5 * 3.0 + 15 * 1.0 / 2
    assert run.makespan <= 1.05 * bound, (run.makespan, bound)
    assert run.peak <= room
    small = {i for i, d in enumerate(demands) if d.on(G) == GiB}
    assert not small & set(run.stuck)
    assert not [i for i in small if run.waited[i] > 0]


def test_tests_go_out_larger_and_longer_first() -> None:
    demands = [one_gpu(1)] * 4 + [one_gpu(14)] * 2
    durations = [0.2] * 4 + [3.0] * 2
    d: Dispatcher[str] = Dispatcher({G: 21 * GiB}, demands, durations, workers=2)
    d.add_worker("gw0", G)
    d.add_worker("gw1", G)
    # gw0 takes both 14GiB tests (it runs them one after the other); they do not fit beside
    # each other, so gw1 gets small ones (three: two take less than LOOKAHEAD_S)
    assert d.fill("gw0", 0.0) == [4, 5]
    assert d.fill("gw1", 0.0) == [0, 1, 2]


def test_equal_tests_keep_collection_order() -> None:
    demands = [one_gpu(12)] * 6
    d: Dispatcher[str] = Dispatcher({G: 22 * GiB}, demands, [1.0] * 6, workers=2)
    d.add_worker("gw0", G)
    assert d.fill("gw0", 0.0) == [0, 1]


def test_short_tests_are_queued_deeper_so_the_worker_never_waits_for_the_next() -> None:
    demands = [one_gpu(12)] + [one_gpu(1)] * 200
    durations = [1.0] + [0.001] * 200
    d: Dispatcher[str] = Dispatcher({G: 22 * GiB}, demands, durations, workers=2)
    d.add_worker("gw0", G)
    d.add_worker("gw1", G)
    assert len(d.fill("gw0", 0.0)) == 2  # the 12GiB test and one more: the second takes 1 s
    assert len(d.fill("gw1", 0.0)) > 2  # 1 ms tests: at least LOOKAHEAD_S of work queued


def test_a_worker_left_with_one_test_waits_for_room_while_others_run() -> None:
    # gw0 runs a 14GiB test; gw1 gets a 1GiB test and then nothing: only 14GiB and 10GiB tests
    # are left, neither fits beside gw0's. Sending one anyway would make it wait in the broker
    # with gw1's next test stuck behind it; gw1 waits for gw0's completion instead.
    demands = [one_gpu(14), one_gpu(1), one_gpu(14), one_gpu(10)]
    d: Dispatcher[str] = Dispatcher({G: 21 * GiB}, demands, [3.0, 0.1, 3.0, 2.0], workers=2)
    d.add_worker("gw0", G)
    d.add_worker("gw1", G)
    assert d.fill("gw0", 0.0) == [0, 2]
    assert d.fill("gw1", 0.0) == [1]
    d.completed("gw0", 0)
    # now nothing runs (each worker holds one test it cannot start alone): the smallest goes
    assert d.fill("gw1", 0.0) == [3]


def test_a_test_passed_over_too_long_keeps_its_room_until_it_is_sent() -> None:
    # Two 12GiB tests go to gw0 (one after the other); a 19GiB one does not fit beside them, and
    # then hardly ever beside three workers fed with 1GiB tests and tests without GPU work:
    # after STARVE_S it keeps its room, the others are sent only what leaves it, and it runs.
    demands = [one_gpu(12), one_gpu(12), one_gpu(19)] + [one_gpu(1), NO_GPU] * 150
    durations = [3.0, 3.0, 1.0] + [0.25] * 300
    room, workers = 21 * GiB, 4

    starved = simulate(
        Dispatcher({G: room}, demands, durations, workers=workers, starve_after=math.inf),
        demands,
        durations,
        workers,
        room,
    )
    assert starved.start[2] > 10.0  # without the bound: whenever the small tests happen to leave room
    run = simulate(
        Dispatcher({G: room}, demands, durations, workers=workers), demands, durations, workers, room
    )
    # The bound: passed over from the start, reserved at STARVE_S, sent once what was sent
    # before has run (gw0's two 12GiB tests, until 6 s; the others' queues drain meanwhile), and
    # started after what its worker held (one more test: 0.25 s).
    assert run.start[2] <= 2 * 3.0 + 0.25 + 1e-9, run.start[2]
    assert run.peak <= room and not run.waited[2]
    assert len(run.end) == len(demands)


def test_a_reserved_test_that_cannot_fit_beside_the_smallest_tests_runs_last() -> None:
    # 19GiB never fits beside three 1GiB tests: reserving cannot free its room (each worker
    # holds the test it holds next), so the reservation is given up and the run goes on.
    demands = [one_gpu(12), one_gpu(12), one_gpu(19)] + [one_gpu(1)] * 60
    durations = [3.0, 3.0, 1.0] + [0.25] * 60
    run = simulate(Dispatcher({G: 21 * GiB}, demands, durations, workers=4), demands, durations, 4, 21 * GiB)
    assert len(run.end) == len(demands) and run.peak <= 21 * GiB


@pytest.mark.parametrize("seed", range(20))
def test_random_suites_finish_without_deadlock_or_overcommit(seed: int) -> None:
    rng = random.Random(seed)
    room = rng.choice([8, 16, 24]) * GiB
    workers = rng.randint(1, 6)
    sizes = [rng.choice([0.5, 1, 2, 4, 7, 12, 20]) for _ in range(rng.randint(1, 60))]
    demands = [one_gpu(min(s, room / GiB)) if s else NO_GPU for s in sizes]
    durations = [rng.choice([0.001, 0.05, 0.3, 1.0, 4.0]) for _ in sizes]
    d: Dispatcher[str] = Dispatcher({G: room}, demands, durations, workers=workers, starve_after=1.0)
    run = simulate(d, demands, durations, workers, room)
    assert len(run.end) == len(demands) and run.peak <= room
    assert d.done and not d.busy


def test_a_crashed_workers_tests_wait_again_but_the_one_it_ran() -> None:
    demands = [one_gpu(1)] * 6
    d: Dispatcher[str] = Dispatcher({G: 22 * GiB}, demands, [0.01] * 6, workers=2)
    d.add_worker("gw0", G)
    sent = d.fill("gw0", 0.0)
    assert len(sent) >= 3
    before = d.pending
    assert d.remove_worker("gw0") == sent[0]
    assert d.pending == before + len(sent) - 1
    d.add_worker("gw2", G)
    assert sent[1] in d.fill("gw2", 0.0)


def test_a_waiting_workers_queued_tests_are_taken_back_all_but_the_two_it_holds() -> None:
    demands = [one_gpu(1)] * 10
    d: Dispatcher[str] = Dispatcher({G: 22 * GiB}, demands, [0.001] * 10, workers=2)
    d.add_worker("gw0", G)
    d.add_worker("gw1", G)
    sent = d.fill("gw0", 0.0)
    assert d.steal_plan(["gw1"]) is None
    plan = d.steal_plan(["gw0"])
    assert plan == ("gw0", sent[2:])
    d.take_back("gw0", sent[2:])
    assert d.queue("gw0") == sent[:2]
    assert set(sent[2:]) <= set(d.fill("gw1", 0.0))


def test_a_closing_worker_is_sent_nothing() -> None:
    d: Dispatcher[str] = Dispatcher({G: 22 * GiB}, [one_gpu(1)] * 4, [0.1] * 4, workers=1)
    d.add_worker("gw0", G)
    d.close("gw0")
    assert d.fill("gw0", 0.0) == [] and d.hungry() == []
