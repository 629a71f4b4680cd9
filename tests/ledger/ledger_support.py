"""Helpers of the ledger's tests (tests/ledger/test_ledger_*.py): GPUs and needs, what a ledger
file lists, ledgers opened for one test, and worker processes (ledger_worker.py).

Not a conftest (the suite keeps one, tests/conftest.py): :func:`folder`, :func:`make` and
:func:`spawn` are fixture functions that a test module registers itself, by name::

    make = pytest.fixture(ledger_support.make)
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import wait_until

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.access import ledger_name
from pytest_gpushare.ledger.admission import LedgerGpu, Need
from pytest_gpushare.ledger.codec import parse_gpu_state
from pytest_gpushare.ledger.files import read_file
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.handle import Ledger
from pytest_gpushare.ledger.records import TEST, Booking, GpuState, Owner
from pytest_gpushare.units import GiB, MemRequest

WORKER = Path(__file__).parent / "ledger_worker.py"


def gpu(n: int = 0, total: int = 16 * GiB, usable: int = 10 * GiB, capacity: int | None = None) -> LedgerGpu:
    return LedgerGpu(f"GPU-{n}", n, f"Sim {n}", total, usable if capacity is None else capacity, usable)


def gpu_dict(n: int, total: int, usable: int) -> dict[str, Any]:
    """A GPU as a worker's configuration gives it (``LedgerGpu(**gpu_dict(...))``)."""
    return gpu(n, total, usable).__dict__


def need(size: float = 1, **kw: Any) -> Need:
    return Need(MemRequest(bytes=int(size * GiB)), **kw)


def state_of(folder: Path, uuid: str = "GPU-0") -> GpuState:
    """The GPU's ledger as a reader without the lock sees it (ledgers are replaced whole, so it
    sees one version or the next, never half of one)."""
    data = read_file(open_ledger_folder(folder, create=False), ledger_name(uuid))
    assert data is not None, f"no ledger for {uuid}"
    return parse_gpu_state(data, uuid)


def leases_in(folder: Path, uuid: str = "GPU-0") -> list[Booking]:
    """The test leases (not the contexts) that the GPU's ledger file lists."""
    return [b for b in state_of(folder, uuid).bookings if b.kind == TEST]


def assert_owner_gone(folder: Path, uuids: list[str], key: str) -> None:
    for uuid in uuids:
        state = state_of(folder, uuid)
        assert key not in state.owners, uuid
        assert all(b.owner != key for b in state.bookings), uuid
        assert all(w.owner != key for w in state.waiters), uuid


def folder(tmp_path: Path) -> Path:
    """The ledger folder of a test (not created yet)."""
    return tmp_path / "ledgers"


def make(folder: Path) -> Iterator[Callable[..., Ledger]]:
    """A factory of ledgers in ``folder`` (one owner each, like separate processes), all closed
    when the test ends."""
    opened: list[Ledger] = []

    def factory(
        gpus: list[LedgerGpu] | None = None,
        session: str = "s1",
        worker: str = "gw0",
        context: int = 0,
        **kw: Any,
    ) -> Ledger:
        ledger = Ledger(folder, gpus or [gpu()], Owner.current(session, worker), context_bytes=context, **kw)
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        # Some tests break the folder on purpose; the liveness lock goes whatever close says.
        with contextlib.suppress(LedgerError):
            ledger.close()


class Worker:
    """A process running ledger_worker.py in a role; its stdout lines (JSON events) are collected
    in ``events`` as they come."""

    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), role, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The first event called ``name``, waited for up to ``timeout`` seconds."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in list(self.events) if e["event"] == name][:1]
            return bool(found)

        wait_until(
            seen, f"a {name!r} event from the {self.role} worker (so far: {self.events})", timeout=timeout
        )
        return found[0]

    def let_go(self) -> None:
        """Close the worker's stdin: a holding role releases its lease and ends."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def spawn() -> Iterator[Callable[[str, dict[str, Any]], Worker]]:
    """A factory of :class:`Worker` processes, all stopped when the test ends."""
    started: list[Worker] = []

    def start(role: str, cfg: dict[str, Any]) -> Worker:
        started.append(Worker(role, cfg))
        return started[-1]

    yield start
    for w in started:
        w.stop()


def hold_cfg(folder: Path, size: float, gpus: list[LedgerGpu] | None = None, **kw: Any) -> dict[str, Any]:
    """The configuration of a worker that holds ``size`` GiB until told to let go."""
    gpus = gpus or [gpu()]
    return {
        "folder": str(folder),
        "gpus": [g.__dict__ for g in gpus],
        "need": {"bytes": int(size * GiB), **kw.pop("need", {})},
        "test_id": kw.pop("test_id", "tests/test_x.py::test_other"),
        "session": kw.pop("session", "other-session"),
        "worker": kw.pop("worker", "gw7"),
        **kw,
    }
