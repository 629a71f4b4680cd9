"""The Ledger a process opens, one rule at a time on real files: leases stay within usable memory,
contexts, multi-GPU and exclusive leases, placement, refresh, release, close, threads and fork
(test_ledger_processes.py runs many processes at once)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ledger_support
import pytest
from conftest import wait_until
from ledger_support import Worker, gpu, hold_cfg, leases_in, need, state_of

from pytest_gpushare.errors import LeaseTimeout, LedgerError, LockTimeout, NeverFits, ReleaseDeferred
from pytest_gpushare.ledger import read_status
from pytest_gpushare.ledger.access import lock_name
from pytest_gpushare.ledger.admission import Need
from pytest_gpushare.ledger.handle import Ledger
from pytest_gpushare.ledger.records import CONTEXT, TEST
from pytest_gpushare.units import GiB, MemRequest, MiB

folder = pytest.fixture(ledger_support.folder)
make = pytest.fixture(ledger_support.make)
spawn = pytest.fixture(ledger_support.spawn)


def test_a_closed_ledger_refuses_work(make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.acquire(need(1), "t", 1)


def test_threads_of_one_process_never_overcommit(make: Callable[..., Ledger]) -> None:
    ledger = make(context=256 * MiB)
    peak: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                lease = ledger.acquire(need(3), "thread::test", 10)
                peak.append(state_of(ledger.folder).booked())
                ledger.release(lease)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(peak) == 120 and max(peak) <= 10 * GiB
    assert leases_in(ledger.folder) == []


def test_a_forked_child_cannot_use_the_parents_ledger(make: Callable[..., Ledger]) -> None:
    ledger = make()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ledger.snapshot()
            message = b"used it"
        except LedgerError as exc:
            message = str(exc).encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        assert b"a forked child must open its own" in f.read()
    assert ledger.acquire(need(1), "parent still works", 1).parts


def test_a_released_lease_from_another_process_frees_memory(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    other = spawn("hold", hold_cfg(folder, 8))
    other.wait_event("held", timeout=30)
    ledger = make()
    waiting: list[Any] = []
    thread = threading.Thread(target=lambda: waiting.append(ledger.acquire(need(4), "mine", 20)))
    thread.start()
    wait_until(lambda: state_of(folder).waiters, "a wait for the other process's memory", timeout=10)
    other.let_go()
    other.wait_event("released", timeout=30)
    thread.join(20)
    assert waiting and waiting[0].parts == (("GPU-0", 4 * GiB),)


def test_leases_stay_within_usable_memory(make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.acquire(need(4), "a", 1)
    ledger.acquire(need(4), "b", 1)
    with pytest.raises(LeaseTimeout) as info:
        ledger.acquire(need(4), "c", 0.1)
    assert "2.0GiB of 10.0GiB free, 4.0GiB needed" in str(info.value)
    assert sorted(b.test_id for b in leases_in(folder=ledger.folder)) == ["a", "b"]
    assert ledger.acquire(need(2), "d", 1).parts == (("GPU-0", 2 * GiB),)


def test_timeout_names_the_holders(make: Callable[..., Ledger]) -> None:
    holder = make(session="sessA", worker="gw2")
    holder.acquire(need(7), "tests/test_a.py::test_big", 1)
    waiter = make(worker="gw0")
    start = time.monotonic()
    with pytest.raises(LeaseTimeout) as info:
        waiter.acquire(need(4), "tests/test_b.py::test_small", 0.3)
    assert 0.3 <= time.monotonic() - start < 5
    err = info.value
    assert err.waited >= 0.3
    assert err.holders == (
        "tests/test_a.py::test_big (7.0GiB on GPU 0 (Sim 0, GPU-0), session sessA, worker gw2, "
        f"pid {os.getpid()})",
    )
    assert "tests/test_b.py::test_small: no GPU memory for 4.0GiB after waiting" in str(err)
    assert "held by: tests/test_a.py::test_big" in str(err)
    assert state_of(waiter.folder).waiters == []  # the wait is withdrawn


def test_the_first_lease_books_the_context_until_close(make: Callable[..., Ledger]) -> None:
    ledger = make(context=512 * MiB)
    first = ledger.acquire(need(4), "a", 1)
    ledger.acquire(need(4), "b", 1)
    kinds = sorted((b.kind, b.bytes) for b in state_of(ledger.folder).bookings)
    assert kinds == [(CONTEXT, 512 * MiB), (TEST, 4 * GiB), (TEST, 4 * GiB)]
    # The context counts: 8.5GiB booked, so 1.5GiB fits and 2GiB does not.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(2), "c", 0.1)
    ledger.release(first)
    assert [b.kind for b in state_of(ledger.folder).bookings].count(CONTEXT) == 1
    ledger.close()
    assert state_of(ledger.folder).bookings == []
    assert state_of(ledger.folder).owners == {}


def test_a_multi_gpu_lease_checks_each_gpu_on_its_own(make: Callable[..., Ledger]) -> None:
    gpus = [gpu(0), gpu(1)]
    filler = make(gpus, worker="gw1")
    filler.acquire(need(5, allowed=("GPU-0",)), "f0", 1)
    filler.acquire(need(5, allowed=("GPU-1",)), "f1", 1)
    ledger = make(gpus)
    # 10GiB free in total, but only 5GiB on each: a 6GiB-per-GPU request must wait.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(6, count=2), "two", 0.1)
    for uuid in ("GPU-0", "GPU-1"):  # all or nothing: nothing was booked on either GPU
        assert [b.test_id for b in leases_in(ledger.folder, uuid)] == [f"f{uuid[-1]}"]
    lease = ledger.acquire(need(5, count=2), "two", 1)
    assert sorted(u for u, _ in lease.parts) == ["GPU-0", "GPU-1"]
    assert all(size == 5 * GiB for _, size in lease.parts)


def test_needs_that_can_never_fit_fail_at_once(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0), gpu(1, usable=6 * GiB)], context=512 * MiB)
    start = time.monotonic()
    with pytest.raises(NeverFits, match="needs 3 GPUs, but only 2 can serve it"):
        ledger.acquire(need(1, count=3), "t", 60)
    with pytest.raises(NeverFits) as info:
        ledger.acquire(need(10), "big", 60)
    assert time.monotonic() - start < 5  # at once, not after the 60s timeout
    assert info.value.reason == (
        "big needs 10.0GiB, which this box can never give: "
        "GPU 0 (Sim 0, GPU-0) can give at most 9.5GiB "
        "(capacity 10.0GiB less this process's 512.0MiB CUDA context); "
        "GPU 1 (Sim 1, GPU-1) can give at most 5.5GiB "
        "(capacity 6.0GiB less this process's 512.0MiB CUDA context)"
    )
    with pytest.raises(NeverFits, match=r"7\.0GiB on each of 2 GPUs"):
        ledger.acquire(need(7, count=2), "pair", 60)
    with pytest.raises(NeverFits, match="only 1 can serve it"):
        ledger.acquire(need(1, count=2, allowed=("GPU-1",)), "t", 60)


def test_full_for_now_waits_instead_of_never(make: Callable[..., Ledger]) -> None:
    """Capacity decides "never"; memory that is merely busy makes a request wait."""
    ledger = make([gpu(0, usable=2 * GiB, capacity=10 * GiB)])
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(6), "t", 0.1)


def test_percent_needs_resolve_per_gpu(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0, total=8 * GiB, usable=6 * GiB), gpu(1, total=16 * GiB, usable=12 * GiB)])
    lease = ledger.acquire(Need(MemRequest(percent=25), count=2), "pct", 1)
    assert dict(lease.parts) == {"GPU-0": 2 * GiB, "GPU-1": 4 * GiB}


def test_exclusive_takes_all_but_the_contexts_of_live_processes(make: Callable[..., Ledger]) -> None:
    sibling = make(worker="gw1", context=1 * GiB)
    done = sibling.acquire(need(1), "warm-up", 1)
    sibling.release(done)  # an idle sibling keeps only its context
    ledger = make(context=512 * MiB)
    lease = ledger.acquire(need(1, exclusive=True), "excl", 1)
    assert lease.exclusive
    assert lease.parts == (("GPU-0", 10 * GiB - GiB - 512 * MiB),)
    # Nobody else gets memory while it holds the GPU.
    with pytest.raises(LeaseTimeout):
        sibling.acquire(Need(MemRequest(bytes=1)), "tiny", 0.1)
    ledger.release(lease)
    busy = sibling.acquire(need(1), "busy", 1)
    with pytest.raises(LeaseTimeout, match="exclusive use waits for 1 lease"):
        ledger.acquire(need(1, exclusive=True), "excl", 0.1)
    sibling.release(busy)
    assert ledger.acquire(need(1, exclusive=True), "excl", 1).exclusive


def test_the_most_conservative_live_session_sets_the_limit(make: Callable[..., Ledger]) -> None:
    generous = make(session="A")  # usable 10GiB
    careful = make([gpu(usable=6 * GiB)], session="B")
    with pytest.raises(LeaseTimeout):
        generous.acquire(need(7), "a", 0.1)
    lease = generous.acquire(need(5), "a", 1)
    with pytest.raises(LeaseTimeout):
        careful.acquire(need(2), "b", 0.1)
    assert state_of(generous.folder).limit() == 6 * GiB
    careful.close()
    assert generous.acquire(need(4), "a2", 1)
    generous.release(lease)


def test_refresh_is_asked_while_waiting(make: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_gpushare.ledger.handle as ledger_module

    monkeypatch.setattr(ledger_module, "REFRESH_S", 0.05)
    calls: list[float] = []

    def refresh() -> dict[str, int]:
        calls.append(time.monotonic())
        return {"GPU-0": 10 * GiB if len(calls) > 2 else 2 * GiB}

    ledger = make([gpu(usable=2 * GiB, capacity=10 * GiB)], refresh=refresh)
    lease = ledger.acquire(need(5), "grows", 5)
    assert lease.parts == (("GPU-0", 5 * GiB),)
    assert len(calls) == 3
    assert state_of(ledger.folder).owners[ledger.owner.key].usable_bytes == 10 * GiB


def test_a_failing_refresh_is_logged_not_raised(
    make: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytest_gpushare.ledger.handle as ledger_module

    monkeypatch.setattr(ledger_module, "REFRESH_S", 0.02)
    lines: list[str] = []

    def refresh() -> dict[str, int]:
        raise RuntimeError("NVML went away")

    ledger = make([gpu(usable=2 * GiB, capacity=10 * GiB)], refresh=refresh, log=lines.append)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.2)
    assert "gpushare: could not refresh usable memory: NVML went away" in lines


def test_release_is_idempotent_and_only_for_the_owner(make: Callable[..., Ledger]) -> None:
    ledger = make()
    other = make(worker="gw1")
    lease = ledger.acquire(need(4), "a", 1)
    with pytest.raises(ValueError, match="belongs to another owner"):
        other.release(lease)
    ledger.release(lease)
    ledger.release(lease)
    assert leases_in(ledger.folder) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("spread", "GPU-1"), ("pack", "GPU-0")],
)
def test_placement_policy(make: Callable[..., Ledger], policy: str, expected: str) -> None:
    gpus = [gpu(0, usable=6 * GiB), gpu(1, usable=10 * GiB)]
    ledger = make(gpus, policy=policy)
    assert ledger.acquire(need(4), "t", 1).parts[0][0] == expected


def test_the_preferred_gpu_wins_when_it_can_serve_now(make: Callable[..., Ledger]) -> None:
    gpus = [gpu(0, usable=6 * GiB), gpu(1, usable=10 * GiB)]
    ledger = make(gpus)
    assert ledger.acquire(need(4, prefer="GPU-0"), "home", 1).parts[0][0] == "GPU-0"
    # GPU-0 has 2GiB left: a 4GiB test goes elsewhere rather than wait.
    assert ledger.acquire(need(4, prefer="GPU-0"), "moved", 1).parts[0][0] == "GPU-1"
    # Restricted to its home GPU it waits.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4, prefer="GPU-0", allowed=("GPU-0",)), "stuck", 0.1)


def test_multi_gpu_parts_start_with_the_preferred_gpu(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0), gpu(1), gpu(2, usable=12 * GiB)])
    lease = ledger.acquire(need(2, count=2, prefer="GPU-1"), "t", 1)
    assert [u for u, _ in lease.parts] == ["GPU-1", "GPU-2"]


def test_bad_needs_are_value_errors(make: Callable[..., Ledger]) -> None:
    ledger = make()
    with pytest.raises(ValueError, match="count must be at least 1"):
        ledger.acquire(need(1, count=0), "t", 1)
    with pytest.raises(ValueError, match="unknown GPU"):
        ledger.acquire(need(1, allowed=("GPU-9",)), "t", 1)
    with pytest.raises(ValueError, match="policy"):
        make(policy="random")


def test_a_hung_lock_holder_fails_loudly(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make(lock_timeout=0.3)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)",
            str(folder / lock_name("GPU-0")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        # The cap on every lock wait comes before the request's own deadline: a loud error.
        with pytest.raises(
            LedgerError, match=rf"could not lock .* within 0\.3s: it is held by pid {holder.pid} "
        ):
            ledger.acquire(need(1), "t", 5)
    finally:
        holder.kill()
        holder.wait()
    assert ledger.acquire(need(1), "t", 5)


@pytest.fixture
def frozen_lock_holder(folder: Path, make: Callable[..., Ledger]) -> Iterator[int]:
    """Another process that holds GPU-0's ledger lock and is then frozen with SIGSTOP; its pid."""
    make().close()  # the folder and its lock file exist
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()",
            str(folder / lock_name("GPU-0")),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_frozen_lock_holder_cannot_stretch_a_requests_timeout(
    make: Callable[..., Ledger], frozen_lock_holder: int
) -> None:
    """Issue 15 (4): the request's own deadline holds, whoever holds the lock, and the failure
    names the frozen process."""
    start = time.monotonic()
    with pytest.raises(LeaseTimeout) as info:
        make(worker="gw1", lock_timeout=60).acquire(need(1), "t", 1.0)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f"a ledger lock is held by pid {frozen_lock_holder} (python" in message
    assert "which is stopped: it looks frozen" in message and f"kill -CONT {frozen_lock_holder}" in message


