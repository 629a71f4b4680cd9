"""The ledger folder's locks on real files: a busy lock is waited for in the kernel (other
processes hold it for real), the wait ends at its deadline and its late grant lets go, a forked
child keeps no lock of its parent's alive."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger import locks
from pytest_gpushare.ledger.folder import LedgerFolder, open_ledger_folder
from pytest_gpushare.ledger.locks import locked

HOLDER = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
fcntl.flock(fd, fcntl.LOCK_UN)
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def folder(tmp_path: Path) -> LedgerFolder:
    return open_ledger_folder(tmp_path / "ledgers")


class Holder:
    """Another process that holds the flock of ``path`` until told to let go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "locked"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self._line() == "released"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def other(folder: LedgerFolder) -> Iterator[Holder]:
    """Another process, holding the lock ``a.lock`` of the folder until told to let go."""
    holder = Holder(folder.path / "a.lock")
    yield holder
    holder.stop()


def lockable_by_others(path: Path) -> bool:
    """Whether a new open file description (as another process has) can take the flock now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing lets go of a lock this probe took


def kernel_waits() -> int:
    return sum(t.name == "gpushare-lock-wait" and t.is_alive() for t in threading.enumerate())


def count_attempts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each non-blocking flock the locks try took the lock."""
    calls: list[bool] = []
    original = locks.try_flock

    def counting(fd: int, *, shared: bool = False) -> bool:
        calls.append(original(fd, shared=shared))
        return calls[-1]

    monkeypatch.setattr(locks, "try_flock", counting)
    return calls


@contextlib.contextmanager
def taking(folder: LedgerFolder) -> Iterator[threading.Event]:
    """A thread takes the lock ``a.lock``, which another process holds, and holds it until the
    block ends; the block starts once the thread waits in the kernel, and the event is set once
    it holds the lock."""
    got = threading.Event()
    leave = threading.Event()

    def take() -> None:
        with locked(folder, ["a.lock"], 30):
            got.set()
            leave.wait(30)

    taker = threading.Thread(target=take)
    taker.start()
    try:
        wait_until(lambda: kernel_waits() > 0, "the wait moved to the kernel")
        yield got
    finally:
        leave.set()
        taker.join(30)


