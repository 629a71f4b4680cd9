"""Lease cost: one acquire+release cycle of the ledger, next to the floor measured in the same run.

    python bench/lease_cost.py                          # about half a minute on 2 cores
    python bench/lease_cost.py --quick                  # seconds: a smoke run

Rows, first in one process, then with 16 processes cycling at once on one GPU's ledger (memory
is available for all of them: they wait for the lock, never for memory):

* ``raw flock + page-cache write``: the physical floor (issue 13): ``fcntl.flock`` on a lock
  descriptor kept open, one ``pwrite`` of the ledger file's size into a descriptor kept open (a
  copy into the page cache), unlock. Nothing an update of a shared file can skip;
* ``flock + JSON RMW``: that lock held around one atomic read-modify-replace of a copy of the
  ledger file as it is during a cycle (read, parse, add a booking, dump, write a fresh file,
  ``os.replace``): issue 7's floor, which flatters (filelock's own Python path, a new file);
* ``flock + JSON RMW in place``: the same, rewriting the file in place, framed as the ledger
  frames it (read, check the frame, parse, add a booking, dump, frame, ``pwrite``): the least one
  update of the ledger as it is now written can cost;
* ``ledger lock + JSON RMW``: the atomic read-modify-replace under the ledger's own lock
  (:func:`pytest_gpushare.ledger.locks.locked`: filelock for a free lock, a kernel wait for a busy one);
* ``lease cycle``: :meth:`Ledger.acquire` + :meth:`Ledger.release` of 64MiB on a simulated 24GiB
  GPU. A cycle updates the ledger twice (the grant and the release).

Contending processes cycle back to back by default; ``--think MS`` makes each pause a random
time of mean MS between cycles (a test running), which is how tests use the ledger.

This is the path of single-process runs and ``gpushare run`` (under xdist, workers lease
through the session's broker: bench/broker.py). Goals: the lease cycle within 4x of the physical
floor (one process; a cycle updates the ledger twice, so 2x is the least it can cost); p99 of a
cycle at most 10 ms with 16 contending processes on 2 cores. The load average is printed before
and after.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _util import Ratio, load, machine, median, ms, print_ratios, quantile, table
from filelock import FileLock

from pytest_gpushare.ledger import Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.ledger.codec import LEDGER_FRAME, frame, unframe
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.locks import locked
from pytest_gpushare.units import GiB, MemRequest, MiB

UUID = "GPU-bench-lease-cost"
GPU = LedgerGpu(
    uuid=UUID,
    index=0,
    name="Simulated GPU",
    total_bytes=24 * GiB,
    capacity_bytes=21 * GiB,
    usable_bytes=21 * GiB,
)
NEED = Need(mem=MemRequest(bytes=64 * MiB))
CONTEXT_BYTES = 512 * MiB
FLOCK = "raw flock + page-cache write"
FLOOR = "flock + JSON RMW"
FLOOR_IN_PLACE = "flock + JSON RMW in place"
FLOOR_KERNEL = "ledger lock + JSON RMW"
CYCLE = "lease cycle"
#: How often the bare filelock rows retry a busy lock (what the ledger's lock did before it waited
#: in the kernel; filelock's default, 50 ms, would make the contended floor meaningless).
LOCK_POLL_S = 0.0005


def _lock(path: Path) -> FileLock:
    # As ledger/locks.py makes its locks: the floor must not be cheaper for using other options.
    return FileLock(path, mode=0o600, thread_local=False, fallback_to_soft=False, poll_interval=LOCK_POLL_S)


def _time(fn: Callable[[], None], n: int, think: Callable[[], float] | None = None) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``; ``think`` gives a pause before each call."""
    out = []
    clock = time.perf_counter
    for _ in range(n):
        if think is not None:
            time.sleep(think())
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def _ledger(folder: Path, worker: str) -> Ledger:
    return Ledger(folder, [GPU], Owner.current("bench", worker), context_bytes=CONTEXT_BYTES)


def _cycle(ledger: Ledger, test_id: str) -> Callable[[], None]:
    def cycle() -> None:
        ledger.release(ledger.acquire(NEED, test_id, timeout=60))

    return cycle


