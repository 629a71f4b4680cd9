"""Schedule quality: how close the plugin packs GPU suites to the physical floor, against an
offline greedy schedule, fixed slots as their users run them, and plain ``-n auto``.

    python bench/schedule.py                     # every scenario, about five minutes on 2 cores
    python bench/schedule.py --scenarios mix,tail
    python bench/schedule.py --quick             # the mix at a quarter of its durations, seconds

Scenarios (each a simulated box, a suite, and who else is on the box):

* ``mix``: 60 tests, 40 x 1GiB/0.2 s, 15 x 6GiB/1 s, 5 x 14GiB/3 s, on a 24GiB card of which
  strangers hold 2GiB;
* ``24GiB`` and ``2x80GiB``: the earlier boxes (strangers and memory reserved for other
  applications) with tests of 512MiB..16GiB and 0.1..1.0 s drawn with a fixed seed;
* ``tail``: 200 tests with a long tail of durations (log-normal, median 0.08 s, up to 3 s) on a
  48GiB card;
* ``two sessions``: the mix split in two suites run at once by two sessions sharing the card.

Every test sleeps its duration holding its declared memory and appends a record (session,
worker, GPU, bytes, start, end) to a file of its worker. The bench's own auditor reads
those records, not the plugin's ledger: on every GPU it sums, at each test start, the memory of
the tests running there plus one CUDA context for each worker that has run a test there (from
its first start there to its last end), and compares the sum with the usable memory the bench
configured: total - strangers - reserved for other applications - 1GiB headroom (also passed
to the plugin as its safety buffer).

Rows per scenario:

* ``plugin``: ``-n auto`` with the plugin, default dispatch (``--dist load``): a first run at
  the default 512MiB CUDA context booking (its pytest cache emptied), then runs that find the
  durations it recorded, at 512MiB and at 0 (``--gpushare-context-mem``); and, where the plugin
  has ``--gpushare-dispatch``, with ``--gpushare-dispatch=xdist`` (xdist's own scheduler) at
  512MiB. xdist's own worker count stands for a 16-core GPU box (``PYTEST_XDIST_AUTO_NUM_WORKERS
  =16``; the tests sleep, so 2 cores carry them), so the plugin's VRAM count binds. The plugin
  rows of a scenario share one suite folder with pytest's cache on, as a user's runs do ("cache"
  column: "warm" where an earlier run's durations are there); "workers" says how many of them
  ran tests where not all did;
* ``fixed slots``: what TensorFlow and JAX users run: no plugin (``-p no:gpushare``), K slots per
  GPU with K = usable // (largest test + context), ``-n`` the number of slots, worker gwN owning
  slot N, and the suite's own per-slot limit (a test larger than usable / K fails). Not run for
  sessions sharing a box (their slots would need a box-wide lock): the box's own scenario has it;
* ``plain -n auto``: no plugin, xdist's own count on this machine (not forced), worker gwN on
  GPU N mod GPUs; only where it can never exceed usable and is not the fixed-slots run again;
* ``tight lower bound`` and ``offline greedy``: computed, not run, with the plugin's workers and
  each context size. The bound is the least over w <= workers of the largest of: sum of
  mem x time / (usable - w contexts), sum of time / w, the longest test, and the time of the
  tests that each need more than half of a GPU (at most one of them per GPU at a time) over the
  GPUs. (A bound that counts every one of w contexts for the whole run is not valid beyond
  these terms: a worker books its context with its first test, so workers that join late book
  theirs late; on issue 14's mix at 512MiB, 2 workers run the 14GiB and 6GiB tests side by side
  in 15 s, then 7 run the 1GiB ones in 1.2 s.) The greedy schedule knows every duration: an
  idle worker starts the first test in the order that fits (its own GPUs first, a new GPU costs
  it a context); the best of LPT (longest first), largest first, and largest mem x time first
  on any count of workers up to the plugin's, and on all of them in two phases (k workers while
  a test over x is left to start, then all: contexts booked late); a schedule found with 512MiB
  contexts also serves without.

Wall time is the whole ``pytest`` command, start-up included; makespan is the first test's
start to the last test's end. Goals (issue 14), for the runs after the first: makespan <= 1.10x
the tight bound and <= 1.05x the greedy schedule, wall time >= 1.3x faster than fixed slots, no
start over usable.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _util import Ratio, clean_env, load, machine, print_ratios, pytest_cmd, require_ok, run, table

from pytest_gpushare.units import GiB, MiB, format_size

#: The GPU box's cores as xdist counts them for the plugin's ``-n auto``.
BOX_CORES = 16
HEADROOM = GiB
WORKER_MEM = 3 * GiB
CONTEXT = 512 * MiB
CONTEXTS = (CONTEXT, 0)


def ctx(context: int) -> str:
    """A context size as the rows name it: 512MiB, 0."""
    return f"{context // MiB}MiB" if context else "0"


# --- boxes and suites ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    total: int
    strangers: int = 0  # memory other users' processes hold
    reserved: int = 0  # memory kept for another application (--gpushare-reserve)

    @property
    def usable(self) -> int:
        return self.total - self.strangers - self.reserved - HEADROOM


@dataclass(frozen=True)
class Box:
    name: str
    cards: tuple[Card, ...]

    @property
    def simulate(self) -> str:
        return ",".join(
            format_size(c.total) + (f":used={format_size(c.strangers)}" if c.strangers else "")
            for c in self.cards
        )

    @property
    def reserve(self) -> str:
        return (
            ",".join(f"{i}:{format_size(c.reserved)}" for i, c in enumerate(self.cards) if c.reserved) or "0"
        )

    @property
    def usable(self) -> list[int]:
        return [c.usable for c in self.cards]


@dataclass(frozen=True)
class Case:
    test_id: str
    mem: int
    seconds: float


@dataclass(frozen=True)
class Scenario:
    name: str
    box: Box
    cases: tuple[Case, ...]
    sessions: int = 1  # sessions sharing the box, session s running cases[s::sessions]

    def suites(self) -> list[list[Case]]:
        return [list(self.cases[s :: self.sessions]) for s in range(self.sessions)]


def mix_suite(scale: float = 1.0) -> list[Case]:
    """The realistic mix of issue 14: 40 x 1GiB/0.2 s, 15 x 6GiB/1 s, 5 x 14GiB/3 s, interleaved."""
    kinds = [(40, 1 * GiB, 0.2), (15, 6 * GiB, 1.0), (5, 14 * GiB, 3.0)]
    cases = [
        Case(f"{format_size(mem)}-{k:02d}", mem, round(seconds * scale, 3))
        for n, mem, seconds in kinds
        for k in range(n)
    ]
    return random.Random(14).sample(cases, len(cases))


SIZES = [512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB, 16 * GiB]
WEIGHTS = [0.20, 0.20, 0.20, 0.18, 0.14, 0.08]


def drawn_suite(n: int, seed: int, seconds: Callable[[random.Random], float]) -> list[Case]:
    """``n`` tests with sizes drawn from :data:`SIZES` and durations from ``seconds``."""
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        mem = rng.choices(SIZES, WEIGHTS)[0]
        duration = round(seconds(rng), 3)
        cases.append(Case(f"t{k:03d}-{format_size(mem)}-{duration:.2f}s", mem, duration))
    return cases


def uniform_suite(n: int) -> list[Case]:
    return drawn_suite(n, 7, lambda rng: rng.uniform(0.1, 1.0))


def tail_suite(n: int) -> list[Case]:
    return drawn_suite(n, 11, lambda rng: min(3.0, max(0.02, rng.lognormvariate(math.log(0.08), 1.2))))


MIX_BOX = Box("24GiB, strangers 2GiB", (Card(24 * GiB, strangers=2 * GiB),))


def scenarios(quick: bool) -> dict[str, Scenario]:
    if quick:
        return {"mix": Scenario("mix", MIX_BOX, tuple(mix_suite(0.25)))}
    return {
        "mix": Scenario("mix", MIX_BOX, tuple(mix_suite())),
        "24GiB": Scenario("24GiB", Box("24GiB", (Card(24 * GiB, GiB, 2 * GiB),)), tuple(uniform_suite(40))),
        "2x80GiB": Scenario(
            "2x80GiB",
            Box("2x80GiB", (Card(80 * GiB, reserved=12 * GiB), Card(80 * GiB, reserved=4 * GiB))),
            tuple(uniform_suite(80)),
        ),
        "tail": Scenario("tail", Box("48GiB", (Card(48 * GiB, GiB),)), tuple(tail_suite(200))),
        "two sessions": Scenario("two sessions", MIX_BOX, tuple(mix_suite()), sessions=2),
    }


# --- the references: computed, not run ---------------------------------------------------------


def bound_terms(cases: Sequence[Case], usable: Sequence[int], workers: int, context: int) -> dict[str, float]:
    """The lower bound's terms for a schedule on ``workers`` workers, each with a CUDA context of
    ``context`` bytes on at least one GPU (on the one GPU of a single-GPU box)."""
    per_gpu = [u - (workers * context if len(usable) == 1 else context) for u in usable]
    room = sum(usable) - workers * context
    if room <= 0 or max(per_gpu) <= 0:
        return {"memory": math.inf}
    half = max(per_gpu) / 2
    return {
        "memory": sum(c.mem * c.seconds for c in cases) / room,
        "workers": sum(c.seconds for c in cases) / workers,
        "longest": max(c.seconds for c in cases),
        # Tests larger than half of every GPU: at most one of them per GPU at any moment.
        "over half": sum(c.seconds for c in cases if c.mem > half) / len(usable),
    }


def lower_bound(
    cases: Sequence[Case], usable: Sequence[int], workers: int, context: int = 0
) -> tuple[float, dict[str, float]]:
    """No schedule on at most ``workers`` workers ends sooner: the least over w of the largest
    term of :func:`bound_terms`; returns it with the terms of the w that gives it."""
    best: tuple[float, dict[str, float]] = (math.inf, {})
    for w in range(1, workers + 1):
        terms = bound_terms(cases, usable, w, context)
        best = min(best, (max(terms.values()), terms), key=lambda b: b[0])
    return best


def greedy_makespan(
    order: Sequence[Case],
    usable: Sequence[int],
    workers: int,
    context: int = 0,
    phase: tuple[int, int] | None = None,
) -> float:
    """An offline list schedule: whenever a worker is idle it starts the first test of ``order``
    that fits, on a GPU where it has its context if one has room, else on the GPU with the most
    free memory (booking a new context there, as the broker books one with a worker's first
    lease on a GPU). Contexts stay until the end.

    ``phase``: ``(k, x)``: only the first ``k`` workers start tests over ``x`` bytes, and the
    others start tests only once no test over ``x`` is left to start (they join late, so their
    contexts are booked late)."""
    free = list(usable)
    touched: list[set[int]] = [set() for _ in range(workers)]
    queue = list(order)
    running: list[tuple[float, int, int, int]] = []  # end, worker, GPU, bytes
    idle = list(range(workers))
    now = 0.0
    while queue or running:
        for w in list(idle):
            placed = _place(_startable(queue, w, phase), free, touched[w], context)
            if placed is None:
                continue
            case, gpu = placed
            queue.remove(case)
            if gpu not in touched[w]:
                touched[w].add(gpu)
                free[gpu] -= context
            free[gpu] -= case.mem
            idle.remove(w)
            heapq.heappush(running, (now + case.seconds, w, gpu, case.mem))
        if not running:
            raise ValueError("a test fits on no GPU")
        now, w, gpu, mem = heapq.heappop(running)
        free[gpu] += mem
        idle.append(w)
    return now


def _startable(queue: list[Case], worker: int, phase: tuple[int, int] | None) -> Sequence[Case]:
    """The tests of ``queue`` that ``worker`` may start under ``phase`` (see
    :func:`greedy_makespan`): all of them for the first ``k`` workers, else none while a test over
    ``x`` is left, then all."""
    if phase is None or worker < phase[0]:
        return queue
    return [] if any(c.mem > phase[1] for c in queue) else queue


def _place(
    queue: Sequence[Case], free: Sequence[int], touched: set[int], context: int
) -> tuple[Case, int] | None:
    """The first test of ``queue`` that fits somewhere, and where (see :func:`greedy_makespan`)."""
    gpus = sorted(range(len(free)), key=lambda g: (g not in touched, -free[g]))
    for case in queue:
        for g in gpus:
            if case.mem + (0 if g in touched else context) <= free[g]:
                return case, g
    return None


ORDERS: dict[str, Callable[[Case], tuple[float, ...]]] = {
    "LPT": lambda c: (-c.seconds, -c.mem),
    "largest first": lambda c: (-c.mem, -c.seconds),
    "largest mem x time first": lambda c: (-c.mem * c.seconds,),
}


#: The phased greedy schedules are tried only while tests x phases stay under this (the bench's own
#: time: a few seconds per scenario on 2 cores).
PHASED_LIMIT = 100_000


def greedy_reference(
    cases: Sequence[Case], usable: Sequence[int], workers: int, context: int = 0
) -> tuple[float, str, int]:
    """The best of the :data:`ORDERS` greedy schedules on at most ``workers`` workers (fewer
    workers book fewer contexts), and, where contexts are booked, on all of them in two phases
    (:func:`greedy_makespan`'s ``phase``: k workers while a test over x is left, for every k and
    every distinct need x but the largest, while :data:`PHASED_LIMIT` allows): its makespan,
    order (with its phase) and worker count."""
    found = [
        (greedy_makespan(sorted(cases, key=key), usable, w, context), name, w)
        for w in range(workers, 0, -1)
        for name, key in ORDERS.items()
    ]
    needs = sorted({c.mem for c in cases})[:-1]
    if context > 0 and len(cases) * workers * len(needs) * len(ORDERS) <= PHASED_LIMIT:
        for name, key in ORDERS.items():
            order = sorted(cases, key=key)
            for k in range(1, workers):
                for x in needs:
                    span = greedy_makespan(order, usable, workers, context, phase=(k, x))
                    found.append((span, f"{name}, {k} workers until no test over {format_size(x)}", workers))
    return min(found, key=lambda f: f[0])


# --- the auditor: the tests' own records against the bench's usable figure ---------------------


def occupancy(
    records: Sequence[dict[str, Any]], usable: Sequence[int], context: int
) -> tuple[list[int], int]:
    """Peak physical memory per GPU (running tests plus workers' contexts), and how many test
    starts took a GPU over ``usable``. A worker's context on a GPU lives from its first start
    there to its last end anywhere; at equal times ends count before starts."""
    first: dict[tuple[str, int], float] = {}
    last: dict[str, float] = {}
    for r in records:
        key = (r["worker"], r["gpu"])
        first[key] = min(first.get(key, math.inf), r["start"])
        last[r["worker"]] = max(last.get(r["worker"], 0.0), r["end"])
    # (time, kind, GPU, bytes): ends (0) before contexts that appear (1) before test starts (2).
    events: list[tuple[float, int, int, int]] = [(r["start"], 2, r["gpu"], r["mem"]) for r in records]
    events += [(r["end"], 0, r["gpu"], -r["mem"]) for r in records]
    events += [(t, 1, g, context) for (_w, g), t in first.items()]
    events += [(last[w], 0, g, -context) for (w, g) in first]
    now = [0] * len(usable)
    peak = [0] * len(usable)
    over = 0
    for _t, kind, gpu, delta in sorted(events, key=lambda e: (e[0], e[1])):
        now[gpu] += delta
        peak[gpu] = max(peak[gpu], now[gpu])
        over += kind == 2 and now[gpu] > usable[gpu]
    return peak, over


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

# Every way of running: one JSON line per test in its worker's record file.
RECORD_FIXTURE = """\
import json
import os

import pytest


@pytest.fixture
def record(gpu):
    worker = os.environ["BENCH_SESSION"] + "/" + os.environ.get("PYTEST_XDIST_WORKER", "main")
    rec = {"worker": worker, "gpu": gpu_index(gpu)}
    yield rec
    path = os.path.join(os.environ["BENCH_RECORDS"], worker.replace("/", "-") + ".jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\\n")
"""

# The plugin's GpuLease.index is the device's place in this process's list (home GPU first):
# the record keeps the uuid, which names the same GPU in every process.
PLUGIN_CONFTEST = (
    RECORD_FIXTURE
    + """

def gpu_index(gpu):
    return gpu.uuid
"""
)

# No plugin: worker gwN owns slot N and runs its tests on that slot's GPU (BENCH_SLOTS lists each
# slot's GPU). With BENCH_SLOT_LIMIT set (fixed slots), a test larger than the suite's per-slot
# limit on that GPU fails, as a framework's per-process memory limit would make it fail.
PINNED_CONFTEST = (
    RECORD_FIXTURE
    + """

SLOTS = [int(g) for g in os.environ["BENCH_SLOTS"].split(",")]


def gpu_index(gpu):
    return gpu


@pytest.fixture
def gpu(request):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = SLOTS[int(worker[2:]) % len(SLOTS)]
    if "BENCH_SLOT_LIMIT" in os.environ:
        limit = int(os.environ["BENCH_SLOT_LIMIT"].split(",")[index])
        mem = request.node.get_closest_marker("gpu").kwargs["mem"]
        assert mem <= limit, f"{mem} bytes do not fit the slot's limit of {limit}"
    return index
"""
)


def write_suite(folder: Path, cases: Sequence[Case], conftest: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytest.ini").write_text(INI)
    (folder / "conftest.py").write_text(conftest)
    data = json.dumps([{"id": c.test_id, "mem": c.mem, "seconds": c.seconds} for c in cases])
    (folder / "test_suite.py").write_text(TEST_FILE.format(cases=data))


# --- running the ways ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    label: str
    kind: str  # "plugin", "fixed" or "plain"
    context: int  # the CUDA context per worker and GPU: the plugin's booking, the auditor's model
    args: tuple[str, ...] = ()
    first: bool = False  # a first run: the suite's pytest cache is emptied before it


@dataclass
class Outcome:
    way: Way
    workers: int
    wall_s: float
    makespan_s: float
    peak: list[int]
    over: int
    cache: str
    load_after: float
    ran: int  # workers that ran a test


def has_dispatch_option() -> bool:
    """Whether this plugin has ``--gpushare-dispatch`` (issue 14's memory-aware dispatch)."""
    from pytest_gpushare.settings.table import OPTIONS_BY_NAME

    return "gpushare_dispatch" in OPTIONS_BY_NAME


def fixed_slots(box: Box, cases: Sequence[Case]) -> list[int]:
    """Each slot's GPU: usable // (largest test + context) slots per GPU, interleaved."""
    largest = max(c.mem for c in cases)
    per_gpu = [u // (largest + CONTEXT) for u in box.usable]
    slots: list[int] = []
    for k in range(max(per_gpu, default=0)):
        slots += [g for g, n in enumerate(per_gpu) if n > k]
    return slots


def xdist_own_count() -> int:
    """xdist's ``-n auto`` on this machine without psutil: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def plain_slots(box: Box, cases: Sequence[Case]) -> list[int] | None:
    """Plain ``-n auto``'s GPUs (gwN on GPU N mod GPUs), or None where it measures nothing: where
    its workers could exceed usable on a GPU, or where it is the fixed-slots run again."""
    gpus = len(box.cards)
    slots = [n % gpus for n in range(xdist_own_count())]
    largest = max(c.mem for c in cases)
    safe = all(slots.count(g) * (largest + CONTEXT) <= u for g, u in enumerate(box.usable))
    return slots if safe and sorted(slots) != sorted(fixed_slots(box, cases)) else None


def ways(sc: Scenario) -> list[Way]:
    # A first run (nothing learned), then the runs after it, as a user's successive runs go:
    # the plugin's dispatch plans with the durations the first one recorded.
    found = [Way(f"plugin, contexts {ctx(CONTEXT)}, first run", "plugin", CONTEXT, first=True)]
    found += [Way(f"plugin, contexts {ctx(c)}", "plugin", c) for c in CONTEXTS]
    if has_dispatch_option():
        xdist = ("--gpushare-dispatch=xdist",)
        found.append(
            Way(f"plugin --gpushare-dispatch=xdist, contexts {ctx(CONTEXT)}", "plugin", CONTEXT, xdist)
        )
    # Sessions that share a box would share its slots through a box-wide lock; the box's own
    # scenario measures fixed slots there.
    slots = fixed_slots(sc.box, sc.cases)
    if slots and sc.sessions == 1:
        found.append(Way(f"fixed slots, K={len(slots)} (-p no:gpushare)", "fixed", CONTEXT))
    if sc.sessions == 1 and plain_slots(sc.box, sc.cases):
        found.append(Way(f"plain -n auto, {xdist_own_count()} workers (-p no:gpushare)", "plain", CONTEXT))
    return found


def session_command(sc: Scenario, way: Way, slots: Sequence[int]) -> tuple[list[str], dict[str, str]]:
    """The pytest command and environment of one session of ``way`` (without its folders)."""
    if way.kind == "plugin":
        env = {
            "GPUSHARE_SIMULATE": sc.box.simulate,
            "GPUSHARE_RESERVE": sc.box.reserve,
            "GPUSHARE_CONTEXT_MEM": ctx(way.context),
            "GPUSHARE_SAFETY": format_size(HEADROOM),
            "GPUSHARE_WORKER_MEM": format_size(WORKER_MEM),
            "GPUSHARE_OLLAMA": "off",
            "PYTEST_XDIST_AUTO_NUM_WORKERS": str(BOX_CORES),
        }
        # pytest's cache stays on: the plugin learns durations and peaks from earlier runs.
        return [sys.executable, "-m", "pytest", "-n", "auto", *way.args], env
    env = {"BENCH_SLOTS": ",".join(map(str, slots))}
    n = str(len(slots)) if way.kind == "fixed" else "auto"
    return pytest_cmd("-p", "no:gpushare", "-n", n, "-q"), env


class Hung(Exception):
    """A run that did not end within its limit: reported in place of its row."""


def run_way(work: Path, sc: Scenario, way: Way) -> Outcome:
    """Run ``way``'s sessions at once; time them from the first start to the last exit."""
    tag = re.sub(r"[^a-z0-9]+", "-", f"{sc.name}-{way.kind}-{way.label}".lower()).strip("-")
    records = work / tag / "records"
    records.mkdir(parents=True)
    slots = fixed_slots(sc.box, sc.cases) if way.kind == "fixed" else plain_slots(sc.box, sc.cases) or []
    shared = {"GPUSHARE_LEDGER_DIR": str(work / tag / "ledger")}
    if way.kind == "fixed":
        limits = [u // max(1, slots.count(g)) for g, u in enumerate(sc.box.usable)]
        shared["BENCH_SLOT_LIMIT"] = ",".join(map(str, limits))
    jobs = []
    cache = "first run"
    for s, cases in enumerate(sc.suites()):
        # The plugin rows of a scenario share their suite folders (and pytest's cache) as a user's runs do.
        suite = (
            work / sc.name.replace(" ", "-") / f"suite{s}"
            if way.kind == "plugin"
            else work / tag / f"suite{s}"
        )
        if way.first:
            shutil.rmtree(suite / ".pytest_cache", ignore_errors=True)
        if (suite / ".pytest_cache" / "v" / "gpushare" / "durations").exists():
            cache = "warm"  # the durations an earlier run recorded
        write_suite(suite, cases, PLUGIN_CONFTEST if way.kind == "plugin" else PINNED_CONFTEST)
        args, env = session_command(sc, way, slots)
        jobs.append(
            (args, suite, clean_env(None, **shared, **env, BENCH_SESSION=f"s{s}", BENCH_RECORDS=str(records)))
        )
    start = time.perf_counter()
    limit = 60 + 3 * sum(c.seconds for c in sc.cases)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: run(job[0], job[1], job[2], timeout=limit), jobs))
    except subprocess.TimeoutExpired as exc:
        ran = sum(len(p.read_text().splitlines()) for p in records.glob("*.jsonl"))
        out = exc.output or b""
        tail = "\n".join((out.decode(errors="replace") if isinstance(out, bytes) else out).splitlines()[-15:])
        raise Hung(
            f"{way.label}: HUNG, killed after {limit:.0f} s, {ran} of {len(sc.cases)} tests ran\n{tail}"
        ) from None
    wall = time.perf_counter() - start
    for s, result in enumerate(results):
        require_ok(result, f"{sc.name}, {way.label}, session {s}")
    workers = sum(_worker_count(r.output, way, slots) for r in results)
    recs = read_records(records, len(sc.cases))
    if way.kind == "plugin":
        places = gpu_places(sc.box)
        recs = [{**r, "gpu": places[r["gpu"]]} for r in recs]
    makespan = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    peak, over = occupancy(recs, sc.box.usable, way.context)
    ran = len({r["worker"] for r in recs})
    return Outcome(way, workers, wall, makespan, peak, over, cache, os.getloadavg()[0], ran)


def _worker_count(output: str, way: Way, slots: Sequence[int]) -> int:
    if way.kind != "plugin":
        return len(slots)
    found = re.search(r"^\s*workers: (\d+)", output, re.M)
    if found is None:
        raise SystemExit(f"no 'workers: N' line in the plugin's header:\n{output[-2000:]}")
    return int(found.group(1))


def gpu_places(box: Box) -> dict[str, int]:
    """Each simulated GPU's uuid and its place on ``box``."""
    from pytest_gpushare.gpus.simulated import parse_simulate, simulated_uuid

    return {simulated_uuid(i, g): i for i, g in enumerate(parse_simulate(box.simulate, "bench"))}


def read_records(folder: Path, expected: int) -> list[dict[str, Any]]:
    records = [
        json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()
    ]
    if len(records) != expected:
        raise SystemExit(f"expected {expected} test records, found {len(records)} in {folder}")
    return records


# --- one scenario: its table and ratio lines ----------------------------------------------------


def sizes(values: Sequence[int]) -> str:
    return " + ".join(format_size(v) for v in values)


def describe(sc: Scenario) -> str:
    cases = sc.cases
    mems = sorted({c.mem for c in cases})
    return (
        f"scenario {sc.name}: {len(cases)} tests"
        + (f" in {sc.sessions} sessions started together" if sc.sessions > 1 else "")
        + f", {format_size(mems[0])}..{format_size(mems[-1])}, {min(c.seconds for c in cases):.2f}.."
        f"{max(c.seconds for c in cases):.2f} s, sum of time {sum(c.seconds for c in cases):.1f} s, "
        f"sum of mem x time {sum(c.mem * c.seconds for c in cases) / GiB:.0f} GiB*s; box {sc.box.name} "
        f"(--gpushare-simulate={sc.box.simulate} --gpushare-reserve={sc.box.reserve}), "
        f"usable {sizes(sc.box.usable)}; {load()}"
    )


@dataclass(frozen=True)
class Refs:
    """The computed references of a scenario at one context size."""

    context: int
    bound: float
    terms: dict[str, float]
    greedy: float
    order: str
    greedy_workers: int


def measure(work: Path, sc: Scenario) -> list[Ratio]:
    """Run every way of ``sc``, print its table, return its ratio lines."""
    title = describe(sc)
    outcomes, hung = [], []
    for way in ways(sc):
        try:
            outcomes.append(run_way(work, sc, way))
        except Hung as exc:
            hung.append(str(exc))
    workers = next(o.workers for o in outcomes if o.way.kind == "plugin")
    refs: dict[int, Refs] = {}
    for c in sorted(CONTEXTS, reverse=True):
        bound, terms = lower_bound(sc.cases, sc.box.usable, workers, c)
        greedy = greedy_reference(sc.cases, sc.box.usable, workers, c)
        # A schedule that fits with larger contexts fits with smaller ones: keep the better.
        for r in refs.values():
            if r.greedy < greedy[0]:
                greedy = (r.greedy, f"{r.order}, found with contexts {ctx(r.context)}", r.greedy_workers)
        refs[c] = Refs(c, bound, terms, *greedy)
    rows = [_row(o, refs[o.way.context]) for o in outcomes]
    for c, ref in refs.items():
        rows.append(
            (
                f"tight lower bound, contexts {ctx(c)}",
                workers,
                f"{ref.bound:.2f} s",
                "1.00x",
                "-",
            )
        )
        rows.append(
            (
                f"offline greedy, contexts {ctx(c)} ({ref.order})",
                ref.greedy_workers,
                f"{ref.greedy:.2f} s",
                f"{ref.greedy / ref.bound:.2f}x",
                "1.00x",
            )
        )
    table(
        title,
        [
            "way",
            "workers",
            "cache",
            "wall",
            "makespan",
            "/ bound",
            "/ greedy",
            "peak (tests+contexts)",
            "over",
            "load",
        ],
        [row if len(row) == 10 else (*row[:2], "-", "-", *row[2:], "-", "-", "-") for row in rows],
    )
    for text in hung:
        print("  " + text.replace("\n", "\n    "))
    for c, ref in refs.items():
        print(
            f"  bound's terms, contexts {ctx(c)}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in ref.terms.items())
        )
    return _ratios(sc, outcomes, refs)


def _row(o: Outcome, ref: Refs) -> tuple[object, ...]:
    is_plugin = o.way.kind == "plugin"
    return (
        o.way.label,
        o.workers if o.ran == o.workers else f"{o.workers} ({o.ran} ran tests)",
        o.cache if is_plugin else "-",
        f"{o.wall_s:.1f} s",
        f"{o.makespan_s:.2f} s",
        f"{o.makespan_s / ref.bound:.2f}x" if is_plugin else "-",
        f"{o.makespan_s / ref.greedy:.2f}x" if is_plugin else "-",
        sizes(o.peak),
        o.over,
        f"{o.load_after:.2f}",
    )


def _ratios(sc: Scenario, outcomes: Sequence[Outcome], refs: dict[int, Refs]) -> list[Ratio]:
    ratios = []
    default = [o for o in outcomes if o.way.kind == "plugin" and not o.way.args and not o.way.first]
    for o in default:
        ref = refs[o.way.context]
        ratios.append(
            Ratio(f"{sc.name} makespan / tight bound, {o.way.label}", o.makespan_s / ref.bound, 1.10)
        )
        ratios.append(
            Ratio(f"{sc.name} makespan / offline greedy, {o.way.label}", o.makespan_s / ref.greedy, 1.05)
        )
    fixed = next((o for o in outcomes if o.way.kind == "fixed"), None)
    if fixed is not None and default:
        ratios.append(
            Ratio(
                f"{sc.name} wall, {fixed.way.label.split(' (')[0]} / {default[0].way.label}",
                fixed.wall_s / default[0].wall_s,
                1.3,
                higher_is_better=True,
            )
        )
    over = sum(o.over for o in outcomes if o.way.kind == "plugin")
    ratios.append(
        Ratio(f"{sc.name} plugin starts over usable (auditor: the tests' records)", over, 0, "times")
    )
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the mix at a quarter of its durations: a smoke run"
    )
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated, of: mix, 24GiB, 2x80GiB, tail, two sessions"
    )
    parser.add_argument("--keep", default=None, help="keep the runs' folders (suites, records, ledgers) here")
    args = parser.parse_args(argv)
    known = scenarios(args.quick)
    chosen = [known[s.strip()] for s in args.scenarios.split(",")] if args.scenarios else list(known.values())
    print(
        "Schedule quality: the plugin against the tight lower bound, an offline greedy schedule, fixed slots"
    )
    print(machine())
    print(
        f"xdist's own count for the plugin's -n auto: {BOX_CORES} (a GPU box's cores); plain -n auto: "
        f"{xdist_own_count()} (this machine); worker mem {format_size(WORKER_MEM)}, headroom and safety "
        f"{format_size(HEADROOM)}; {load()}"
    )
    ratios: list[Ratio] = []
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-") as tmp:
        work = Path(args.keep or tmp)
        for sc in chosen:
            ratios += measure(work, sc)
    print()
    print(f"after: {load()}")
    print_ratios(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
