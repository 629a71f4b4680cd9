"""Whether an owner lives: its liveness lock, held for its whole life and probed by others; its
holdings, read whole or not at all; and what a dead owner leaves is reclaimed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ledger_support
import pytest
from conftest import wait_until
from ledger_support import Worker, gpu, hold_cfg, leases_in, need, state_of

from pytest_gpushare.errors import LeaseTimeout, LedgerError
from pytest_gpushare.ledger import read_status, trust_lines
from pytest_gpushare.ledger.access import ledger_name
from pytest_gpushare.ledger.codec import dump_gpu_state
from pytest_gpushare.ledger.folder import LedgerFolder, open_ledger_folder
from pytest_gpushare.ledger.handle import FULL_CHECK_S, Ledger
from pytest_gpushare.ledger.liveness import live_name
from pytest_gpushare.ledger.passes import ALIVE_MAX_AGE_S
from pytest_gpushare.ledger.probe import ALIVE, HoldingsUnreadable, probe, read_holdings
from pytest_gpushare.ledger.records import TEST, Booking, Owner
from pytest_gpushare.units import GiB

folder = pytest.fixture(ledger_support.folder)


def probe_alive(folder: LedgerFolder, key: str, max_age_s: float = 0.0) -> bool:
    return probe(folder, key, max_age_s).state == ALIVE


make = pytest.fixture(ledger_support.make)
spawn = pytest.fixture(ledger_support.spawn)


def test_one_owner_cannot_open_two_ledgers_in_one_folder(folder: Path) -> None:
    owner = Owner.current("s", "w")
    with Ledger(folder, [gpu()], owner, context_bytes=0), pytest.raises(LedgerError, match="reuse it"):
        Ledger(folder, [gpu()], owner, context_bytes=0)


def test_a_killed_holder_is_reclaimed_at_the_next_access(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    lines: list[str] = []
    ledger = make(log=lines.append)
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.wait_event("held", timeout=30)
    assert probe_alive(open_ledger_folder(folder), held["key"])
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4), "mine", 0.2)
    other.kill()
    lease = ledger.acquire(need(4), "mine", 5)
    assert lease.parts == (("GPU-0", 4 * GiB),)
    assert [b.test_id for b in leases_in(folder)] == ["mine"]
    reclaimed = [line for line in lines if "reclaimed" in line]
    assert reclaimed == [
        f"gpushare: reclaimed 8.0GiB on GPU 0 (Sim 0, GPU-0) held by test tests/test_x.py::test_big "
        f"(pid {held['pid']} on {os.uname().nodename}, session other-session, worker gw7): "
        "its process is gone"
    ]
    assert not (folder / live_name(held["key"])).exists()


def test_pid_reuse_does_not_keep_a_dead_owner_alive(folder: Path, make: Callable[..., Ledger]) -> None:
    """A record with our own pid but another start time and token is someone else: dead."""
    lines: list[str] = []
    ledger = make(log=lines.append)
    me = ledger.owner
    ghost = Owner(f"{me.pid}-deadbeefdeadbeef", me.pid, me.host, "boot:1", "old", "gw0", None, 10 * GiB, 1.0)
    state = state_of(folder)
    state.owners[ghost.key] = ghost
    state.bookings.append(Booking(f"{ghost.key}-1", ghost.key, "old::test", 9 * GiB, TEST, 1.0))
    (folder / ledger_name("GPU-0")).write_bytes(dump_gpu_state(state))
    # Its liveness file exists but nobody holds its lock: the process is gone.
    (folder / live_name(ghost.key)).write_text("")
    assert not probe_alive(open_ledger_folder(folder), ghost.key)
    ledger.acquire(need(9), "mine", 1)
    assert [b.test_id for b in leases_in(folder)] == ["mine"]
    assert any(
        "reclaimed 9.0GiB" in line and "old::test" in line and f"pid {me.pid}" in line for line in lines
    )
    assert not (folder / live_name(ghost.key)).exists()


def test_a_live_holder_whose_liveness_file_is_removed_is_not_taken_for_dead(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    """Issue 15 (2): a temp cleaner removes a live holder's liveness file. The next access must
    not grant its memory to another session: a missing file is no evidence of death."""
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.wait_event("held", timeout=30)
    os.kill(held["pid"], signal.SIGSTOP)  # it cannot put its file back while we look
    try:
        (folder / live_name(held["key"])).unlink()
        ledger = make()
        with pytest.raises(LeaseTimeout, match=r"tests/test_x\.py::test_big"):
            ledger.acquire(need(4), "mine", 0.3)
        status = read_status(folder)
        assert [x["test_id"] for x in status["gpus"][0]["leases"]] == ["tests/test_x.py::test_big"]
        (unverifiable,) = status["unverifiable"]
        assert unverifiable["key"] == held["key"] and "missing" in unverifiable["why"]
        assert any("unverifiable" in line for line in trust_lines(status))
    finally:
        os.kill(held["pid"], signal.SIGCONT)
    # Resumed, the holder puts its file back within the watch's period, with its holdings.
    wait_until((folder / live_name(held["key"])).exists, "the holder's file is back", timeout=10)
    assert read_status(folder)["unverifiable"] == []
    assert [b.test_id for b in leases_in(folder)] == ["tests/test_x.py::test_big"]


def test_an_owner_that_cannot_be_verified_is_trusted_only_for_a_while(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.wait_event("held", timeout=30)
    os.kill(held["pid"], signal.SIGSTOP)
    try:
        (folder / live_name(held["key"])).unlink()
        lines: list[str] = []
        ledger = make(log=lines.append, trust_s=1.0)
        start = time.monotonic()
        assert ledger.acquire(need(4), "mine", 10).parts == (("GPU-0", 4 * GiB),)
        assert 1.0 <= time.monotonic() - start < 8
        (reclaimed,) = [line for line in lines if "reclaimed 8.0GiB" in line]
        assert reclaimed.endswith("its liveness could not be verified for 1s (its liveness file is missing)")
    finally:
        os.kill(held["pid"], signal.SIGCONT)


def test_this_process_puts_its_removed_liveness_file_back_promptly(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    lines: list[str] = []
    mine = make(log=lines.append)
    lease = mine.acquire(need(6), "held", 1)
    (folder / live_name(mine.owner.key)).unlink()  # a temp cleaner, say
    # Another process looks before this one is back: the lease stays booked.
    code = "import sys; from pytest_gpushare.ledger import read_status; read_status(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    assert [b.test_id for b in leases_in(folder)] == ["held"]
    # The watch puts the file back, with the holdings, without an access of this process.
    wait_until((folder / live_name(mine.owner.key)).exists, "the file is back", timeout=10)
    holdings = read_holdings(open_ledger_folder(folder), mine.owner.key)
    assert holdings is not None and b'"held"' in holdings
    assert any("recreated" in line for line in lines)
    mine.release(lease)


def test_a_planted_link_cannot_fake_a_live_owner(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    fake = "1-0123456789abcdef"
    # A link to a file whose lock is held (our own liveness file) must not pass for a live owner.
    (folder / live_name(fake)).symlink_to(folder / live_name(ledger.owner.key))
    assert not probe_alive(open_ledger_folder(folder), fake)


def test_an_alive_verdict_is_trusted_briefly_and_a_dead_one_never(
    folder: Path, spawn: Callable[..., Worker]
) -> None:
    other = spawn("hold", hold_cfg(folder, 1))
    key = other.wait_event("held", timeout=30)["key"]
    checked = open_ledger_folder(folder)
    assert probe_alive(checked, key, max_age_s=60)
    other.kill()
    # A caller that accepts an answer a minute old gets the last one: alive (the safe side).
    assert probe_alive(checked, key, max_age_s=60)
    # A caller that wants a fresh answer probes, finds it dead, and "dead" is never kept.
    assert not probe_alive(checked, key)
    assert not probe_alive(checked, key, max_age_s=60)


def test_a_killed_holder_is_reclaimed_within_the_age_of_alive_verdicts(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    ledger = make()
    other = spawn("hold", hold_cfg(folder, 8))
    other.wait_event("held", timeout=30)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4), "mine", 0.05)  # this process has just found the holder alive
    other.kill()
    killed = time.monotonic()
    assert ledger.acquire(need(4), "mine", 10).parts == (("GPU-0", 4 * GiB),)
    # Waiters look again at least every FULL_CHECK_S; the verdict is trusted ALIVE_MAX_AGE_S.
    assert time.monotonic() - killed < ALIVE_MAX_AGE_S + FULL_CHECK_S + 5


def test_holdings_are_read_whole_or_not_at_all(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.acquire(need(2), "held::test", 1)
    checked = open_ledger_folder(folder)
    holdings = read_holdings(checked, ledger.owner.key)
    assert holdings is not None and b"held::test" in holdings
    path = folder / live_name(ledger.owner.key)
    whole = path.read_bytes()
    with open(path, "r+b") as f:  # a write caught half-way: the checksum no longer matches
        f.seek(len(whole) - 5)
        f.write(b"XXXXX")
    with pytest.raises(HoldingsUnreadable, match="does not match its checksum"):
        read_holdings(checked, ledger.owner.key)
    assert read_holdings(checked, "1-0123456789abcdef") is None