def _floor(work: Path, kind: str) -> Callable[[], None]:
    if kind == FLOOR_KERNEL:
        folder = open_ledger_folder(work, create=False)

        def with_ledger_lock() -> None:
            with locked(folder, ["floor.lock"], 60):
                _rmw_only(work / "floor.json")

        return with_ledger_lock
    if kind == FLOCK:
        return _physical_floor(work)
    lock = _lock(work / "floor.lock")

    def with_rmw() -> None:
        with lock:
            _rmw_only(work / "floor.json")

    def with_rmw_in_place() -> None:
        with lock:
            _rmw_in_place(work / "floor-in-place.json")

    return {FLOOR: with_rmw, FLOOR_IN_PLACE: with_rmw_in_place}[kind]


def _physical_floor(work: Path) -> Callable[[], None]:
    """Lock, one write of the ledger's size into the page cache, unlock: both descriptors stay
    open (the ledger may keep its own open the same way)."""
    lock_fd = os.open(work / "physical.lock", os.O_RDWR | os.O_CREAT, 0o600)
    data_fd = os.open(work / "physical.json", os.O_RDWR | os.O_CREAT, 0o600)
    payload = (work / "floor-in-place.json").read_bytes()

    def physical() -> None:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            os.pwrite(data_fd, payload, 0)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    return physical


BENCH_BOOKING = {
    "lease_id": "bench",
    "owner": "0-00000000",
    "test_id": "bench::floor",
    "bytes": 64 * MiB,
    "kind": "test",
    "taken_at": 1.0,
}


def _rmw_only(path: Path) -> None:
    """The floor's update: read, parse, add or drop a booking (as a grant or a release does),
    dump, write a fresh file, replace."""
    with open(path, "rb") as f:
        data = json.loads(f.read())
    bookings = data["bookings"]
    if bookings and bookings[-1] == BENCH_BOOKING:
        bookings.pop()
    else:
        bookings.append(BENCH_BOOKING)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(data, separators=(",", ":")).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _rmw_in_place(path: Path) -> None:
    """The in-place floor's update: read, check the frame, parse, add or drop a booking, dump,
    frame, write over the file (and cut it where the new content ends)."""
    fd = os.open(path, os.O_RDWR)
    try:
        data = json.loads(unframe(LEDGER_FRAME, os.pread(fd, 1 << 20, 0))[0])
        bookings = data["bookings"]
        if bookings and bookings[-1] == BENCH_BOOKING:
            bookings.pop()
        else:
            bookings.append(BENCH_BOOKING)
        new = frame(LEDGER_FRAME, json.dumps(data, separators=(",", ":")).encode(), 1)
        os.pwrite(fd, new, 0)
        if os.fstat(fd).st_size > len(new):
            os.ftruncate(fd, len(new))
    finally:
        os.close(fd)


def ledger_sized_copy(folder: Path, ledger: Ledger, work: Path) -> int:
    """Copy the GPU's ledger as it is while a lease is held, the file a cycle really rewrites, as
    the floors' files: plain JSON, and framed for the in-place floor."""
    lease = ledger.acquire(NEED, "bench::sizing", timeout=60)
    try:
        data = (folder / f"gpu-{UUID}.json").read_bytes()
    finally:
        ledger.release(lease)
    payload = unframe(LEDGER_FRAME, data)[0]
    (work / "floor.json").write_bytes(payload)
    (work / "floor-in-place.json").write_bytes(data)
    return len(data)


# --- one process ------------------------------------------------------------------------------


