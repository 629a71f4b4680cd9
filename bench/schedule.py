"""Schedule quality: how close the plugin packs a synthetic GPU suite to the best possible, against
fixed slots and against plain ``-n auto``.

    python bench/schedule.py            # about three minutes on 2 cores
    python bench/schedule.py --dist "load,worksteal,load --maxschedchunk 1,load -n 10"
    python bench/schedule.py --order longest-first --no-alternatives    # dispatch by duration
    python bench/schedule.py --quick    # seconds: a smoke run, numbers not meaningful

The suite: tests that hold their declared memory (512MiB to 16GiB) for a set time (sleeping, as
a test waits on its GPU), drawn with a fixed seed. Each run writes one record per test (GPU,
declared bytes, start, end); makespan is the first start to the last end, so worker start-up is
left out alike for every way of running. Ways of running, per simulated box:

* ``plugin --dist X``: ``-n auto`` with the plugin, for each distribution mode measured; tests
  take the ``gpu`` fixture, so the plugin may place them on any GPU;
* ``fixed slots``: no plugin, K tests at once per GPU, K = floor(usable / largest test) so the
  largest test is safe, as TensorFlow's and JAX's flock wrappers do it (a conftest takes one of K
  flock slot files per GPU before each test, polling every 10 ms), one worker per slot;
* ``plain -n auto``: no plugin, no leases; worker gwN uses GPU N mod GPUs (the usual conftest);
* ``offline greedy``: not a run but a computed yardstick, tighter than the bound: the best of a
  few list schedules in which any idle worker starts the first test that fits, knowing every
  duration.

xdist's own count is set to 16 (``PYTEST_XDIST_AUTO_NUM_WORKERS``), standing for a 16-core GPU
box: the tests sleep, so 2 real cores carry 16 workers. CUDA context bookings are 0
(``--gpushare-context-mem=0``): simulated GPUs have none, and on a real box every way of
running pays the same context per worker, so the bound's "usable" is all the tests'.

Checked, not assumed: while the plugin runs, an auditor process reads every ledger with
``pytest_gpushare.ledger.handle.read_status`` every 20 ms, and every test reads them at its start (its
lease is then in the ledger); the peak leased memory seen must never exceed usable.

Goals (issue 7): makespan at most 1.15x the lower bound max(sum mem*time / usable,
sum time / workers, longest test); at least 1.3x faster than fixed slots; no moment above usable
(plain ``-n auto`` shows how many a real box would have turned into out-of-memory failures).
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import random
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _util import Ratio, clean_env, machine, print_ratios, pytest_cmd, require_ok, run, table

from pytest_gpushare.gpus import SimulatedProbe
from pytest_gpushare.planner import Budget, make_plan, reservations_from_sizes
from pytest_gpushare.units import GiB, MiB, format_size, parse_per_gpu_sizes

XDIST_COUNT = 16
SAFETY = GiB
WORKER_MEM = 3 * GiB
SIZES = [512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB, 16 * GiB]
WEIGHTS = [0.20, 0.20, 0.20, 0.18, 0.14, 0.08]
SLOT_POLL_S = 0.01
AUDIT_EVERY_S = 0.02


@dataclass(frozen=True)
class Box:
    name: str
    simulate: str
    reserve: str


BOXES = {
    "24GiB": Box("24GiB", "24GiB:used=1GiB", "2GiB"),
    "2x80GiB": Box("2x80GiB", "2x80GiB", "4GiB,0:12GiB"),
}


@dataclass(frozen=True)
class Case:
    test_id: str
    mem: int
    seconds: float


def make_suite(n: int, seed: int, scale: float) -> list[Case]:
    """``n`` tests with sizes drawn from :data:`SIZES` and durations 0.1..1.0 s (times ``scale``)."""
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        mem = rng.choices(SIZES, WEIGHTS)[0]
        seconds = round(rng.uniform(0.1, 1.0) * scale, 3)
        cases.append(Case(f"t{k:03d}-{format_size(mem)}-{seconds:.2f}s", mem, seconds))
    return cases


# --- the suite on disk --------------------------------------------------------------------------

INI = """\
[pytest]
markers =
    gpu(mem=None, count=1, exclusive=False): a GPU test (registered here for -p no:gpushare runs)
"""

TEST_FILE = """\
import json
import time

import pytest

CASES = json.loads({cases!r})


@pytest.mark.parametrize(
    "mem,seconds",
    [pytest.param(c["mem"], c["seconds"], id=c["id"], marks=pytest.mark.gpu(mem=c["mem"])) for c in CASES],
)
def test_hold(mem, seconds, gpu, record):
    record["mem"] = mem
    record["start"] = time.time()
    time.sleep(seconds)
    record["end"] = time.time()