def test_a_frozen_lock_holder_cannot_hang_status(folder: Path, frozen_lock_holder: int) -> None:
    start = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        read_status(folder)
    assert time.monotonic() - start < 15  # STATUS_LOCK_TIMEOUT_S, not the 60s cap
    assert info.value.holder.startswith(f"pid {frozen_lock_holder} (python")
    assert "looks frozen" in str(info.value)


def test_a_release_the_folder_cannot_take_keeps_the_lease_booked_and_says_so(
    make: Callable[..., Ledger],
) -> None:
    """Issue 15 (6): the folder takes no writes (here: EFBIG) while a lease is held. The release
    fails with one clear error, the lease stays booked (the safe side), and leaves at this
    process's next access that succeeds; close then neither raises nor loses anything."""
    lines: list[str] = []
    ledger = make(log=lines.append)
    lease = ledger.acquire(need(6), "tests/test_a.py::test_big", 1)
    with file_size_limit(64), pytest.raises(ReleaseDeferred) as info:
        ledger.release(lease)
    message = str(info.value)
    assert message.startswith(
        "gpushare: could not give back the lease of tests/test_a.py::test_big (6.0GiB on GPU 0"
    )
    assert (
        "File too large" in message
        and "it stays booked until this process reaches the ledger again" in message
    )
    assert "\n" not in message and message in lines
    assert [b.test_id for b in leases_in(ledger.folder)] == ["tests/test_a.py::test_big"]
    ledger.release(lease)  # idempotent: it is no longer this process's
    ledger.acquire(need(1), "next", 1)  # the next access that succeeds takes it out
    assert [b.test_id for b in leases_in(ledger.folder)] == ["next"]


