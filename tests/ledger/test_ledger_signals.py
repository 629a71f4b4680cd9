"""What a process sees of the ledgers without their locks (ledger/signals.py): a waiter woken by
the write of a ledger it waits on, and another session's waiters read from a ledger's head, kept
true under SIGKILL by the next locked pass."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ledger_support
import pytest
from conftest import wait_until
from ledger_support import Worker, hold_cfg, need

from pytest_gpushare.errors import LeaseTimeout
from pytest_gpushare.ledger.access import ledger_name
from pytest_gpushare.ledger.codec import LEDGER_FRAME, frame, unframe
from pytest_gpushare.ledger.files import read_file, write_file
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.handle import FULL_CHECK_S, Ledger
from pytest_gpushare.ledger.signals import Changes, Sleeper, Watches

folder = pytest.fixture(ledger_support.folder)
make = pytest.fixture(ledger_support.make)
spawn = pytest.fixture(ledger_support.spawn)


def test_a_watch_wakes_on_the_write_of_a_named_file_only(tmp_path: Path) -> None:
    opened = open_ledger_folder(tmp_path / "ledgers")
    changes = Changes.open(opened)
    assert changes is not None, "inotify is on every Linux this runs on"
    try:
        assert not changes.wait(0.01, ["gpu-a.json"])
        write_file(opened, "gpu-b.json", b"x", "t")
        assert not changes.wait(0.01, ["gpu-a.json"])  # another GPU's ledger
        threading.Timer(0.05, lambda: write_file(opened, "gpu-a.json", b"x", "t")).start()
        started = time.monotonic()
        assert changes.wait(10.0, ["gpu-a.json"])
        assert time.monotonic() - started < 5.0
    finally:
        changes.close()
        opened.close()


def test_a_sleeper_polls_where_the_folder_cannot_be_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Changes, "open", classmethod(lambda cls, folder: None))
    opened = open_ledger_folder(tmp_path / "ledgers")
    sleeper = Sleeper(["GPU-a"], lambda: opened, Watches())
    try:
        assert not sleeper.watched
        sleeper.mark()
        assert not sleeper.sleep(0.01)
        write_file(opened, ledger_name("GPU-a"), b"x", "t")
        assert sleeper.sleep(0.01)
    finally:
        sleeper.close()
        opened.close()


def test_a_waiting_request_is_served_when_the_ledger_is_written(make: Callable[..., Ledger]) -> None:
    holder, waiter = make(session="a"), make(session="b")
    lease = holder.acquire(need(8), "big", 1)
    got: list[float] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(need(8), "next", 30).waited_s))
    thread.start()
    wait_until(lambda: holder.others_waiting(["GPU-0"]) == {"GPU-0"}, "the waiter in the ledger's head")
    holder.release(lease)
    thread.join(30)
    assert got, "the waiter was not served"


def _wait_in(ledger: Ledger, seconds: float) -> threading.Thread:
    """A request of ``ledger`` that waits ``seconds`` for 8GiB in a thread, then times out."""

    def wait() -> None:
        with pytest.raises(LeaseTimeout):
            ledger.acquire(need(8), "waits", seconds)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


def test_a_ledgers_head_names_other_sessions_waiters_not_ours(make: Callable[..., Ledger]) -> None:
    holder, waiter, same = make(session="a"), make(session="b"), make(session="b", worker="gw1")
    lease = holder.acquire(need(8), "big", 1)
    assert holder.others_waiting(["GPU-0"]) == set()
    thread = _wait_in(waiter, 0.5)
    wait_until(lambda: holder.others_waiting(["GPU-0"]) == {"GPU-0"}, "session b's waiter seen by a")
    assert same.others_waiting(["GPU-0"]) == set()  # b's own waiter
    thread.join(30)
    assert holder.others_waiting(["GPU-0"]) == set()  # its wait withdrawn
    holder.release(lease)


def test_a_ledger_written_by_an_older_version_is_read_whole(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    holder, waiter = make(session="a"), make(session="b")
    lease = holder.acquire(need(8), "big", 1)
    thread = _wait_in(waiter, 2.0)
    opened = open_ledger_folder(folder)
    name = ledger_name("GPU-0")

    def old_format_with_the_waiter() -> bool:
        payload, generation = unframe(LEDGER_FRAME, read_file(opened, name) or b"")
        document = json.loads(payload)
        if not document["waiters"]:
            return False
        del document["waiting"]  # as a version before the waiting sessions wrote it
        old = frame(LEDGER_FRAME, json.dumps(document).encode(), generation)
        write_file(opened, name, old, "t")
        return True

    wait_until(old_format_with_the_waiter, "session b's waiter in the ledger")
    assert holder.others_waiting(["GPU-0"]) == {"GPU-0"}
    thread.join(30)
    holder.release(lease)
    opened.close()


def test_a_killed_waiter_is_named_until_the_next_locked_pass_only(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    # The broker of another session reads the head and gives its spare memory back: a pass
    # over the ledger, which drops the dead waiter, so it does not make anyone give back twice.
    holder = make(session="a")
    lease = holder.acquire(need(8), "big", 1)
    other = spawn("hold", hold_cfg(folder, 8, timeout=60))
    wait_until(lambda: holder.others_waiting(["GPU-0"]) == {"GPU-0"}, "the other session's waiter")
    other.kill()
    assert holder.others_waiting(["GPU-0"]) == {"GPU-0"}  # no pass over the ledger yet
    holder.release(lease)  # the give-back: a locked pass

    def dropped() -> bool:
        holder.snapshot()  # another pass, should the dead verdict have waited for ALIVE_MAX_AGE_S
        return holder.others_waiting(["GPU-0"]) == set()

    wait_until(dropped, "the killed waiter dropped from the ledger's head")


def test_a_write_that_cannot_serve_a_waiter_does_not_make_it_take_the_lock(
    make: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every write wakes every waiter; only one that the ledger, read without the lock, could
    # serve tries under the lock (else a queue of vain passes forms ahead of the next release).
    holder, waiter, busy = make(session="a"), make(session="b"), make(session="c")
    lease = holder.acquire(need(8), "big", 1)
    tries: list[float] = []
    attempt = Ledger._attempt

    def counted(self: Ledger, *args: Any, **kw: Any) -> Any:
        if self is waiter:
            tries.append(time.monotonic())
        return attempt(self, *args, **kw)

    monkeypatch.setattr(Ledger, "_attempt", counted)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(need(8), "next", 30)))
    thread.start()
    wait_until(lambda: holder.others_waiting(["GPU-0"]) == {"GPU-0"}, "the waiter registered")
    wait_until(lambda: len(tries) >= 2, "its try once the folder was watched")
    before = len(tries)
    started = time.monotonic()
    for n in range(5):
        busy.release(busy.acquire(need(1), f"small-{n}", 1))  # ten writes, none frees 8GiB
    # A try that FULL_CHECK_S brings (dead owners, aging) may come; the ten writes bring none.
    assert len([t for t in tries[before:] if t - started < FULL_CHECK_S]) == 0
    holder.release(lease)
    thread.join(30)
    assert got, "the waiter was not served"