def test_a_free_lock_is_taken_without_waiting(folder: LedgerFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = count_attempts(monkeypatch)
    before = kernel_waits()
    with locked(folder, ["a.lock"], 5):
        assert not lockable_by_others(folder.path / "a.lock")
    assert attempts == [True]  # one non-blocking attempt, which took it
    assert kernel_waits() == before
    assert lockable_by_others(folder.path / "a.lock")


def test_a_lock_held_by_another_process_is_waited_for_in_the_kernel(
    other: Holder, monkeypatch: pytest.MonkeyPatch, folder: LedgerFolder
) -> None:
    path = other.path
    attempts = count_attempts(monkeypatch)
    with taking(folder) as got:
        cpu = time.process_time()
        time.sleep(0.2)  # a window to measure, not a wait for a condition
        # Nobody polls: one non-blocking try, and the waiting costs (next to) no CPU.
        assert attempts == [False]
        assert time.process_time() - cpu < 0.1
        assert not got.is_set()
        other.release()
        assert got.wait(20)
        assert not lockable_by_others(path)  # held through the waiting descriptor
    assert lockable_by_others(path)  # and let go when the access ends
    assert attempts == [False]


def test_a_kernel_wait_gives_up_at_its_deadline_and_its_late_grant_lets_go(
    folder: LedgerFolder, other: Holder
) -> None:
    path = other.path
    started = time.monotonic()
    message = rf"could not lock .*a\.lock within 0\.2s: it is held by pid {other.proc.pid} \(python"
    with pytest.raises(LedgerError, match=message), locked(folder, ["a.lock"], 0.2):
        pass  # pragma: no cover - never reached
    assert 0.15 <= time.monotonic() - started < 5
    assert kernel_waits() >= 1  # the given-up wait still sits in the kernel
    other.release()
    # When the kernel grants the abandoned wait, its descriptor is closed: the lock is free again.
    wait_until(lambda: lockable_by_others(path), "the late grant let go")
    wait_until(lambda: kernel_waits() == 0, "the waiting thread ended")
    with locked(folder, ["a.lock"], 5):
        assert not lockable_by_others(path)


def test_waiters_in_several_processes_each_get_the_lock_alone(folder: LedgerFolder) -> None:
    """Real processes contend for one lock; a counter file updated under it never loses an update."""
    counter = folder.path / "counter"
    counter.write_text("0")
    script = (
        "import sys, time\n"
        "from pytest_gpushare.ledger.folder import open_ledger_folder\n"
        "from pytest_gpushare.ledger.locks import locked\n"
        "folder = open_ledger_folder(sys.argv[1])\n"
        "path = folder.path / 'counter'\n"
        "for _ in range(100):\n"
        "    with locked(folder, ['a.lock'], 60):\n"
        "        n = int(path.read_text())\n"
        "        time.sleep(0.0002)\n"
        "        path.write_text(str(n + 1))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder.path)]) for _ in range(6)]
    assert [p.wait(120) for p in procs] == [0] * 6
    assert counter.read_text() == "600"


def test_a_lock_file_removed_during_the_wait_is_not_trusted(folder: LedgerFolder, other: Holder) -> None:
    path = other.path
    with taking(folder) as got:
        path.unlink()  # a cleaner removed it: the old inode's lock guards nothing now
        other.release()
        assert got.wait(20)
        # The access holds the lock of the file now at the path, not of the removed one.
        assert path.exists() and not lockable_by_others(path)


def fork_and_report(child: Callable[[], str]) -> tuple[int, str]:
    """Fork; the child runs ``child``, writes its answer and then stays alive until killed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            answer = child()
        except BaseException as exc:
            answer = f"{type(exc).__name__}: {exc}"
        os.write(write, answer.encode() + b"\n")
        time.sleep(120)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        return pid, f.readline().decode().strip()


def stop_child(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    os.waitpid(pid, 0)


def test_a_forked_child_keeps_no_lock_of_its_parent_alive(folder: LedgerFolder, other: Holder) -> None:
    path = other.path
    with taking(folder) as inside:
        other.release()
        assert inside.wait(20)
        # The parent holds the lock through a waiting descriptor; a child inherits a copy of it.
        pid, answer = fork_and_report(lambda: "alive")
    try:
        assert answer == "alive"
        # The child lives on, yet the lock is free: its copy was closed at fork.
        assert lockable_by_others(path)
    finally:
        stop_child(pid)


def test_a_forked_child_closes_its_copy_of_an_abandoned_wait(folder: LedgerFolder, other: Holder) -> None:
    path = other.path
    with pytest.raises(LedgerError, match=r"within 0\.1s"), locked(folder, ["a.lock"], 0.1):
        pass  # pragma: no cover - never reached
    pid, answer = fork_and_report(lambda: "alive")
    try:
        assert answer == "alive"
        other.release()
        # The parent's abandoned wait is granted and closed; the child's copy must not keep it.
        wait_until(lambda: lockable_by_others(path), "the lock came free while the child lives")
    finally:
        stop_child(pid)


def test_a_forked_child_takes_locks_of_its_own(folder: LedgerFolder) -> None:
    with locked(folder, ["a.lock"], 5):
        pass  # the parent has a lock object for the path now

    def child() -> str:
        with locked(folder, ["a.lock"], 5):
            return "locked" if not lockable_by_others(folder.path / "a.lock") else "not held"

    pid, answer = fork_and_report(child)
    stop_child(pid)
    assert answer == "locked"
    with locked(folder, ["a.lock"], 5):
        assert not lockable_by_others(folder.path / "a.lock")