def single(work: Path, cycles: int) -> tuple[dict[str, list[float]], int]:
    """The three rows in this process, interleaved in blocks so a slow spell hits every row alike."""
    folder = work / "ledger"
    ledger = _ledger(folder, "main")
    try:
        size = ledger_sized_copy(folder, ledger, work)
        fns = {kind: _floor(work, kind) for kind in (FLOCK, FLOOR, FLOOR_IN_PLACE, FLOOR_KERNEL)}
        fns[CYCLE] = _cycle(ledger, "bench::single")
        for fn in fns.values():
            _time(fn, max(20, cycles // 10))
        results: dict[str, list[float]] = {name: [] for name in fns}
        block = max(1, cycles // 10)
        for _ in range(cycles // block):
            for name, fn in fns.items():
                results[name] += _time(fn, block)
        return results, size
    finally:
        ledger.close()


# --- processes in parallel --------------------------------------------------------------------


def _contender(kind: str, work: str, rank: int, cycles: int, think_s: float, barrier: Any, out: Any) -> None:
    root = Path(work)
    ledger = None
    if kind == CYCLE:
        ledger = _ledger(root / "ledger", f"p{rank}")
        fn = _cycle(ledger, f"bench::contended[{rank}]")
    else:
        fn = _floor(root, kind)
    try:
        _time(fn, 5)
        rng = random.Random(rank)
        pause = (lambda: rng.uniform(0, 2 * think_s)) if think_s > 0 else None
        barrier.wait()
        out.put(_time(fn, cycles, pause))
    finally:
        if ledger is not None:
            ledger.close()


def in_processes(work: Path, kind: str, procs: int, cycles: int, think_s: float) -> list[float]:
    """Cycle times of ``procs`` fresh processes that start together and cycle ``cycles`` times."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    children = [
        ctx.Process(target=_contender, args=(kind, str(work), i, cycles, think_s, barrier, out))
        for i in range(procs)
    ]
    for child in children:
        child.start()
    times: list[float] = []
    try:
        for _ in children:
            times += out.get(timeout=600)
    finally:
        for child in children:
            child.join(timeout=60)
    bad = [c.exitcode for c in children if c.exitcode != 0]
    if bad:
        raise SystemExit(f"{kind}: {len(bad)} process(es) failed (exit codes {bad})")
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few cycles, 4 processes")
    parser.add_argument(
        "--cycles", type=int, default=None, help="cycles per row in one process (default 5000)"
    )
    parser.add_argument("--procs", type=int, default=None, help="contending processes (default 16)")
    parser.add_argument(
        "--contended-cycles", type=int, default=None, help="cycles per contending process (default 200)"
    )
    parser.add_argument(
        "--think", type=float, default=0.0, help="mean pause between cycles in ms (default 0)"
    )
    parser.add_argument(
        "--dir", default=None, help="where the temporary ledger folder goes (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    cycles = args.cycles or (200 if args.quick else 5000)
    procs = args.procs or (4 if args.quick else 16)
    per_proc = args.contended_cycles or (20 if args.quick else 200)

    print("Lease cost: one acquire+release cycle of the box ledger against the physical floor")
    print(machine())
    print(f"before: {load()}")
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"ledger folder: {work} ({_fs_type(work)})")
        results, size = single(work, cycles)
        table(
            f"one process, {cycles} cycles per row (ledger file {size} bytes), {load()}",
            ["row", "median", "p99", "/ physical floor"],
            [
                (name, ms(median(v)), ms(quantile(v, 0.99)), f"{median(v) / median(results[FLOCK]):.2f}x")
                for name, v in results.items()
            ],
        )
        kinds = [FLOCK, FLOOR, FLOOR_IN_PLACE, FLOOR_KERNEL, CYCLE]
        under = {kind: in_processes(work, kind, procs, per_proc, args.think / 1000) for kind in kinds}
        how = "back to back" if args.think <= 0 else f"pausing {args.think:g} ms on average between cycles"
        table(
            f"{procs} processes at once, {per_proc} cycles each, {how}, {os.cpu_count()} cores, {load()}",
            ["row", "p50", "p99", "max"],
            [(kind, ms(median(v)), ms(quantile(v, 0.99)), ms(max(v))) for kind, v in under.items()],
        )
    floor = median(results[FLOCK])
    cycle = median(results[CYCLE])
    print(f"\nafter: {load()}")
    ratios = [
        Ratio(f"{CYCLE} / physical floor (median, one process)", cycle / floor, 4.0),
        Ratio(
            f"{CYCLE} p99 with {procs} contending processes", quantile(under[CYCLE], 0.99) * 1000, 10, "ms"
        ),
    ]
    print_ratios(ratios)
    return 0


def _fs_type(path: Path) -> str:
    """The filesystem type of ``path`` from /proc/mounts (the longest mount point that holds it)."""
    best, kind = "", "unknown filesystem"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    sys.exit(main())
