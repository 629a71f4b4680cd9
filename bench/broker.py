"""The session broker: lease round trips from many worker processes, and box-ledger writes per test.

    python bench/broker.py              # about two minutes on 2 cores
    python bench/broker.py --quick      # seconds: a smoke run (the numbers mean nothing)
    python bench/broker.py --think 5    # clients pause a random time of mean 5 ms between cycles

Rows, each measured side by side in this one run, with the load average before and after:

* ``round trip``: N worker processes (2, 8, 16, 64) each connect to one broker (a thread of this
  process, as in the xdist controller) and cycle ``acquire`` (timed: request to answer) and
  ``release`` (one-way) of 64MiB on their home GPU, on one and on eight simulated GPUs. Each
  client's first cycles (its CUDA context through the box, the pool's growth) and a warm-up
  after the start signal are not timed; the broker keeps its default linger.
* ``floor``: the same processes and frames against an echo server in a thread of this process
  (``selectors``, read a frame, answer a frame of a grant's size; releases get no answer): what a
  Unix-socket round trip through one Python thread costs before the broker decides anything.
* ``box writes``: 2 worker processes leasing 1,000 times each in turn through the broker, then
  the same through a box ledger per process (today's path without the broker). Writes are
  counted from the generation in the ledger file's header, which every write increments; the
  broker's count runs from before it starts to after it closed (start-up, growth, shrink and
  close included). Wall time of both runs is printed beside it.

Goals (issue 13): p99 round trip at most 1 ms with 16 clients; at most 1 box-ledger write per
20 tests.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import selectors
import socket
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _util import Ratio, generation, machine, median, print_ratios, quantile, table

from pytest_gpushare.broker import Broker, BrokerClient, BrokerInput
from pytest_gpushare.broker.protocol import Acquire, Granted, Release, encode, need_to_wire
from pytest_gpushare.ledger import Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.units import GiB, MemRequest, MiB

LEASE = 64 * MiB
CONTEXT = 256 * MiB


def gpus(count: int) -> list[LedgerGpu]:
    return [
        LedgerGpu(f"GPU-bench-{i}", i, "Simulated GPU", 80 * GiB, 76 * GiB, 76 * GiB) for i in range(count)
    ]


def need_for(home: str) -> Need:
    return Need(MemRequest(bytes=LEASE), prefer=home, allowed=(home,))


def start_broker(folder: Path, boxes: list[LedgerGpu]) -> Broker:
    def open_ledger(owner: Owner, context_bytes: int) -> Ledger:
        return Ledger(folder, boxes, owner, context_bytes=context_bytes)

    return Broker(open_ledger, session_id="bench", context_bytes=CONTEXT)


# --- the clients (child processes) ---------------------------------------------------------------


def broker_client(
    info: BrokerInput,
    worker_id: str,
    home: str,
    cycles: int,
    warm: int,
    think_ms: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    client = BrokerClient(info, worker_id)
    need = need_for(home)
    for n in range(2):
        client.release(client.acquire(need, f"bench::first-{n}", 60))
    times = _cycles(
        lambda i: client.acquire(need, f"bench::t{i}", 60), client.release, cycles, warm, think_ms, ready, go
    )
    out.put(times.tobytes())
    client.close()


def ledger_client(
    folder: str, boxes: list[LedgerGpu], worker_id: str, cycles: int, ready: Any, go: Any, out: Any
) -> None:
    with Ledger(folder, boxes, Owner.current("bench-direct", worker_id), context_bytes=CONTEXT) as ledger:
        need = need_for(boxes[0].uuid)
        times = _cycles(
            lambda i: ledger.acquire(need, f"bench::t{i}", 60), ledger.release, cycles, 0, 0.0, ready, go
        )
    out.put(times.tobytes())


def echo_client(address: str, cycles: int, warm: int, think_ms: float, ready: Any, go: Any, out: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    ask = encode(Acquire(1, "bench::tests/test_x.py::test_y", need_to_wire(need_for("GPU-bench-0")), 60.0))
    give = encode(Release("1-123"))

    def acquire(_i: int) -> None:
        sock.sendall(ask)
        _read_frame(sock)

    times = _cycles(acquire, lambda _lease: sock.sendall(give), cycles, warm, think_ms, ready, go)
    out.put(times.tobytes())
    sock.close()


def _read_frame(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed")
        data += chunk
    return data


def _cycles(
    acquire: Callable[[int], Any],
    release: Callable[[Any], None],
    cycles: int,
    warm: int,
    think_ms: float,
    ready: Any,
    go: Any,
) -> array[float]:
    """Seconds of each timed ``acquire`` (after ``warm`` untimed cycles), released at once."""
    ready.put(1)
    go.wait()
    rng = random.Random(os.getpid())
    times = array("d")
    clock = time.perf_counter
    for i in range(warm + cycles):
        if think_ms > 0:
            time.sleep(rng.expovariate(1000.0 / think_ms))
        start = clock()
        lease = acquire(i)
        if i >= warm:
            times.append(clock() - start)
        release(lease)
    return times


# --- the floor's echo server (a thread of this process) -----------------------------------------


class EchoServer:
    """Answers each acquire frame with a frame of a grant's size; release frames get no answer."""

    def __init__(self, folder: Path) -> None:
        self.address = str(folder / "echo")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(512)
        self._listener.setblocking(False)
        self._answer = encode(
            Granted(1, "1-123", [["GPU-bench-0", LEASE]], time.time(), 0.0001, False, False)
        )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buffers: dict[socket.socket, bytearray] = {}
        while not self._stop:
            for key, _ in self._selector.select(0.1):
                if key.fileobj is self._listener:
                    conn, _ = self._listener.accept()
                    buffers[conn] = bytearray()
                    self._selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                data = conn.recv(65536)
                if not data:
                    self._selector.unregister(conn)
                    conn.close()
                    continue
                buf = buffers[conn]
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    size = int.from_bytes(buf[:4], "big")
                    if buf[4 : 4 + size].startswith(b'["acquire"'):
                        conn.sendall(self._answer)
                    del buf[: 4 + size]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self._listener.close()


