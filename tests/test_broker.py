"""The session broker in one process: its protocol, its pool, and a broker serving clients on
threads (the crash semantics, with real processes, are in test_broker_processes.py)."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from pytest_gpushare.broker import (
    Broker,
    BrokerClient,
    BrokerError,
    LeaseCancelled,
    live_owner_keys,
    read_running,
)
from pytest_gpushare.broker import protocol as proto
from pytest_gpushare.broker.pool import Ask, Pool
from pytest_gpushare.carrying import CarriedLease
from pytest_gpushare.errors import LeaseTimeout, NeverFits
from pytest_gpushare.ledger import Lease, Ledger, LedgerGpu, Need, Owner, read_status
from pytest_gpushare.units import GiB, MemRequest, MiB


def gpu(n: int, total: int = 24 * GiB, usable: int = 20 * GiB) -> LedgerGpu:
    return LedgerGpu(f"GPU-{n}", n, f"Sim {n}", total, usable, usable)


def need(size: int, uuid: str | None = "GPU-0", **kw: Any) -> Need:
    allowed = kw.pop("allowed", None if uuid is None else (uuid,))
    return Need(MemRequest(bytes=size), prefer=uuid, allowed=allowed, **kw)


# --- protocol -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        proto.Hello(1, "tok", "gw0"),
        proto.Welcome(1, "s"),
        proto.Rejected("no"),
        proto.Acquire(7, "t::x", proto.need_to_wire(need(GiB)), 2.5),
        proto.Release("l-1"),
        proto.Withdraw(7),
        proto.Granted(7, "l-1", [["GPU-0", GiB]], 1.5, 0.25, False, True),
        proto.Carry("l-1", "t::y"),
        proto.Recall("l-1"),
        proto.Refused(7, "timeout", "waited", 3.0, ["t::y (1.0GiB)"]),
    ],
)
def test_every_message_survives_its_frame(message: Any) -> None:
    frames = list(proto.FrameReader().feed(proto.encode(message)))
    assert [proto.decode(f) for f in frames] == [message]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"),
        (b'{"k": "release"}', "no known message"),
        (b'["nope"]', "no known message"),
        (b'["release"]', "0 fields, not 1"),
        (b'["release", 7]', "lease_id is not a str"),
        (b'["withdraw", true]', "request is not a int"),
        (b'["withdraw", "7"]', "request is not a int"),
    ],
)
def test_malformed_frames_are_refused(payload: bytes, why: str) -> None:
    with pytest.raises(proto.ProtocolError, match=why):
        proto.decode(payload)


def test_frames_split_anywhere_are_put_back_together() -> None:
    stream = (
        proto.encode(proto.Release("a")) + proto.encode(proto.Withdraw(3)) + proto.encode(proto.Release("b"))
    )
    reader = proto.FrameReader()
    got = [proto.decode(p) for i in range(len(stream)) for p in reader.feed(stream[i : i + 1])]
    assert got == [proto.Release("a"), proto.Withdraw(3), proto.Release("b")]


def test_an_oversized_frame_is_refused() -> None:
    with pytest.raises(proto.ProtocolError, match="over the limit"):
        list(proto.FrameReader().feed((proto.MAX_FRAME + 1).to_bytes(4, "big")))


@pytest.mark.parametrize(
    "value",
    [
        need(GiB),
        Need(MemRequest(percent=12.5), count=2, exclusive=True, prefer=None, allowed=None),
        Need(MemRequest(bytes=1), allowed=("GPU-1", "GPU-0")),
    ],
)
def test_needs_cross_the_wire_unchanged(value: Need) -> None:
    assert proto.need_from_wire(proto.need_to_wire(value)) == value


@pytest.mark.parametrize(
    "wire",
    [
        [0, None, 1, False, None, None],
        [None, 101, 1, False, None, None],
        [5, 5, 1, False, None, None],
        [5, None, 0, False, None, None],
        [5, None, 1, 1, None, None],
        [5, None, 1, False, None, [3]],
        [5, None, 1, False, None],
    ],
)
def test_bad_needs_are_refused(wire: list[Any]) -> None:
    with pytest.raises(proto.ProtocolError, match="not a memory need"):
        proto.need_from_wire(wire)


# --- the pool -------------------------------------------------------------------------------------


def chunk(size: int, uuid: str = "GPU-0", n: int = 1) -> Lease:
    return Lease(f"chunk-{n}", "grown", Owner.current("s", "controller"), ((uuid, size),), 0.0, 0.0)


def ask(size: int, ticket: str, since: float = 0.0, worker: str = "gw0") -> Ask:
    return Ask(ticket, worker, f"test-{ticket}", need(size), since)


def test_the_pool_serves_within_its_chunks_only() -> None:
    pool = Pool([gpu(0)], policy="spread", fair_after=2.0)
    assert pool.choose(ask(GiB, "a"), ["GPU-0"], 0.0) is None
    assert pool.shortfall(ask(GiB, "a"), "GPU-0") == GiB
    pool.add_chunk(chunk(2 * GiB))
    for ticket in ("a", "b"):
        parts = pool.choose(ask(GiB, ticket), ["GPU-0"], 0.0)
        assert parts == [("GPU-0", GiB)]
        pool.book(ticket, ask(GiB, ticket), parts, 0.0)
    assert pool.choose(ask(GiB, "c"), ["GPU-0"], 0.0) is None
    assert pool.shortfall(ask(GiB, "c"), "GPU-0") == GiB
    assert pool.free("a") and not pool.free("a")
    assert pool.choose(ask(GiB, "c"), ["GPU-0"], 0.0) == [("GPU-0", GiB)]


def test_an_aged_waiter_is_protected_in_the_pool_as_in_the_ledger() -> None:
    pool = Pool([gpu(0)], policy="spread", fair_after=2.0)
    pool.add_chunk(chunk(4 * GiB))
    pool.book("held", ask(2 * GiB, "held"), [("GPU-0", 2 * GiB)], 0.0)
    big = ask(3 * GiB, "big", since=10.0)
    pool.wait(big, ["GPU-0"])
    small = ask(GiB, "small", since=11.0)
    assert pool.choose(small, ["GPU-0"], now=11.5) is not None  # the big one has not aged yet
    assert pool.choose(small, ["GPU-0"], now=12.5) is None  # now it has: 1GiB left < its 3GiB
    pool.unwait("big")
    assert pool.choose(small, ["GPU-0"], now=12.5) is not None


def test_only_chunks_that_no_lease_needs_are_spare() -> None:
    pool = Pool([gpu(0)], policy="spread", fair_after=2.0)
    for n, size in enumerate((GiB, 2 * GiB, GiB)):
        pool.add_chunk(chunk(size, n=n))
    pool.book("a", ask(GiB + 1, "a"), [("GPU-0", GiB + 1)], 0.0)
    assert pool.has_spare("GPU-0")
    spare = pool.take_spare("GPU-0")
    assert [c.parts[0][1] for c in spare] == [2 * GiB]  # 4GiB held, 1GiB+1 used: 2GiB can go
    assert pool.held("GPU-0") == 2 * GiB >= pool.used("GPU-0")
    assert not pool.has_spare("GPU-0")
    pool.free("a")
    assert sum(c.parts[0][1] for c in pool.take_spare("GPU-0")) == 2 * GiB
    assert pool.held("GPU-0") == 0


def test_idle_spare_keeps_what_the_busiest_moment_of_two_windows_needed() -> None:
    pool = Pool([gpu(0)], policy="spread", fair_after=2.0)
    for n in range(3):
        pool.add_chunk(chunk(GiB, n=n))
    for name in ("a", "b", "c"):
        pool.book(name, ask(GiB, name), [("GPU-0", GiB)], 0.0)
    for name in ("b", "c"):
        pool.free(name)
    assert pool.has_spare("GPU-0") and not pool.has_spare("GPU-0", idle=True)
    pool.new_window()  # the window before saw 3GiB leased at once
    assert not pool.has_spare("GPU-0", idle=True)
    pool.new_window()  # now only the 1GiB still leased counts
    assert len(pool.take_spare("GPU-0", idle=True)) == 2
    assert pool.held("GPU-0") == GiB


# --- a broker in this process -------------------------------------------------------------------


class Session:
    """A broker on a fresh ledger folder, and its clients."""

    def __init__(self, folder: Path, gpus: list[LedgerGpu], **kw: Any) -> None:
        self.folder = folder
        self.gpus = gpus
        self.log: list[str] = []
        self.broker = Broker(
            self.open_ledger,
            session_id="broker-test",
            context_bytes=kw.pop("context", 0),
            log=self.log.append,
            fair_after=kw.pop("fair_after", 2.0),
            **kw,
        )
        self.clients: list[BrokerClient] = []

    def open_ledger(self, owner: Owner, context_bytes: int) -> Ledger:
        return Ledger(self.folder, self.gpus, owner, context_bytes=context_bytes, log=self.log.append)

    def client(self, worker_id: str) -> BrokerClient:
        self.clients.append(BrokerClient(self.broker.worker_input(), worker_id, grace_s=1.0))
        return self.clients[-1]

    def box(self, uuid: str = "GPU-0") -> list[tuple[str, int, str, str]]:
        """The box ledger's bookings on a GPU: (test id, bytes, kind, worker id)."""
        gpus = {g["uuid"]: g for g in read_status(self.folder)["gpus"]}
        leases = gpus[uuid]["leases"] if uuid in gpus else []
        return [(b["test_id"], b["bytes"], b["kind"], b["owner"].get("worker_id")) for b in leases]

    def head(self, uuid: str = "GPU-0") -> bytes:
        """The ledger file's header line: it changes with every write of the box ledger."""
        with open(self.folder / f"gpu-{uuid}.json", "rb") as f:
            return f.readline()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.broker.close()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Callable[..., Session]]:
    made: list[Session] = []

    def make(gpus: list[LedgerGpu] | None = None, **kw: Any) -> Session:
        made.append(Session(tmp_path / "ledgers", gpus or [gpu(0)], **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def in_thread(call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call`` in a thread; the dict gets ``result`` or ``error``, and ``done`` when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except Exception as exc:
            out["error"] = exc
        out["done"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()
    return out


def test_a_workers_first_lease_books_its_context_then_the_pool_serves_without_box_writes(
    session: Callable[..., Session],
) -> None:
    s = session(context=512 * MiB, linger_s=60.0)
    c = s.client("gw0")
    first = c.acquire(need(GiB), "t-first", 5)
    assert first.parts == (("GPU-0", GiB),)
    assert sorted(s.box()) == [("CUDA context", 512 * MiB, "context", "gw0"), ("t-first", GiB, "test", "gw0")]
    c.release(first)
    second = c.acquire(need(GiB), "t-second", 5)  # the pool grows by a chunk
    c.release(second)
    wait_until(lambda: ("t-first", GiB, "test", "gw0") not in s.box(), "the first lease back in the box")
    assert ("session pool of gw0: t-second", GiB, "test", "controller") in s.box()
    head = s.head()
    for n in range(50):
        c.release(c.acquire(need(GiB), f"t-{n}", 5))
    assert s.head() == head, "leases served from the pool wrote the box ledger"


def running_leases(s: Session) -> list[tuple[str, str]]:
    """The session's running file: each lease's test id and lease id."""
    return [
        (x["test_id"], x["lease_id"]) for d in read_running(s.folder, {s.broker.box.key}) for x in d["leases"]
    ]


def test_a_pool_lease_carried_to_the_next_test_shows_that_test(session: Callable[..., Session]) -> None:
    s = session(linger_s=60.0)
    c = s.client("gw0")
    first = c.acquire(need(GiB), "t-first", 5)
    assert not c.may_carry(first), "a lease passed through to the box is carriable"
    c.release(first)
    lease = c.acquire(need(GiB), "t-a", 5)  # from the pool
    assert c.may_carry(lease)
    carried = c.carry(lease, "t-b")
    assert carried is not None
    assert (carried.lease_id, carried.test_id, carried.parts, carried.waited_s) == (
        lease.lease_id,
        "t-b",
        lease.parts,
        0.0,
    )
    wait_until(lambda: running_leases(s) == [("t-b", lease.lease_id)], "the running file shows t-b")
    # A worker that watches for recalls writes each new holder into the slot it passed the
    # broker: no message per test, the running file shows it all the same.
    c.watch_recalls(lambda _lease_id: None)
    for n in range(3):
        carried = c.carry(carried, f"t-slot-{n}")
        assert carried is not None
        wait_until(lambda n=n: running_leases(s) == [(f"t-slot-{n}", lease.lease_id)], f"t-slot-{n} shown")
    c.release(carried)
    wait_until(lambda: running_leases(s) == [], "the running file shows no lease")


def carrier_and_other(session: Callable[..., Session]) -> tuple[BrokerClient, BrokerClient, Lease]:
    """On a GPU with 3GiB usable: gw0 holding a carriable 2GiB lease from the pool, and gw1."""
    s = session([gpu(0, usable=3 * GiB)], linger_s=60.0)
    a, b = s.client("gw0"), s.client("gw1")
    a.release(a.acquire(need(GiB), "warm", 5))
    held = a.acquire(need(2 * GiB), "t-held", 5)
    assert a.may_carry(held)
    return a, b, held


def test_a_request_that_starts_to_wait_recalls_the_carriable_leases_on_its_gpu(
    session: Callable[..., Session],
) -> None:
    a, b, held = carrier_and_other(session)
    recalled: list[str] = []
    a.watch_recalls(recalled.append)
    waiting = in_thread(lambda: b.acquire(need(2 * GiB), "t-b", 10))
    wait_until(lambda: recalled == [held.lease_id], "the broker recalls the held lease")
    assert not a.may_carry(held)
    extra = a.acquire(need(GiB), "t-extra", 5)  # its answer comes through the watching thread
    assert not a.may_carry(extra), "a lease granted while a request waits on its GPU is carriable"
    assert a.carry(held, "t-next") is None, "a recalled lease was carried"
    wait_until(lambda: "done" in waiting, "t-b served")
    assert waiting["result"].parts == (("GPU-0", 2 * GiB),)


def test_a_lease_kept_between_two_tests_goes_back_at_once_when_recalled(
    session: Callable[..., Session],
) -> None:
    # Between two tests a worker may wait for xdist's next test: nobody of it asks the broker
    # anything then, yet a recall must free the kept lease.
    a, b, lease = carrier_and_other(session)
    given_back: list[str] = []

    def give_back(kept: Lease) -> None:
        given_back.append(kept.test_id)
        a.release(kept)

    kept = CarriedLease(a, give_back)
    assert kept.keep(lease, need(2 * GiB), need(2 * GiB))
    waiting = in_thread(lambda: b.acquire(need(2 * GiB), "t-b", 10))
    wait_until(lambda: "done" in waiting, "t-b served while t-a's lease was kept")
    assert given_back == ["t-held"]
    assert waiting["result"].parts == (("GPU-0", 2 * GiB),)
    assert kept.take(need(2 * GiB), "t-next") is None


def test_a_waiting_request_is_served_when_memory_comes_back(session: Callable[..., Session]) -> None:
    s = session([gpu(0, usable=3 * GiB)])
    a, b = s.client("gw0"), s.client("gw1")
    held = a.acquire(need(2 * GiB), "t-a", 5)
    waiting = in_thread(lambda: b.acquire(need(2 * GiB), "t-b", 10))
    wait_until(lambda: any(d["waiting"] for d in read_running(s.folder, {s.broker.box.key})), "t-b waiting")
    assert "done" not in waiting
    released = time.monotonic()
    a.release(held)
    wait_until(lambda: "done" in waiting, "t-b served")
    assert waiting["result"].parts == (("GPU-0", 2 * GiB),)
    assert waiting["done"] - released < 1.0


def test_a_need_that_can_never_fit_is_refused_at_once(session: Callable[..., Session]) -> None:
    s = session([gpu(0, usable=4 * GiB)], context=512 * MiB)
    with pytest.raises(NeverFits, match=r"can give at most 3\.5GiB"):
        s.client("gw0").acquire(need(4 * GiB), "t-huge", 60)


def test_a_request_times_out_at_its_deadline_naming_the_holder(session: Callable[..., Session]) -> None:
    s = session([gpu(0, usable=3 * GiB)])
    a, b = s.client("gw0"), s.client("gw1")
    a.release(a.acquire(need(GiB), "t-warm", 5))  # gw0 now leases from the pool
    a.acquire(need(2 * GiB), "t-holder", 5)
    b.release(b.acquire(need(GiB), "t-warm-b", 5))
    start = time.monotonic()
    with pytest.raises(LeaseTimeout) as info:
        b.acquire(need(2 * GiB), "t-late", 0.3)
    took = time.monotonic() - start
    assert 0.3 <= took < 1.5
    assert "t-late" in str(info.value)
    assert "t-holder" in str(info.value)


def test_cancel_answers_every_waiting_request_within_a_second(session: Callable[..., Session]) -> None:
    s = session([gpu(0, usable=3 * GiB)])
    a, b, c = s.client("gw0"), s.client("gw1"), s.client("gw2")
    a.acquire(need(2 * GiB), "t-holder", 5)
    waits = [
        in_thread(lambda w=w, n=n: w.acquire(need(2 * GiB), f"t-wait-{n}", 60)) for n, w in enumerate((b, c))
    ]
    wait_until(
        lambda: sum(len(d["waiting"]) for d in read_running(s.folder, {s.broker.box.key})) == 2, "two waiting"
    )
    start = time.monotonic()
    assert s.broker.cancel() == 2
    assert time.monotonic() - start < 1.0
    wait_until(lambda: all("done" in w for w in waits), "the waiting requests answered", timeout=1.0)
    for w in waits:
        assert isinstance(w["error"], LeaseCancelled)
        assert "cancelled" in str(w["error"])
    with pytest.raises(LeaseCancelled):
        b.acquire(need(GiB), "t-after", 60)


def test_spare_memory_goes_back_to_the_box_after_the_linger(session: Callable[..., Session]) -> None:
    s = session(linger_s=0.2)
    c = s.client("gw0")
    c.release(c.acquire(need(GiB), "t-1", 5))
    c.release(c.acquire(need(GiB), "t-2", 5))
    wait_until(lambda: not [b for b in s.box() if b[3] == "controller"], "the chunk given back", timeout=5)
    assert not read_running(s.folder, {s.broker.box.key})[0]["leases"]


def test_spare_memory_goes_back_at_once_when_another_session_waits(
    session: Callable[..., Session], tmp_path: Path
) -> None:
    s = session([gpu(0, usable=4 * GiB)], linger_s=60.0)
    c = s.client("gw0")
    c.release(c.acquire(need(GiB), "t-1", 5))
    c.release(c.acquire(need(3 * GiB), "t-2", 5))
    assert ("session pool of gw0: t-2", 3 * GiB, "test", "controller") in s.box()
    with Ledger(s.folder, s.gpus, Owner.current("other", "main"), context_bytes=0) as other:
        start = time.monotonic()
        lease = other.acquire(need(4 * GiB), "t-other", 10)
        assert time.monotonic() - start < 2.0
        other.release(lease)


def test_an_exclusive_request_passes_through_and_gets_all_but_the_contexts(
    session: Callable[..., Session],
) -> None:
    s = session([gpu(0, usable=8 * GiB)], context=512 * MiB, fair_after=0.1)
    a, b = s.client("gw0"), s.client("gw1")
    a.release(a.acquire(need(GiB), "t-warm", 5))
    running = a.acquire(need(GiB), "t-running", 5)  # from the pool
    exclusive = in_thread(lambda: b.acquire(need(GiB, exclusive=True), "t-exclusive", 10))
    wait_until(
        lambda: any(w[0] == "t-exclusive" for w in waiters(s)), "the exclusive request waiting in the box"
    )
    assert "done" not in exclusive
    a.release(running)
    wait_until(lambda: "done" in exclusive, "the exclusive request served")
    lease = exclusive["result"]
    assert lease.exclusive
    assert lease.parts == (("GPU-0", 8 * GiB - 2 * 512 * MiB),)  # gw0's and gw1's contexts stay booked
    with pytest.raises(LeaseTimeout):
        a.acquire(need(GiB), "t-meanwhile", 0.2)


def waiters(s: Session) -> list[tuple[str, str]]:
    return [
        (w["test_id"], w["owner"].get("worker_id"))
        for g in read_status(s.folder)["gpus"]
        for w in g["waiters"]
    ]


def test_a_multi_gpu_request_gets_distinct_gpus(session: Callable[..., Session]) -> None:
    s = session([gpu(0), gpu(1)], context=512 * MiB)
    lease = s.client("gw0").acquire(need(GiB, uuid=None, count=2), "t-two", 5)
    assert sorted(u for u, _ in lease.parts) == ["GPU-0", "GPU-1"]
    assert all(n == GiB for _, n in lease.parts)


def test_a_percentage_is_of_the_gpu_it_lands_on(session: Callable[..., Session]) -> None:
    s = session([gpu(0, total=16 * GiB, usable=12 * GiB)])
    c = s.client("gw0")
    half = Need(MemRequest(percent=25), prefer="GPU-0", allowed=("GPU-0",))
    c.release(c.acquire(half, "t-direct", 5))
    assert c.acquire(half, "t-pool", 5).parts == (("GPU-0", 4 * GiB),)


def test_status_lists_each_running_test_of_the_session(session: Callable[..., Session]) -> None:
    s = session(context=256 * MiB)
    a, b = s.client("gw0"), s.client("gw1")
    a.release(a.acquire(need(GiB), "warm", 5))
    a.acquire(need(GiB), "tests/t.py::test_pool", 5)
    b.acquire(need(2 * GiB), "tests/t.py::test_direct", 5)

    def running() -> list[tuple[str, str, int, str]]:
        status = read_status(s.folder)
        docs = read_running(s.folder, live_owner_keys(status), status["taken_at"])
        return sorted(
            (lease["test_id"], lease["worker_id"], lease["parts"][0][1], lease["route"])
            for d in docs
            for lease in d["leases"]
        )

    wait_until(lambda: len(running()) == 2, "both tests in the running file", timeout=5)
    assert running() == [
        ("tests/t.py::test_direct", "gw1", 2 * GiB, "direct"),
        ("tests/t.py::test_pool", "gw0", GiB, "pool"),
    ]


def test_the_running_file_of_a_dead_controller_is_ignored_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "ledgers"
    folder.mkdir()
    stale = folder / "broker-123-0123456789abcdef.json"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 10, time.time() - 10))
    assert read_running(folder, set()) == []
    assert not stale.exists()


def test_a_closed_connection_returns_the_workers_leases(session: Callable[..., Session]) -> None:
    s = session([gpu(0, usable=3 * GiB)])
    a, b = s.client("gw0"), s.client("gw1")
    a.release(a.acquire(need(GiB), "warm", 5))
    a.acquire(need(2 * GiB), "t-held", 5)
    a.close()
    assert b.acquire(need(3 * GiB), "t-all", 2).parts == (("GPU-0", 3 * GiB),)


def test_a_client_with_the_wrong_token_is_refused(session: Callable[..., Session]) -> None:
    s = session()
    info = s.broker.worker_input()
    with pytest.raises(BrokerError, match="wrong session token"):
        BrokerClient({**info, "token": "0" * 32}, "gw0")
    with pytest.raises(BrokerError, match="protocol"):
        BrokerClient({**info, "version": 99}, "gw0")


def test_the_socket_lives_in_a_private_folder(session: Callable[..., Session]) -> None:
    s = session()
    folder = Path(s.broker.address).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    s.broker.close()
    assert not folder.exists()