def test_close_in_a_folder_that_takes_no_writes_does_not_raise(make: Callable[..., Ledger]) -> None:
    lines: list[str] = []
    ledger = make(log=lines.append)
    ledger.acquire(need(6), "held", 1)
    with file_size_limit(64):
        ledger.close()
    assert any("could not take this process's bookings out of the ledgers" in line for line in lines)
    # Its tombstone tells the next access that the owner is gone: the memory is free at once.
    assert make(worker="gw1").acquire(need(8), "after", 1).parts


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail with EFBIG in this process (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_timeout_names_the_session_whose_reservations_cap_the_gpu(make: Callable[..., Ledger]) -> None:
    generous = make(session="A", worker="gw0")  # usable 10GiB
    careful = make([gpu(usable=6 * GiB)], session="B", worker="gw3")
    generous.acquire(need(5), "a", 1)
    with pytest.raises(LeaseTimeout) as info:
        generous.acquire(need(2), "tests/test_a.py::test_more", 0.1)
    assert (
        f"GPU 0 (Sim 0, GPU-0)'s limit 6.0GiB is set by session B (pid {os.getpid()} on "
        f"{os.uname().nodename}, session B, worker gw3), which keeps more for its reservations than "
        "this session's 10.0GiB"
    ) in str(info.value)
    careful.close()