# --- rows ---------------------------------------------------------------------------------------


def run_clients(target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> tuple[list[float], float]:
    """Start one process per ``args`` (each gets ready, go, out after its own arguments), let them
    run together; all timed round trips and the wall time from the start signal to the last end."""
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(*a, ready, go, out)) for a in args]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start = time.perf_counter()
    go.set()
    times: list[float] = []
    for _ in procs:
        times.extend(array("d", out.get(timeout=600)))
    wall = time.perf_counter() - start
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"a client process failed with exit code {p.exitcode}")
    return times, wall


def round_trips(
    work: Path, clients: list[int], gpu_counts: list[int], total: int, think_ms: float
) -> list[Any]:
    rows = []
    for count in gpu_counts:
        for n in clients:
            cycles = max(20, total // n)
            warm = 5
            boxes = gpus(count)
            folder = Path(tempfile.mkdtemp(dir=work))
            with start_broker(folder / "ledgers", boxes) as broker:
                info = broker.worker_input()
                args = [(info, f"gw{i}", boxes[i % count].uuid, cycles, warm, think_ms) for i in range(n)]
                times, wall = run_clients(broker_client, args)
            echo = EchoServer(folder)
            floor, floor_wall = run_clients(echo_client, [(echo.address, cycles, warm, think_ms)] * n)
            echo.close()
            rows.append((count, n, len(times), times, wall, floor, floor_wall))
    return rows


def box_writes(work: Path, tests: int) -> dict[str, tuple[int, float]]:
    """Box-ledger writes and wall time of ``tests`` leases from 2 processes: broker and direct."""
    boxes = gpus(1)
    uuid = boxes[0].uuid
    out = {}
    folder = work / "writes-broker"
    before = generation(folder / f"gpu-{uuid}.json")
    start = time.perf_counter()
    with start_broker(folder, boxes) as broker:
        info = broker.worker_input()
        args = [(info, f"gw{i}", uuid, tests // 2, 0, 0.0) for i in range(2)]
        run_clients(broker_client, args)
    wall = time.perf_counter() - start
    out["broker"] = (generation(folder / f"gpu-{uuid}.json") - before, wall)
    folder = work / "writes-direct"
    Ledger(folder, boxes, Owner.current("setup", "setup"), context_bytes=0).close()
    before = generation(folder / f"gpu-{uuid}.json")
    start = time.perf_counter()
    run_clients(ledger_client, [(str(folder), boxes, f"gw{i}", tests // 2) for i in range(2)])
    out["direct"] = (generation(folder / f"gpu-{uuid}.json") - before, time.perf_counter() - start)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--think", type=float, default=0.0, metavar="MS", help="mean pause between cycles")
    parser.add_argument("--clients", default="2,8,16,64", help="client counts (comma-separated)")
    opts = parser.parse_args(argv)
    clients = [2, 4] if opts.quick else [int(c) for c in opts.clients.split(",")]
    total = 200 if opts.quick else 4000
    tests = 100 if opts.quick else 2000
    began = time.perf_counter()
    print(machine())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-broker-") as tmp:
        work = Path(tmp)
        rows = round_trips(work, clients, [1, 8], total, opts.think)
        writes = box_writes(work, tests)
    pause = f" with {opts.think:g} ms think" if opts.think else " back to back"
    table(
        f"lease round trip (acquire to answer), clients cycling{pause}",
        ["GPUs", "clients", "timed", "p50", "p99", "floor p50", "floor p99", "wall", "floor wall"],
        [
            (
                g,
                n,
                k,
                _us(median(t)),
                _us(quantile(t, 0.99)),
                _us(median(f)),
                _us(quantile(f, 0.99)),
                f"{w:.2f} s",
                f"{fw:.2f} s",
            )
            for g, n, k, t, w, f, fw in rows
        ],
    )
    table(
        f"box-ledger writes for {tests} leases from 2 processes",
        ["path", "writes", "per test", "wall"],
        [(path, n, f"{n / tests:.4f}", f"{wall:.2f} s") for path, (n, wall) in writes.items()],
    )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"wall time of this benchmark: {time.perf_counter() - began:.1f} s")
    ratios = [
        Ratio(f"broker-p99-{n}-clients-{g}-gpu", quantile(t, 0.99) * 1e6, 1000.0, unit="us")
        for g, n, _, t, *_ in rows
        if n == 16 or opts.quick
    ]
    ratios.append(
        Ratio("box-writes-per-1000-tests", writes["broker"][0] * 1000 / tests, 50.0, unit="per1000")
    )
    print_ratios(ratios)
    return 0


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


if __name__ == "__main__":
    sys.exit(main())