"""

# Shared by every way of running: one JSON line per test in the worker's record file.
RECORD_FIXTURE = """\
import json
import os

import pytest


@pytest.fixture
def record(request, gpu):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    rec = {"test": request.node.callspec.id, "gpu": gpu_index(gpu), "worker": worker}
    rec.update(audit())
    yield rec
    path = os.path.join(os.environ["BENCH_RECORDS"], rec["worker"] + ".jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\\n")
"""

PLUGIN_CONFTEST = (
    RECORD_FIXTURE
    + """

from pytest_gpushare.ledger import read_status


def gpu_index(gpu):
    return gpu.uuid


def audit():
    # This test's lease is in the ledger now: what does the ledger say is leased?
    snap = read_status(os.environ["GPUSHARE_LEDGER_DIR"])
    return {"seen": {g["uuid"]: [g["booked_bytes"], g["limit_bytes"]] for g in snap["gpus"]}}
"""
)

SLOTS_CONFTEST = (
    RECORD_FIXTURE
    + """

import fcntl
import time

K = int(os.environ["BENCH_SLOTS"])
GPUS = int(os.environ["BENCH_GPUS"])
SLOT_DIR = os.environ["BENCH_SLOT_DIR"]


def gpu_index(gpu):
    return gpu


def audit():
    return {}


