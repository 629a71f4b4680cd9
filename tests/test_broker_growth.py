"""The broker's engine growing its pool and giving it back, against a box that is nearly full or
that another session waits on, driven in this process with a fake box ledger and simulated time:
a request that waits for the box to grow the pool must not wait on memory the pool itself keeps
idle, and another session's waiter gets the pool's spare memory at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_gpushare.broker import engine as engine_module
from pytest_gpushare.broker.box import Done
from pytest_gpushare.broker.engine import Engine
from pytest_gpushare.broker.giveback import PATIENCE_S, WATCH_S
from pytest_gpushare.broker.pool import Ask, Pool
from pytest_gpushare.broker.protocol import Acquire, Granted, Message, need_to_wire
from pytest_gpushare.ledger import FAIR_AFTER_S, Lease, LedgerGpu, Need, Owner
from pytest_gpushare.units import GiB, MemRequest

UUID = "GPU-0"


@dataclass
class _Job:
    ticket: str
    kind: str
    conn: int
    size: int
    label: str
    since: float


@dataclass
class FakeBox:
    """A box ledger of one GPU with ``usable`` bytes, of which ``others`` are held by other
    sessions: it grants a waiting job as soon as the bytes are free, oldest first, unless that
    would leave less than a job waiting :data:`FAIR_AFTER_S` or more needs (the ledger's
    fairness), and reports to the engine only when :meth:`settle` is called."""

    usable: int
    others: int = 0
    session_id: str = "growth-test"
    key: str = "growth-test-controller"
    held: dict[str, int] = field(default_factory=dict)  # the session's box bookings, by lease id
    chunks: set[str] = field(default_factory=set)  # ... of which the pool's chunks
    jobs: list[_Job] = field(default_factory=list)
    given_back: list[int] = field(default_factory=list)
    waiting_elsewhere: set[str] = field(default_factory=set)  # GPUs another session waits on
    looks: int = 0  # how often the engine read whether one does
    engine: Engine | None = None
    now: float = 0.0
    _ids: int = 0

    @property
    def gpus(self) -> Sequence[LedgerGpu]:
        return (LedgerGpu(UUID, 0, "Sim 0", 24 * GiB, self.usable, self.usable),)

    def free(self) -> int:
        return self.usable - self.others - sum(self.held.values())

    def grow(self, ticket: str, conn: int, need: Need, label: str, timeout: float) -> None:
        self.jobs.append(_Job(ticket, "grow", conn, need.mem.resolve(24 * GiB), label, self.now))

    def direct(
        self, ticket: str, conn: int, worker_id: str, need: Need, test_id: str, timeout: float
    ) -> None:
        self.jobs.append(_Job(ticket, "direct", conn, need.mem.resolve(24 * GiB), test_id, self.now))

    def release_chunks(self, chunks: Sequence[Lease]) -> None:
        for chunk in chunks:
            self.given_back.append(self.held.pop(chunk.lease_id))
            self.chunks.discard(chunk.lease_id)

    def release_direct(self, conn: int, lease: Lease) -> None:
        self.held.pop(lease.lease_id)

    def close_worker(self, conn: int) -> None:
        pass

    def others_waiting(self, uuids: Sequence[str]) -> set[str]:
        self.looks += 1
        return self.waiting_elsewhere.intersection(uuids)

    def publish(self, doc: Any) -> None:
        pass

    def settle(self) -> None:
        """Grant every job that fits now, oldest first, and tell the engine."""
        assert self.engine is not None
        granted = True
        while granted:
            granted = False
            for n, job in enumerate(self.jobs):
                aged = [o for o in self.jobs[:n] if self.now - o.since >= FAIR_AFTER_S]
                if job.size <= self.free() and all(self.free() - job.size >= o.size for o in aged):
                    self.jobs.remove(job)
                    self._ids += 1
                    lease_id = f"box-{self._ids}"
                    self.held[lease_id] = job.size
                    if job.kind == "grow":
                        self.chunks.add(lease_id)
                    owner = Owner.current(self.session_id, "controller")
                    lease = Lease(lease_id, job.label, owner, ((UUID, job.size),), 0.0, 0.0)
                    self.engine.done(Done(job.ticket, job.kind, job.conn, lease, None))
                    granted = True
                    break


class Run:
    """An engine over a :class:`FakeBox`, workers ``gw0``..., and simulated time (the engine's
    clocks too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, box: FakeBox, workers: int) -> None:
        self.box = box
        self.now = 1000.0
        clock = SimpleNamespace(monotonic=lambda: self.now, time=lambda: 1.7e9 + self.now)
        monkeypatch.setattr(engine_module, "time", clock)
        self.sent: dict[int, list[Message]] = {}
        self.engine = Engine(
            box,  # type: ignore[arg-type]  # the box's interface, without threads or files
            lambda conn, msg, fds: self.sent.setdefault(conn, []).append(msg),
            context_bytes=0,
            policy="spread",
            fair_after=FAIR_AFTER_S,
            linger_s=1.0,
            watch_s=WATCH_S,
        )
        box.engine = self.engine
        self._requests = 0
        for conn in range(workers):
            self.engine.connect(conn, f"gw{conn}")
            self.release(conn, self.acquire(conn, GiB, "warm"))  # its first lease books its context

    def acquire(self, conn: int, size: int, test_id: str, *, settle: bool = True) -> str | None:
        """Ask; the lease id if granted (once the box has settled, unless ``settle`` is false:
        then the box has not answered yet), else None."""
        self._requests += 1
        request = self._requests
        need = Need(MemRequest(bytes=size), prefer=UUID, allowed=(UUID,))
        self.engine.acquire(conn, Acquire(request, test_id, need_to_wire(need), 60.0), self.now)
        if settle:
            self.step()
        return self.granted(conn, request)

    def granted(self, conn: int, request: int) -> str | None:
        for msg in self.sent.get(conn, []):
            if isinstance(msg, Granted) and msg.request == request:
                return msg.lease_id
        return None

    def release(self, conn: int, lease_id: str | None) -> None:
        assert lease_id is not None
        self.engine.release(conn, lease_id)
        self.step()

    def step(self, seconds: float = 0.0) -> None:
        """Let ``seconds`` pass in turns of the serving loop, the box answering in between."""
        end = self.now + seconds
        while True:
            self.box.now = self.now
            self.box.settle()
            self.engine.tick(self.now)
            self.box.settle()
            self.check_invariant()
            if self.now >= end:
                return
            self.now = min(end, self.now + 0.05)

    def two_6gib_tests(self) -> list[tuple[int, str | None]]:
        """Start a 6GiB test on gw0 and one on gw1: the pool grows a chunk for each."""
        return [(conn, self.acquire(conn, 6 * GiB, f"t-6-{conn}")) for conn in (0, 1)]

    def end(self, running: list[tuple[int, str | None]]) -> None:
        for conn, lease_id in running:
            self.release(conn, lease_id)

    def check_invariant(self) -> None:
        """The box's bookings for the session are at least what its running tests hold."""
        pool = self.engine.pool
        chunks = sum(self.box.held[c] for c in self.box.chunks)
        assert chunks == pool.held(UUID)
        assert chunks >= pool.used(UUID)


