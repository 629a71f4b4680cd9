"""The session broker's crash semantics with real processes: a controller process running the
broker, worker processes leasing from it, SIGKILL and SIGSTOP, and another session on the same
ledger folder (tests/broker_workers/proc.py)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from pytest_gpushare.errors import LeaseTimeout
from pytest_gpushare.ledger import Ledger, LedgerGpu, Need, Owner, read_status
from pytest_gpushare.units import GiB, MemRequest, MiB

PROC = Path(__file__).parent / "broker_workers" / "proc.py"
GPU = {
    "uuid": "GPU-0",
    "index": 0,
    "name": "Sim 0",
    "total_bytes": 8 * GiB,
    "capacity_bytes": 4 * GiB,
    "usable_bytes": 4 * GiB,
}
CONTEXT = 256 * MiB


class Proc:
    """A process of proc.py: commands go to its stdin, its events come back one by one."""

    def __init__(self, role: str, cfg: dict[str, Any], sockets: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        env.update(
            PYTHONPATH=os.pathsep.join([str(PROC.parent), os.environ.get("PYTHONPATH", "")]),
            # The broker's socket folder goes under TMPDIR: a controller these tests kill leaves
            # its folder there, not in the real /tmp.
            TMPDIR=sockets,
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(PROC), role, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next event other than a log line, which must be ``name``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {name!r} event in {timeout}s (process ended: {self.proc.poll()})")
            if event["event"] != "log":
                assert event["event"] == name, event
                return event

    def acquire(self, test_id: str, size: int, timeout: float = 10.0) -> dict[str, Any]:
        self.send(op="acquire", test_id=test_id, need=need_spec(size), timeout=timeout)
        return self.expect("granted")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(30)


def need_spec(size: int) -> dict[str, Any]:
    return {"bytes": size, "prefer": "GPU-0", "allowed": ["GPU-0"]}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []
    sockets = tempfile.mkdtemp(prefix="gsb-")  # short: a socket path must fit in 108 bytes

    def start(role: str, **cfg: Any) -> Proc:
        base = {"folder": str(tmp_path / "ledgers"), "gpus": [GPU], "context": CONTEXT}
        started.append(Proc(role, {**base, **cfg}, sockets))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.kill()
        p.proc.wait(30)
    shutil.rmtree(sockets, ignore_errors=True)


def booked(folder: Path) -> list[tuple[str, str, int]]:
    """The box's bookings on GPU-0 after reclaiming the dead: (worker id, test id, bytes)."""
    gpus = {g["uuid"]: g for g in read_status(folder)["gpus"]}
    if "GPU-0" not in gpus:
        return []
    return sorted((b["owner"].get("worker_id"), b["test_id"], b["bytes"]) for b in gpus["GPU-0"]["leases"])


def other_session(folder: Path) -> Ledger:
    return Ledger(folder, [LedgerGpu(**GPU)], Owner.current("other-session", "main"), context_bytes=0)


def start_session(procs: Callable[..., Proc], **cfg: Any) -> tuple[Proc, dict[str, Any]]:
    controller = procs("controller", **cfg)
    return controller, controller.expect("ready")


def warm_worker(procs: Callable[..., Proc], info: dict[str, Any], worker_id: str, **cfg: Any) -> Proc:
    """A connected worker whose context is booked, so its next leases come from the pool."""
    worker = procs("worker", input=info, worker_id=worker_id, **cfg)
    worker.expect("connected")
    first = worker.acquire("warm-up", GiB)
    worker.send(op="release", lease_id=first["lease_id"])
    worker.expect("released")
    return worker


def test_a_killed_workers_leases_return_at_once(procs: Callable[..., Proc], tmp_path: Path) -> None:
    _, ready = start_session(procs)
    doomed = warm_worker(procs, ready["input"], "gw0")
    doomed.acquire("t-pool", 2 * GiB)
    survivor = procs("worker", input=ready["input"], worker_id="gw1")
    survivor.expect("connected")
    survivor.send(op="acquire", test_id="t-waits", need=need_spec(3 * GiB), timeout=30.0)
    killed = time.monotonic()
    doomed.signal(signal.SIGKILL)
    granted = survivor.expect("granted")
    assert granted["parts"] == [["GPU-0", 3 * GiB]]
    assert time.monotonic() - killed < 2.0
    assert not [b for b in booked(tmp_path / "ledgers") if b[0] == "gw0"], "gw0's context is still booked"


def test_a_killed_controllers_running_worker_keeps_its_memory_until_it_dies(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    folder = tmp_path / "ledgers"
    controller, ready = start_session(procs)
    worker = warm_worker(procs, ready["input"], "gw0")
    worker.acquire("t-pool", 2 * GiB)
    worker.acquire("t-more", GiB)
    held = booked(folder)
    assert sum(n for _, _, n in held) >= 3 * GiB + CONTEXT
    controller.signal(signal.SIGKILL)
    assert booked(folder) == held, "the dead controller's bookings were reclaimed while its worker runs"
    with other_session(folder) as other, pytest.raises(LeaseTimeout):
        other.acquire(Need(MemRequest(bytes=GiB)), "t-other", 0.3)
    worker.signal(signal.SIGKILL)
    assert booked(folder) == []
    with other_session(folder) as other:
        assert other.acquire(Need(MemRequest(bytes=4 * GiB)), "t-other", 1).parts == (("GPU-0", 4 * GiB),)


def test_a_stopped_controller_makes_nobody_wait_past_their_timeout(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    controller, ready = start_session(procs)
    worker = warm_worker(procs, ready["input"], "gw0", grace=0.5)
    worker.acquire("t-pool", 3 * GiB)
    controller.signal(signal.SIGSTOP)
    try:
        with other_session(tmp_path / "ledgers") as other:
            start = time.monotonic()
            with pytest.raises(LeaseTimeout):
                other.acquire(Need(MemRequest(bytes=2 * GiB)), "t-other", 0.5)
            assert time.monotonic() - start < 1.5
        start = time.monotonic()
        worker.send(op="acquire", test_id="t-own", need=need_spec(GiB // 4), timeout=0.5)
        refused = worker.expect("refused")
        assert refused["error"] == "LeaseTimeout"
        assert "did not answer" in refused["text"]
        assert time.monotonic() - start < 2.5  # its timeout, the grace, and a process's start-up slack
    finally:
        controller.signal(signal.SIGCONT)


def test_cancel_in_the_controller_ends_a_workers_wait_within_a_second(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    controller, ready = start_session(procs)
    worker = warm_worker(procs, ready["input"], "gw0")
    with other_session(tmp_path / "ledgers") as other:
        other.acquire(Need(MemRequest(bytes=4 * GiB - CONTEXT)), "t-elsewhere", 5)
        worker.send(op="acquire", test_id="t-starved", need=need_spec(GiB), timeout=60.0)
        wait_until(
            lambda: any(
                w["test_id"].endswith("t-starved")
                for g in read_status(tmp_path / "ledgers")["gpus"]
                for w in g["waiters"]
            ),
            "the worker's request waiting in the box",
        )
        start = time.monotonic()
        controller.send(op="cancel")
        assert controller.expect("cancelled")["count"] == 1
        refused = worker.expect("refused")
        assert refused["error"] == "LeaseCancelled"
        assert time.monotonic() - start < 1.0