@pytest.fixture
def gpu():
    # As the flock wrappers do it: take any free slot of any GPU, home GPU first, poll until one frees.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    home = int(worker[2:]) % GPUS if worker.startswith("gw") else 0
    while True:
        for g in [(home + i) % GPUS for i in range(GPUS)]:
            for k in range(K):
                fd = os.open(os.path.join(SLOT_DIR, f"gpu{g}-slot{k}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield g
                finally:
                    os.close(fd)
                return
        time.sleep(float(os.environ["BENCH_SLOT_POLL"]))
"""
)

PLAIN_CONFTEST = (
    RECORD_FIXTURE
    + """

def gpu_index(gpu):
    return gpu


def audit():
    return {}


@pytest.fixture
def gpu():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) % int(os.environ["BENCH_GPUS"]) if worker.startswith("gw") else 0
"""
)


def write_suite(folder: Path, cases: Sequence[Case], conftest: str) -> None:
    folder.mkdir(parents=True)
    (folder / "pytest.ini").write_text(INI)
    (folder / "conftest.py").write_text(conftest)
    data = json.dumps([{"id": c.test_id, "mem": c.mem, "seconds": c.seconds} for c in cases])
    (folder / "test_suite.py").write_text(TEST_FILE.format(cases=data))


# --- the auditor --------------------------------------------------------------------------------


def _audit(folder: str, stop: Any, out: Any) -> None:
    from pytest_gpushare.ledger import read_status

    peaks: dict[str, int] = {}
    limits: dict[str, int] = {}
    samples = over = 0
    while not stop.is_set():
        try:
            snap = read_status(folder)
        except Exception as exc:  # reported, and the run counts as unchecked
            out.put({"error": f"{type(exc).__name__}: {exc}"})
            return
        samples += 1
        for g in snap["gpus"]:
            booked, limit = g["booked_bytes"], g["limit_bytes"]
            peaks[g["uuid"]] = max(peaks.get(g["uuid"], 0), booked)
            if limit is not None:
                limits[g["uuid"]] = min(limits.get(g["uuid"], limit), limit)
                over += booked > limit
        stop.wait(AUDIT_EVERY_S)
    out.put({"samples": samples, "peaks": peaks, "limits": limits, "over": over})


class Auditor:
    """A process that reads the ledgers with ``read_status`` every 20 ms while a run goes on."""

    def __init__(self, folder: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._proc = ctx.Process(target=_audit, args=(str(folder), self._stop, self._out))

    def __enter__(self) -> Auditor:
        self._proc.start()
        return self

    def result(self) -> dict[str, Any]:
        self._stop.set()
        value: dict[str, Any] = self._out.get(timeout=60)
        self._proc.join(timeout=60)
        return value

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive():
            self._stop.set()
            self._proc.join(timeout=60)


# --- measuring one run --------------------------------------------------------------------------


@dataclass
class Outcome:
    way: str
    workers: int
    wall_s: float
    makespan_s: float
    peak: dict[Any, int]  # GPU -> peak concurrent declared bytes, from the tests' records
    over_moments: int  # test starts at which a GPU's declared total exceeded its usable
    audit: dict[str, Any] = field(default_factory=dict)


def peaks_from_records(
    records: Sequence[dict[str, Any]], usable: dict[Any, int]
) -> tuple[dict[Any, int], int]:
    """Peak concurrent declared memory per GPU, and the test starts at which it exceeded usable.

    At equal times ends count before starts: a test that ends as another starts never overlaps it.
    """
    events = sorted(
        [(r["start"], 1, r["gpu"], r["mem"]) for r in records]
        + [(r["end"], 0, r["gpu"], -r["mem"]) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    now: dict[Any, int] = {}
    peak: dict[Any, int] = {}
    over = 0
    for _t, starting, gpu, delta in events:
        now[gpu] = now.get(gpu, 0) + delta
        peak[gpu] = max(peak.get(gpu, 0), now[gpu])
        if starting and now[gpu] > usable[gpu]:
            over += 1
    return peak, over


def read_records(folder: Path, expected: int) -> list[dict[str, Any]]:
    records = [
        json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()
    ]
    if len(records) != expected:
        raise SystemExit(f"expected {expected} test records, found {len(records)} in {folder}")
    return records


def run_way(
    work: Path, box: Box, way: str, cases: Sequence[Case], usable: dict[Any, int], slots: int
) -> Outcome:
    tag = re.sub(r"[^a-z0-9]+", "-", f"{box.name}-{way}".lower())
    suite, records, ledger = work / tag / "suite", work / tag / "records", work / tag / "ledger"
    records.mkdir(parents=True)
    gpus = len(SimulatedProbe(box.simulate).probe().gpus)
    env = clean_env(
        ledger,
        BENCH_RECORDS=str(records),
        BENCH_GPUS=str(gpus),
        PYTEST_XDIST_AUTO_NUM_WORKERS=str(XDIST_COUNT),
        GPUSHARE_OLLAMA="off",
    )
    if way.startswith("plugin"):
        write_suite(suite, cases, PLUGIN_CONFTEST)
        env.update(
            GPUSHARE_SIMULATE=box.simulate,
            GPUSHARE_RESERVE=box.reserve,
            GPUSHARE_CONTEXT_MEM="0",
            GPUSHARE_SAFETY=format_size(SAFETY),
            GPUSHARE_WORKER_MEM=format_size(WORKER_MEM),
        )
        extra = way.split(" ", 1)[1].split() if " " in way else []
        args = pytest_cmd("-n", "auto", *extra)
        n_fixed = 0
    elif way == "fixed slots":
        write_suite(suite, cases, SLOTS_CONFTEST)
        (work / tag / "slots").mkdir()
        env.update(
            BENCH_SLOTS=str(slots), BENCH_SLOT_DIR=str(work / tag / "slots"), BENCH_SLOT_POLL=str(SLOT_POLL_S)
        )
        n_fixed = slots * gpus
        args = pytest_cmd("-p", "no:gpushare", "-n", str(n_fixed), "-q")
    else:
        write_suite(suite, cases, PLAIN_CONFTEST)
        n_fixed = XDIST_COUNT
        args = pytest_cmd("-p", "no:gpushare", "-n", "auto", "-q")
    audit: dict[str, Any] = {}
    if way.startswith("plugin"):
        with Auditor(ledger) as auditor:
            result = run(args, suite, env)
            audit = auditor.result()
    else:
        result = run(args, suite, env)
    require_ok(result, f"{box.name} {way}")
    workers = re.search(r"^\s*workers: (\d+)", result.output, re.M)
    n_workers = int(workers.group(1)) if workers else n_fixed
    recs = read_records(records, len(cases))
    if way.startswith("plugin"):
        audit["per_test_over"] = sum(
            1 for r in recs for b, lim in r["seen"].values() if lim is not None and b > lim
        )
        audit["per_test_peak"] = {}
        for r in recs:
            for uuid, (b, _lim) in r["seen"].items():
                audit["per_test_peak"][uuid] = max(audit["per_test_peak"].get(uuid, 0), b)
    makespan = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    peak, over = peaks_from_records(recs, usable)
    return Outcome(way, n_workers, result.wall_s, makespan, peak, over, audit)


def box_plan(box: Box) -> tuple[list[str], dict[str, int]]:
    """The GPUs (uuids, in index order) and usable bytes per uuid the plugin computes for ``box``."""
    inventory = SimulatedProbe(box.simulate).probe()
    sizes = parse_per_gpu_sizes(box.reserve, "bench")
    plan = make_plan(
        inventory,
        Budget(safety_bytes=SAFETY, worker_mem_bytes=WORKER_MEM, context_bytes=0),
        reservations=reservations_from_sizes(sizes, inventory.gpus, "reserve"),
    )
    return [g.gpu.uuid for g in plan.gpus], {g.gpu.uuid: g.usable_bytes for g in plan.gpus}


def lower_bound(cases: Sequence[Case], usable_total: int, workers: int) -> tuple[float, str]:
    """max(sum mem*time / usable, sum time / workers, longest test), and which term it is."""
    terms = {
        "memory": sum(c.mem * c.seconds for c in cases) / usable_total,
        "workers": sum(c.seconds for c in cases) / workers,
        "longest": max(c.seconds for c in cases),
    }
    name = max(terms, key=lambda k: terms[k])
    return terms[name], name


def greedy_makespan(order: Sequence[Case], usable: Sequence[int], workers: int) -> float:
    """Makespan of an offline list schedule: whenever a worker is idle it starts the first test of
    ``order`` that fits on the GPU with the most memory free (durations known, no queues)."""
    free = list(usable)
    queue = list(order)
    running: list[tuple[float, int, int]] = []
    now, idle = 0.0, workers
    while queue or running:
        started = True
        while idle and queue and started:
            started = False
            gpu = max(range(len(free)), key=lambda i: free[i])
            for case in queue:
                if case.mem <= free[gpu]:
                    queue.remove(case)
                    free[gpu] -= case.mem
                    idle -= 1
                    heapq.heappush(running, (now + case.seconds, gpu, case.mem))
                    started = True
                    break
        if not running:
            raise ValueError("a test fits on no GPU")
        now, gpu, mem = heapq.heappop(running)
        free[gpu] += mem
        idle += 1
    return now


def greedy_reference(cases: Sequence[Case], usable: Sequence[int], workers: int) -> tuple[float, str]:
    """The best of a few offline greedy schedules: a tighter yardstick than the lower bound, which
    no schedule may reach when memory and workers both bind."""
    orders = {
        "suite order": list(cases),
        "longest first": sorted(cases, key=lambda c: -c.seconds),
        "largest first": sorted(cases, key=lambda c: -c.mem),
        "largest mem*time first": sorted(cases, key=lambda c: -c.mem * c.seconds),
    }
    results = {name: greedy_makespan(order, usable, workers) for name, order in orders.items()}
    best = min(results, key=lambda k: results[k])
    return results[best], best


def joined(values: dict[Any, int], keys: Sequence[Any]) -> str:
    return " + ".join(format_size(values.get(k, 0)) for k in keys)


def measure_box(
    work: Path, box: Box, cases: Sequence[Case], ways: Sequence[str], alternatives: bool
) -> list[Ratio]:
    """Run every way on ``box``, print its tables, return its ratio lines."""
    uuids, usable_by_uuid = box_plan(box)
    usable = [usable_by_uuid[u] for u in uuids]
    slots = min(usable) // max(c.mem for c in cases)
    # Records of the plugin runs name GPUs by uuid, the others by index.
    usable_any: dict[Any, int] = {**usable_by_uuid, **dict(enumerate(usable))}
    outcomes = [run_way(work, box, way, cases, usable_any, slots) for way in ways]
    workers = outcomes[0].workers
    bound, binding = lower_bound(cases, sum(usable), workers)
    greedy, greedy_order = greedy_reference(cases, usable, workers)
    if alternatives:
        if slots >= 1:
            outcomes.append(run_way(work, box, "fixed slots", cases, usable_any, slots))
        outcomes.append(run_way(work, box, "plain -n auto", cases, usable_any, slots))
    rows: list[tuple[object, ...]] = [
        (
            o.way,
            o.workers,
            f"{o.makespan_s:.1f} s",
            f"{o.makespan_s / bound:.2f}x",
            f"{o.wall_s:.1f} s",
            joined(o.peak, uuids if o.way.startswith("plugin") else list(range(len(uuids)))),
            o.over_moments,
        )
        for o in outcomes
    ]
    rows.insert(
        len(ways),
        (
            f"offline greedy ({greedy_order})",
            workers,
            f"{greedy:.1f} s",
            f"{greedy / bound:.2f}x",
            "-",
            "-",
            0,
        ),
    )
    usable_text = joined(usable_by_uuid, uuids)
    table(
        f"box {box.name} (--gpushare-simulate={box.simulate} --gpushare-reserve={box.reserve}): usable "
        f"{usable_text}; lower bound {bound:.1f} s ({binding}); fixed slots K={slots} per GPU",
        ["way", "workers", "makespan", "/ bound", "wall", "peak declared", "starts over usable"],
        rows,
    )
    plugin = [o for o in outcomes if o.way.startswith("plugin")]
    print(
        f"against the offline greedy schedule ({greedy:.1f} s, a tighter yardstick than the bound): "
        + ", ".join(f"{o.way} {o.makespan_s / greedy:.2f}x" for o in plugin)
    )
    checked = []
    over_plugin = 0
    for o in plugin:
        if "error" in o.audit:
            raise SystemExit(f"{box.name} {o.way}: the auditor failed: {o.audit['error']}")
        # The ledger's own limit, and the usable memory this benchmark computed on its own.
        above = sum(
            1
            for peaks in (o.audit["peaks"], o.audit["per_test_peak"])
            for u, peak in peaks.items()
            if peak > usable_by_uuid.get(u, 0)
        )
        over = o.audit["over"] + o.audit["per_test_over"] + above + o.over_moments
        over_plugin += over
        checked.append(
            (
                o.way,
                o.audit["samples"],
                len(cases),
                joined(o.audit["peaks"], uuids),
                joined(o.audit["per_test_peak"], uuids),
                over,
            )
        )
    table(
        f"box {box.name}: leased memory as the ledger shows it (read_status), usable {usable_text}",
        ["way", "auditor reads", "test reads", "peak (auditor)", "peak (tests)", "over usable"],
        checked,
    )
    ratios = [
        Ratio(f"{box.name} makespan / lower bound, {o.way}", o.makespan_s / bound, 1.15) for o in plugin
    ]
    slot_run = next((o for o in outcomes if o.way == "fixed slots"), None)
    if slot_run is not None:
        ratios.append(
            Ratio(
                f"{box.name} speed-up over fixed slots K={slots}, {plugin[0].way}",
                slot_run.makespan_s / plugin[0].makespan_s,
                1.3,
                higher_is_better=True,
            )
        )
    ratios.append(
        Ratio(f"{box.name} plugin moments over usable (records and ledger)", over_plugin, 0, "times")
    )
    plain = outcomes[-1]
    if plain.way == "plain -n auto":
        peak = joined(plain.peak, list(range(len(uuids))))
        print(
            f"plain -n auto on {box.name}: peak declared {peak} against "
            f"usable {usable_text}; {plain.over_moments} test starts over usable (out-of-memory failures "
            "on a real box)"
        )
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 short tests, the 24GiB box")
    parser.add_argument("--tests", type=int, default=None, help="tests in the suite (default 120)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scale", type=float, default=None, help="multiply every test's duration")
    parser.add_argument("--boxes", default=None, help="comma-separated, of: " + ", ".join(BOXES))
    parser.add_argument(
        "--dist",
        default="load,worksteal",
        help="comma-separated --dist modes for the plugin runs; a mode may carry more options "
        "('load --maxschedchunk 1', 'load -n 10')",
    )
    parser.add_argument(
        "--no-alternatives",
        action="store_true",
        help="run the plugin only (no fixed slots, no plain -n auto)",
    )
    parser.add_argument(
        "--order",
        choices=["seeded", "longest-first"],
        default="seeded",
        help="collection order of the suite; longest-first stands for a scheduler that knows durations",
    )
    parser.add_argument("--keep", default=None, help="keep the runs' folders (suites, records, ledgers) here")
    args = parser.parse_args(argv)
    n = args.tests or (12 if args.quick else 120)
    scale = args.scale or (0.3 if args.quick else 1.0)
    boxes = [BOXES[b] for b in (args.boxes or ("24GiB" if args.quick else ",".join(BOXES))).split(",")]
    cases = make_suite(n, args.seed, scale)
    if args.order == "longest-first":
        cases = sorted(cases, key=lambda c: -c.seconds)
    ways = [f"plugin --dist {d}" for d in args.dist.split(",") if d]

    print("Schedule quality: a synthetic GPU suite against the lower bound, fixed slots and plain -n auto")
    print(machine())
    print(
        f"suite: {n} tests, seed {args.seed}, {args.order} order, "
        f"sizes {format_size(min(c.mem for c in cases))}.."
        f"{format_size(max(c.mem for c in cases))}, durations {min(c.seconds for c in cases):.2f}.."
        f"{max(c.seconds for c in cases):.2f} s, sum of time {sum(c.seconds for c in cases):.1f} s, "
        f"sum of mem*time {sum(c.mem * c.seconds for c in cases) / GiB:.1f} GiB*s; "
        f"xdist's own count {XDIST_COUNT}, worker mem {format_size(WORKER_MEM)}, safety {format_size(SAFETY)}"
    )
    ratios: list[Ratio] = []
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-") as tmp:
        work = Path(args.keep or tmp)
        for box in boxes:
            ratios += measure_box(work, box, cases, ways, not args.no_alternatives)
    print_ratios(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