def test_a_request_that_needs_the_box_to_grow_gets_the_pools_idle_chunks_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two 6GiB tests ran in chunks of their own; a 14GiB test asked for growth (14GiB) while
    # they ran. They end: 12GiB of chunks are idle, the box has 8GiB free. The growth asked for
    # can only come from the pool's own idle chunks.
    run = Run(monkeypatch, FakeBox(usable=20 * GiB), workers=3)
    sixes = run.two_6gib_tests()
    assert run.engine.pool.held(UUID) == 12 * GiB
    assert run.acquire(2, 14 * GiB, "t-14") is None
    run.end(sixes)
    run.step(10.0)  # windows of give-back pass, fairness ages
    assert run.granted(2, 6) is not None, f"t-14 still waits; the box: {run.box}"
    assert run.engine.pool.used(UUID) == 14 * GiB


def test_a_request_held_back_by_fairness_does_not_keep_idle_chunks_from_an_older_ones_growth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shape of the hung mix runs: a 14GiB test waits for a growth of 13GiB (the box has
    # 7GiB free); a 1GiB test asks once the 14GiB one has waited long enough for the fairness
    # among waiters, so the pool keeps its free 1GiB for the 14GiB test and the box keeps its
    # free 7GiB for the 14GiB test's growth; the 1GiB test asks for a growth of all it needs.
    # Then the 6GiB tests end: 13GiB idle in the pool. The 1GiB test's growth must not make the
    # pool keep them: they go, the 14GiB test's growth comes, both tests run.
    run = Run(monkeypatch, FakeBox(usable=20 * GiB), workers=4)
    sixes = run.two_6gib_tests()
    run.release(3, run.acquire(3, GiB, "t-1-before"))
    assert run.engine.pool.held(UUID) == 13 * GiB
    assert run.acquire(2, 14 * GiB, "t-14") is None
    run.step(3.0)
    assert run.acquire(3, GiB, "t-1") is None
    assert sorted(j.size for j in run.box.jobs) == [GiB, 13 * GiB]
    run.end(sixes)
    run.step(10.0)
    assert run.granted(2, 8) is not None, f"t-14 still waits; the box: {run.box}"
    assert run.granted(3, 9) is not None, f"t-1 still waits; the box: {run.box}"


def test_a_younger_growth_that_counts_on_an_idle_chunk_does_not_keep_it_from_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another hung mix run: a 14GiB test has waited long enough for the box's fairness on its
    # growth of 14GiB; a 6GiB test ends (6GiB idle) as a 10GiB test asks for a growth of the
    # 4GiB it lacks, counting the idle 6GiB. The box grants no growth before the oldest, which
    # needs the idle 6GiB back; the younger growth asks again once it lacks more.
    run = Run(monkeypatch, FakeBox(usable=20 * GiB), workers=4)
    sixes = run.two_6gib_tests()
    assert run.acquire(2, 14 * GiB, "t-14") is None
    run.step(3.0)
    run.engine.release(0, str(sixes[0][1]))  # in the same turn of the serving loop as the next
    assert run.acquire(3, 10 * GiB, "t-10") is None
    run.step(10.0)  # t-6 on gw1 still runs
    assert run.granted(2, 7) is not None, f"t-14 still waits; the box: {run.box}"
    run.end(sixes[1:])
    run.step(10.0)
    assert run.granted(3, 8) is None  # t-14 holds 14GiB of the 20
    run.end([(2, run.granted(2, 7))])
    assert run.granted(3, 8) is not None, f"t-10 still waits; the box: {run.box}"


def test_idle_chunks_go_back_while_a_growth_whose_request_was_served_waits_first_in_the_box(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 6GiB test got the memory of one that ended while its growth waited: the growth goes on
    # (the box cannot take it back), waits long enough for the box's fairness and so holds back
    # every younger growth. The pool's idle 12GiB must go back so that the box can grant the
    # orphan, and then the growths of a 13GiB test (which lacks 1GiB while the pool keeps them).
    run = Run(monkeypatch, FakeBox(usable=17 * GiB), workers=4)
    sixes = run.two_6gib_tests()
    assert run.acquire(2, 6 * GiB, "t-6-late") is None
    run.step(3.0)
    run.end(sixes[:1])
    late = run.granted(2, 7)
    assert late is not None and [j.size for j in run.box.jobs] == [6 * GiB]
    run.end([*sixes[1:], (2, late)])
    run.acquire(3, 13 * GiB, "t-13")
    run.step(10.0)
    assert run.granted(3, 8) is not None, f"t-13 still waits; the box: {run.box}"


def test_a_chunk_larger_than_what_the_growth_over_asks_goes_back_and_the_growth_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 12GiB chunk holds a 2GiB test; a 14GiB test asks the box for 4GiB more, which it does not
    # have (15GiB usable). The 2GiB test ends: 2GiB more would do, the box has 3GiB, but the 4GiB
    # asked for never comes: the idle chunk goes back, and the growth is asked again from the
    # pool as it is then.
    run = Run(monkeypatch, FakeBox(usable=15 * GiB), workers=3)
    run.release(0, run.acquire(0, 12 * GiB, "t-12"))
    small = run.acquire(1, 2 * GiB, "t-2")
    assert small is not None
    assert run.engine.pool.held(UUID) == 12 * GiB
    assert run.acquire(2, 14 * GiB, "t-14") is None
    assert [j.size for j in run.box.jobs] == [4 * GiB]
    run.release(1, small)
    run.step(10.0)
    assert run.granted(2, 6) is not None, f"t-14 still waits; the box: {run.box}"
    assert run.box.given_back == [12 * GiB]  # the chunk granted for t-14 stayed for it


def test_an_idle_chunk_that_a_waiting_request_counts_on_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # The growth asked for is exactly what the pool lacks: nothing goes back while it waits
    # (another session holds the rest of the box), and once the box grants it the request runs.
    box = FakeBox(usable=20 * GiB, others=9 * GiB)
    run = Run(monkeypatch, box, workers=2)
    run.release(0, run.acquire(0, 6 * GiB, "t-6"))
    assert run.acquire(1, 12 * GiB, "t-12") is None
    assert [j.size for j in box.jobs] == [6 * GiB]
    run.step(10.0)
    assert box.given_back == [] and run.engine.pool.held(UUID) == 6 * GiB
    box.others = 0
    run.step()
    assert run.granted(1, 4) is not None
    assert run.engine.pool.used(UUID) == 12 * GiB


def test_the_chunks_a_growth_does_not_need_are_the_largest_spare_ones_within_the_bound() -> None:
    pool = Pool([FakeBox(usable=20 * GiB).gpus[0]], policy="spread", fair_after=2.0)
    for n, size in enumerate((6 * GiB, 6 * GiB, 3 * GiB, GiB)):
        pool.add_chunk(Lease(f"c{n}", "grown", Owner.current("s", "controller"), ((UUID, size),), 0.0, 0.0))
    pool.book("t", Ask("a", "gw0", "t-5", Need(MemRequest(bytes=5 * GiB)), 0.0), [(UUID, 5 * GiB)], 0.0)
    assert [c.lease_id for c in pool.take_unneeded(UUID, 0)] == []
    assert [c.lease_id for c in pool.take_unneeded(UUID, 8 * GiB)] == ["c0", "c3"]  # 7GiB of 8
    assert pool.held(UUID) == 9 * GiB
    # 4GiB spare now, none of its chunks within 512MiB: the smallest spare one goes
    assert [c.lease_id for c in pool.take_unneeded(UUID, GiB // 2)] == ["c2"]
    assert pool.take_unneeded(UUID, 8 * GiB) == []  # what stays covers the 5GiB leased
    assert pool.held(UUID) == 6 * GiB


def test_a_request_served_by_a_chunk_that_came_free_leaves_its_growth_to_the_next_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Row 3 of issue 13 (box-ledger writes): gw0 and gw1 hold the pool's two chunks; gw2 asks,
    # and the pool grows. gw0's test ends before the box answers: gw2 gets its chunk, and gw0's
    # next test waits for the growth under way instead of asking the box for one more.
    box = FakeBox(usable=20 * GiB)
    run = Run(monkeypatch, box, workers=3)
    held = [(conn, run.acquire(conn, GiB, f"t-{conn}")) for conn in (0, 1)]
    assert run.engine.pool.held(UUID) == 2 * GiB and len(box.given_back) == 0
    assert run.acquire(2, GiB, "t-2", settle=False) is None
    assert [j.size for j in box.jobs] == [GiB]
    run.engine.release(0, str(held[0][1]))
    assert run.granted(2, 6) is not None
    assert run.acquire(0, GiB, "t-0-next", settle=False) is None
    assert [j.size for j in box.jobs] == [GiB], "a second growth for what the first brings"
    run.step()
    assert run.granted(0, 7) is not None
    assert run.engine.pool.held(UUID) == 3 * GiB and box.given_back == []


def _spare_chunk_and_an_orphan(run: Run) -> None:
    """gw1 asks while gw0 holds the pool's one chunk; gw0's test ends before the box answers, so
    gw1 gets the chunk and its growth goes on without it (an orphan); then gw1's test ends."""
    first = run.acquire(0, GiB, "t-0")
    assert run.acquire(1, GiB, "t-1", settle=False) is None
    run.engine.release(0, str(first))
    second = run.granted(1, 4)
    assert second is not None
    run.engine.release(1, second)


def test_a_growth_that_the_box_grants_at_once_keeps_the_chunks_it_did_not_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A young orphan keeps the pool's spare chunks: the box grants it in a moment, and giving
    # them back would only make the pool grow again (two box-ledger writes).
    box = FakeBox(usable=20 * GiB)
    run = Run(monkeypatch, box, workers=2)
    _spare_chunk_and_an_orphan(run)
    run.engine.tick(run.now)
    assert box.given_back == [], "a young orphan's spare chunk went back"
    run.step()  # the box grants the orphan
    assert run.engine.pool.held(UUID) == 2 * GiB and box.given_back == []


def test_a_growth_that_waits_in_the_box_gets_the_chunks_it_did_not_need_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same orphan in a box that another session fills: once it has waited PATIENCE_S, the
    # pool's spare chunk goes back (the box grants the oldest growth first: the hung runs).
    box = FakeBox(usable=20 * GiB)
    run = Run(monkeypatch, box, workers=2)
    box.others = box.free() - GiB  # room for gw0's chunk only
    _spare_chunk_and_an_orphan(run)
    run.step(PATIENCE_S / 2)
    assert box.given_back == []
    run.step(PATIENCE_S)
    assert box.given_back == [GiB]


def test_spare_memory_goes_back_at_once_when_another_session_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    box = FakeBox(usable=20 * GiB)
    run = Run(monkeypatch, box, workers=2)
    kept = run.acquire(0, GiB, "t-kept")
    box.waiting_elsewhere = {UUID}
    run.release(0, kept)  # no time passes
    assert box.given_back == [GiB]


def test_spare_memory_lingers_while_no_other_session_waits_and_goes_within_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = FakeBox(usable=20 * GiB)
    run = Run(monkeypatch, box, workers=2)
    run.release(0, run.acquire(0, GiB, "t-1"))
    looks = box.looks
    run.step(0.5)
    assert box.given_back == [] and box.looks > looks  # looked, saw nobody
    box.waiting_elsewhere = {UUID}
    run.step(WATCH_S)
    assert box.given_back == [GiB]
