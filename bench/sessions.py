"""Sessions sharing a box, and scale (issue 13, rows 4 and 5).

    python bench/sessions.py              # about five minutes on 2 cores
    python bench/sessions.py --quick      # seconds: a smoke run, numbers not meaningful

4a. Contention: S sessions (4 and 16) of ``pytest -n 2`` started at once, sharing one ledger
    folder on a memory file system and one simulated 80GiB GPU, each running 200 trivial tests
    marked ``gpu(mem="1GiB")``: all of them fit at once, so the sessions contend for the
    ledger, the controllers and the CPUs, never for memory. The same sessions run with the
    plugin and with ``-p no:gpushare`` (the marker registered in the ini), rounds alternated.
    Wall: from the first session's start to the last one's exit, start-up included (each
    session's own wall beside it). CPU: user+sys of each session with its workers, from
    ``os.wait4`` (the controller reaps its workers; this process is a child subreaper, so a
    worker orphaned on the way would be reaped and counted here too); beside it, how it splits
    between controllers and workers, as each process read its own CPU at ``pytest_unconfigure``
    (a conftest in the suite, the same in both modes).
4b. Cross-session grant latency: S sessions of ``pytest -n 2``, each with K tests marked
    ``gpu(mem="50GiB")`` holding for H ms, on one simulated 80GiB GPU: two tests never fit at
    once, so the box serves one test at a time and every grant hands memory over from the test
    before it. A conftest in the suite (not the plugin) records, for each test, when its setup
    began (the outermost ``pytest_runtest_setup`` wrapper: before the lease is asked for) and
    when its call began and ended (the innermost ``pytest_runtest_call`` wrapper: after the
    grant, before the release), on the box-wide monotonic clock. Sorted by start, tests may not
    overlap (counted: a safety check). A **hand-over** is the gap from one test's end to the
    next test's start, counted when the next one had asked before the previous one ended (it
    was waiting while the memory was held); **cross-session** when the two tests belong to
    different sessions. The gap bounds the grant latency from above: it includes the holder's
    teardown and release and the waiter's setup after the grant. The floor: the same sessions
    with ``-p no:gpushare`` and a raw ``fcntl.flock`` on one file around each test (an autouse
    fixture), measured by the same conftest.
5.  Scale: 2,000 and 8,000 trivial tests at ``-n 2``, with and without the plugin: the peak
    RSS (``VmHWM``, read by a conftest at ``pytest_unconfigure``) of the controller and of each
    worker, and ``ru_maxrss`` of the whole session from ``os.wait4``. The memory the plugin
    adds per test is the slope between the two sizes of (with - without).

Goals (issue 13): p99 cross-session grant latency at most 20 ms with 16 sessions. The issue
sets no number for 4a's wall and CPU: the ratio lines hold them to row 1's 1.10x. Row 5 has
none either: its lines hold the added memory to the last round's +4.4 KB per test.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _util import Ratio, clean_env, load, machine, median, ms, print_ratios, pytest_cmd, quantile, table
from overhead import INI, write_suite

SIMULATE = "80GiB"
#: Two of these never fit on the simulated GPU (80GiB less the 1GiB safety buffer and up to 32
#: workers' 512MiB CUDA contexts leaves more than 50GiB, and less than twice that).
HANDOVER_MEM = "50GiB"
#: Row 1's goal, applied to the sessions' wall and CPU (the issue gives row 4 none of its own).
OVERHEAD_GOAL = 1.10
GRANT_GOAL_MS = 20.0
#: The last round's figure of the memory the plugin adds per test (no goal in the issue).
KB_PER_TEST_BEFORE = 4.4
#: prctl(2) option: orphaned descendants are re-parented to this process.
PR_SET_CHILD_SUBREAPER = 36

#: Records each test's times (row 4b), each process's peak RSS and CPU (rows 4a and 5); the
#: floor's lock.
CONFTEST = """\
import fcntl
import os
import time

import pytest

ASKED = pytest.StashKey[float]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    # The outermost wrapper: before any plugin asks for the test's memory.
    item.stash[ASKED] = time.monotonic()
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item):
    # The innermost wrapper: after the grant, before the teardown gives the memory back.
    start = time.monotonic()
    try:
        return (yield)
    finally:
        end = time.monotonic()
        folder = os.environ.get("BENCH_EVENTS")
        if folder:
            with open(os.path.join(folder, f"{os.getpid()}.txt"), "a") as f:
                f.write(f"{os.environ['BENCH_SESSION']} {item.stash[ASKED]!r} {start!r} {end!r}\\n")


@pytest.fixture(autouse=True)
def _floor_lock():
    path = os.environ.get("BENCH_FLOCK")
    if not path:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # After every plugin's own (their shutdown counts): the process's peak RSS and its CPU
    # (all its threads) so far.
    folder = os.environ.get("BENCH_PROBE")
    if not folder:
        return
    role = os.environ.get("PYTEST_XDIST_WORKER", "controller")
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    peak = int(fields["VmHWM"].split()[0])
    times = os.times()
    with open(os.path.join(folder, f"{role}-{os.getpid()}.txt"), "w") as f:
        f.write(f"{role} {peak} {times.user + times.system!r}\\n")
"""

HOLD_TEST = """\
import time

import pytest


@pytest.mark.gpu(mem="{mem}")
@pytest.mark.parametrize("i", range({tests}))
def test_hold(i):
    time.sleep({hold_s!r})
"""


# --- running sessions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """One session that ended: its wall time from the round's start, CPU (user+sys, its reaped
    workers included), peak RSS of its process tree (KiB) and output."""

    wall_s: float
    cpu_s: float
    maxrss_kb: int
    returncode: int
    output: str


@dataclass
class Round:
    """Sessions started at once: each one's result, the round's wall time (first start to last
    exit), descendants reaped here that outlived their sessions, and the load after."""

    sessions: list[Finished]
    wall_s: float
    orphans: int
    orphan_cpu_s: float
    load: str
    probes: list[Probe] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.sessions) + self.orphan_cpu_s

    def cpu_of(self, controllers: bool) -> float:
        """CPU of the sessions' controllers (or of their workers) as each process measured itself."""
        return sum(p.cpu_s for p in self.probes if (p.role == "controller") == controllers)


@dataclass(frozen=True)
class Probe:
    """What the conftest recorded of one process at its end: its role (``controller`` or the
    xdist worker id), peak RSS (KiB) and CPU (user+sys seconds, every thread)."""

    role: str
    peak_kb: int
    cpu_s: float


def read_probes(folder: Path, sessions: int, workers: int) -> list[Probe]:
    """Every process's probe; stops the benchmark unless each session's controller and workers wrote one."""
    probes = []
    for path in folder.glob("*.txt"):
        role, kb, cpu = path.read_text().split()
        probes.append(Probe(role, int(kb), float(cpu)))
    controllers = sum(p.role == "controller" for p in probes)
    if controllers != sessions or len(probes) != sessions * (workers + 1):
        raise SystemExit(
            f"expected {sessions} controllers' and {sessions * workers} workers' probes, "
            f"found {sorted(p.role for p in probes)}"
        )
    return probes


@dataclass(frozen=True)
class Place:
    """Where a run works: ``work`` holds the suites and outputs, ``ledgers`` (on a memory file
    system where there is one) each round's fresh ledger folder."""

    work: Path
    ledgers: Path

    def folder(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.ledgers))


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children, so that none escapes the CPU count."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def run_sessions(args: Sequence[str], cwd: Path, envs: Sequence[dict[str, str]], out: Path) -> Round:
    """Start one session per environment at once and reap every child until all have ended."""
    start = time.monotonic()
    running: dict[int, int] = {}
    for k, env in enumerate(envs):
        with open(out / f"session-{k}.out", "wb") as f:
            proc = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        proc.returncode = 0  # reaped below with wait4: Popen must never wait for it itself
        running[proc.pid] = k
    done: dict[int, Finished] = {}
    orphans, orphan_cpu = 0, 0.0
    while running:
        pid, status, usage = os.wait4(-1, 0)
        cpu = usage.ru_utime + usage.ru_stime
        if pid not in running:
            orphans, orphan_cpu = orphans + 1, orphan_cpu + cpu
            continue
        k = running.pop(pid)
        text = (out / f"session-{k}.out").read_text(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        done[k] = Finished(time.monotonic() - start, cpu, usage.ru_maxrss, code, text)
    wall = time.monotonic() - start
    late, late_cpu = reap_orphans()
    sessions = [done[k] for k in sorted(done)]
    return Round(sessions, wall, orphans + late, orphan_cpu + late_cpu, load())


def reap_orphans() -> tuple[int, float]:
    """Reap descendants that outlived their sessions (none expected): how many, their CPU."""
    reaped, cpu = 0, 0.0
    while True:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped, cpu
        if pid == 0:
            return reaped, cpu
        reaped, cpu = reaped + 1, cpu + usage.ru_utime + usage.ru_stime


def require_passed(result: Round, tests: int, what: str) -> None:
    """Stop with a session's output when it failed or did not pass every test: a number from a
    broken run would be a lie."""
    for k, s in enumerate(result.sessions):
        if s.returncode != 0 or f"{tests} passed" not in s.output:
            tail = "\n".join(s.output.splitlines()[-40:])
            raise SystemExit(
                f"{what}, session {k}: exit code {s.returncode}, expected {tests} passed:\n{tail}"
            )


def memory_folder() -> Path:
    """Where the rounds' ledger folders go: on a memory file system, as the plugin's default."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.access(candidate, os.W_OK) and fs_type(Path(candidate)) == "tmpfs":
            return Path(candidate)
    return Path(tempfile.gettempdir())


def fs_type(path: Path) -> str:
    """The file system type of the mount that holds ``path`` (the longest match in /proc/mounts)."""
    best, kind = "", "unknown"
    resolved = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                mount, fstype = line.split()[1:3]
                inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def plugin_source(env: dict[str, str], cwd: Path) -> str:
    """Which pytest_gpushare sessions started in ``cwd`` import, and its git state: the figures
    are of that code."""
    code = "import os, pytest_gpushare; print(os.path.dirname(pytest_gpushare.__file__))"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False
    ).stdout.strip()
    if not where:
        return "plugin: not importable"

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return f"plugin: {where} (not in a git checkout)"
    dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    return f"plugin: {where} (commit {head.stdout.strip()}{', uncommitted changes' if dirty else ', clean'})"


def median_round(rounds: Sequence[Round]) -> Round:
    """The round whose wall time is the median (the upper one of an even count)."""
    return sorted(rounds, key=lambda r: r.wall_s)[len(rounds) // 2]


MODES = {"with plugin": (), "-p no:gpushare": ("-p", "no:gpushare")}


# --- 4a: contention ---------------------------------------------------------------------------------


def contention(
    place: Place, counts: Sequence[int], tests: int, repeats: int
) -> dict[tuple[int, str], list[Round]]:
    """Row 4a's rounds: for each count of sessions, each mode, ``repeats`` times, alternated."""
    suite = place.work / "trivial"
    write_suite(suite, tests, max(1, tests // 100))
    (suite / "conftest.py").write_text(CONFTEST)
    rounds: dict[tuple[int, str], list[Round]] = {(n, m): [] for n in counts for m in MODES}
    for r in range(repeats):
        for n in counts:
            for mode in list(MODES) if r % 2 == 0 else list(reversed(MODES)):
                probe = place.folder("probe-")
                env = clean_env(place.folder("ledger-"), GPUSHARE_SIMULATE=SIMULATE, GPUSHARE_OLLAMA="off")
                env["BENCH_PROBE"] = str(probe)
                result = run_sessions(pytest_cmd("-n", "2", "-q", *MODES[mode]), suite, [env] * n, place.work)
                require_passed(result, tests, f"{n} sessions, {mode}")
                result.probes = read_probes(probe, n, 2)
                rounds[(n, mode)].append(result)
    return rounds


def contention_table(rounds: dict[tuple[int, str], list[Round]], tests: int) -> None:
    repeats = len(next(iter(rounds.values())))
    rows = []
    for (n, mode), runs in rounds.items():
        mid = median_round(runs)
        rows.append(
            (
                n,
                mode,
                f"{mid.wall_s:.2f} s",
                f"{min(r.wall_s for r in runs):.2f} s",
                f"{max(r.wall_s for r in runs):.2f} s",
                f"{median([s.wall_s for s in mid.sessions]):.2f} s",
                f"{mid.cpu_s:.1f} s",
                f"{mid.cpu_of(controllers=True):.1f} s",
                f"{mid.cpu_of(controllers=False):.1f} s",
                f"{mid.cpu_s / (n * tests) * 1e6:.0f} us",
                mid.orphans,
                mid.load,
            )
        )
    table(
        f"sessions of pytest -n 2 started at once, {tests} trivial gpu(mem='1GiB') tests each, one "
        f"simulated {SIMULATE} GPU, one ledger folder; wall and CPU with start-up, rounds of each: "
        f"{repeats}, alternated",
        [
            "sessions",
            "mode",
            "round wall",
            "min",
            "max",
            "session wall",
            "CPU user+sys",
            "controllers",
            "workers",
            "CPU per test",
            "orphans",
            "load after (median round)",
        ],
        rows,
    )


def contention_ratios(rounds: dict[tuple[int, str], list[Round]], counts: Sequence[int]) -> list[Ratio]:
    ratios = []
    for n in counts:
        plugin, without = rounds[(n, "with plugin")], rounds[(n, "-p no:gpushare")]
        wall = median([r.wall_s for r in plugin]) / median([r.wall_s for r in without])
        cpu = median([r.cpu_s for r in plugin]) / median([r.cpu_s for r in without])
        ratios.append(
            Ratio(f"wall with plugin / without, {n} sessions of -n 2 (median)", wall, OVERHEAD_GOAL)
        )
        ratios.append(Ratio(f"CPU with plugin / without, {n} sessions of -n 2 (median)", cpu, OVERHEAD_GOAL))
    return ratios


# --- 4b: cross-session hand-overs -------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One test as the suite's conftest saw it (monotonic seconds): its session, when its setup
    began (before the lease was asked for), when its call began and ended."""

    session: str
    asked: float
    start: float
    end: float


@dataclass
class Handovers:
    """Gaps (seconds) from a test's end to the start of the next one, which was waiting by then."""

    cross: list[float] = field(default_factory=list)
    same: list[float] = field(default_factory=list)
    overlaps: int = 0
    tests: int = 0

    def add(self, other: Handovers) -> None:
        self.cross += other.cross
        self.same += other.same
        self.overlaps += other.overlaps
        self.tests += other.tests


def handovers(events: Iterable[Event]) -> Handovers:
    """The hand-overs of a box that serves one test at a time (see the module docstring): for
    each test, in order of start, the gap since the previous test ended, counted only when it
    had asked before that end; two tests that ran at once count as an overlap instead."""
    ordered = sorted(events, key=lambda e: e.start)
    found = Handovers(tests=len(ordered))
    for before, after in itertools.pairwise(ordered):
        if after.start < before.end:
            found.overlaps += 1
        elif after.asked <= before.end:
            gaps = found.cross if after.session != before.session else found.same
            gaps.append(after.start - before.end)
    return found


def read_events(folder: Path) -> list[Event]:
    events = []
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            session, asked, start, end = line.split()
            events.append(Event(session, float(asked), float(start), float(end)))
    return events


#: Row 4b's modes: the plugin, and the floor (a raw flock around each test, no plugin).
HANDOVER_MODES = {"with plugin": (), "floor: flock, -p no:gpushare": ("-p", "no:gpushare")}


@dataclass
class HandoverRuns:
    found: Handovers = field(default_factory=Handovers)
    rounds: list[Round] = field(default_factory=list)


def handover_runs(
    place: Place, counts: Sequence[int], tests: int, hold_s: float, repeats: int
) -> dict[tuple[int, str], HandoverRuns]:
    """Row 4b's rounds: for each count of sessions, each mode, ``repeats`` times, alternated."""
    suite = place.work / "handover"
    suite.mkdir()
    (suite / "pytest.ini").write_text(INI)
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_hold.py").write_text(HOLD_TEST.format(mem=HANDOVER_MEM, tests=tests, hold_s=hold_s))
    runs = {(n, m): HandoverRuns() for n in counts for m in HANDOVER_MODES}
    for r in range(repeats):
        for n in counts:
            for mode in list(HANDOVER_MODES) if r % 2 == 0 else list(reversed(HANDOVER_MODES)):
                ledger, events = place.folder("ledger-"), place.folder("events-")
                # A lost grant would otherwise hold every session for the default 900 s.
                base = clean_env(
                    ledger, GPUSHARE_SIMULATE=SIMULATE, GPUSHARE_OLLAMA="off", GPUSHARE_TIMEOUT="300"
                )
                base["BENCH_EVENTS"] = str(events)
                if mode != "with plugin":
                    base["BENCH_FLOCK"] = str(ledger / "floor.lock")
                envs = [{**base, "BENCH_SESSION": str(k)} for k in range(n)]
                result = run_sessions(
                    pytest_cmd("-n", "2", "-q", *HANDOVER_MODES[mode]), suite, envs, place.work
                )
                require_passed(result, tests, f"hand-overs, {n} sessions, {mode}")
                found = handovers(read_events(events))
                if found.tests != n * tests:
                    raise SystemExit(
                        f"hand-overs, {n} sessions, {mode}: {found.tests} tests recorded, not {n * tests}"
                    )
                runs[(n, mode)].found.add(found)
                runs[(n, mode)].rounds.append(result)
    return runs


def handover_table(runs: dict[tuple[int, str], HandoverRuns], tests: int, hold_s: float) -> None:
    repeats = len(next(iter(runs.values())).rounds)
    rows = []
    for (n, mode), run in runs.items():
        f = run.found
        mid = median_round(run.rounds)
        rows.append(
            (
                n,
                mode,
                f.tests,
                len(f.cross),
                ms(median(f.cross)),
                ms(quantile(f.cross, 0.99)),
                ms(max(f.cross, default=float("nan"))),
                len(f.same),
                ms(median(f.same)),
                ms(quantile(f.same, 0.99)),
                f.overlaps,
                f"{mid.wall_s:.2f} s",
                mid.load,
            )
        )
    table(
        f"hand-overs: sessions of pytest -n 2 at once, {tests} gpu(mem='{HANDOVER_MEM}') tests each holding "
        f"{hold_s * 1000:g} ms, one simulated {SIMULATE} GPU (one test at a time); gap from a test's end to "
        f"the next waiting test's start, rounds of each: {repeats}, alternated",
        [
            "sessions",
            "mode",
            "tests",
            "cross",
            "cross p50",
            "cross p99",
            "cross max",
            "same",
            "same p50",
            "same p99",
            "overlaps",
            "round wall",
            "load after (median round)",
        ],
        rows,
    )


def handover_ratios(runs: dict[tuple[int, str], HandoverRuns], counts: Sequence[int]) -> list[Ratio]:
    ratios = []
    for n in counts:
        found = runs[(n, "with plugin")].found
        p99 = quantile(found.cross, 0.99) * 1000
        ratios.append(
            Ratio(f"p99 cross-session hand-over with plugin, {n} sessions", p99, GRANT_GOAL_MS, "ms")
        )
    overlaps = sum(r.found.overlaps for (_, mode), r in runs.items() if mode == "with plugin")
    ratios.append(Ratio("tests of different sessions that overlapped with plugin", overlaps, 0, "times"))
    return ratios


# --- 5: scale ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peaks:
    """Peak RSS (KiB) of one session's controller, of its largest worker, of its whole tree."""

    controller_kb: int
    worker_kb: int
    tree_kb: int
    wall_s: float
    load: str


def scale_runs(place: Place, sizes: Sequence[int], repeats: int) -> dict[tuple[int, str], list[Peaks]]:
    """Row 5's runs: each size, each mode, ``repeats`` times, alternated."""
    runs: dict[tuple[int, str], list[Peaks]] = {(t, m): [] for t in sizes for m in MODES}
    for tests in sizes:
        suite = place.work / f"scale-{tests}"
        write_suite(suite, tests, max(1, tests // 100))
        (suite / "conftest.py").write_text(CONFTEST)
    for r in range(repeats):
        for tests in sizes:
            for mode in list(MODES) if r % 2 == 0 else list(reversed(MODES)):
                probe = place.folder("probe-")
                env = clean_env(place.folder("ledger-"), GPUSHARE_SIMULATE=SIMULATE, GPUSHARE_OLLAMA="off")
                env["BENCH_PROBE"] = str(probe)
                suite = place.work / f"scale-{tests}"
                result = run_sessions(pytest_cmd("-n", "2", "-q", *MODES[mode]), suite, [env], place.work)
                require_passed(result, tests, f"scale, {tests} tests, {mode}")
                probes = read_probes(probe, 1, 2)
                controller = next(p.peak_kb for p in probes if p.role == "controller")
                worker = max(p.peak_kb for p in probes if p.role != "controller")
                session = result.sessions[0]
                runs[(tests, mode)].append(
                    Peaks(controller, worker, session.maxrss_kb, session.wall_s, result.load)
                )
    return runs


def scale_table(runs: dict[tuple[int, str], list[Peaks]]) -> None:
    repeats = len(next(iter(runs.values())))
    rows = []
    for (tests, mode), peaks in runs.items():
        rows.append(
            (
                tests,
                mode,
                f"{median([p.controller_kb for p in peaks]) / 1024:.1f} MiB",
                f"{median([p.worker_kb for p in peaks]) / 1024:.1f} MiB",
                f"{median([p.tree_kb for p in peaks]) / 1024:.1f} MiB",
                f"{median([p.wall_s for p in peaks]):.2f} s",
                sorted(peaks, key=lambda p: p.wall_s)[len(peaks) // 2].load,
            )
        )
    table(
        f"peak RSS (VmHWM) at pytest -n 2, trivial gpu(mem='1GiB') tests, runs of each: {repeats}, "
        "alternated",
        [
            "tests",
            "mode",
            "controller",
            "largest worker",
            "tree (ru_maxrss)",
            "wall",
            "load after (median run)",
        ],
        rows,
    )


def added_per_test(runs: dict[tuple[int, str], list[Peaks]], small: int, large: int, which: str) -> float:
    """KiB the plugin adds per test to ``which`` process: the slope of (with - without) between
    the two sizes."""

    def added(tests: int) -> float:
        def peak(mode: str) -> float:
            return median([getattr(p, which) for p in runs[(tests, mode)]])

        return peak("with plugin") - peak("-p no:gpushare")

    return (added(large) - added(small)) / (large - small)


def scale_ratios(runs: dict[tuple[int, str], list[Peaks]], sizes: Sequence[int]) -> list[Ratio]:
    small, large = min(sizes), max(sizes)
    return [
        Ratio(
            f"{name} peak RSS added by the plugin per test ({small} to {large} tests)",
            added_per_test(runs, small, large, which),
            KB_PER_TEST_BEFORE,
            "KB/test",
        )
        for which, name in (("controller_kb", "controller"), ("worker_kb", "largest worker"))
    ]


# --- the command ------------------------------------------------------------------------------------


def sizes_arg(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round of each")
    parser.add_argument("--sessions", type=sizes_arg, default=None, help="counts of sessions (default 4,16)")
    parser.add_argument(
        "--tests", type=int, default=None, help="trivial tests per session in 4a (default 200)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds of each mode in 4a (default 3)")
    parser.add_argument(
        "--handover-tests", type=int, default=None, help="tests per session in 4b (default 6)"
    )
    parser.add_argument(
        "--hold-ms", type=float, default=None, help="how long each 4b test holds (default 20)"
    )
    parser.add_argument(
        "--handover-repeats", type=int, default=None, help="rounds of each mode in 4b (default 2)"
    )
    parser.add_argument(
        "--scale", type=sizes_arg, default=None, help="suite sizes of row 5 (default 2000,8000)"
    )
    parser.add_argument(
        "--scale-repeats", type=int, default=None, help="runs of each mode in row 5 (default 2)"
    )
    parser.add_argument(
        "--parts", default="4a,4b,5", help="which rows to run, of 4a,4b,5 (default all of them)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    parts = set(args.parts.split(","))
    if not parts or parts - {"4a", "4b", "5"}:
        parser.error(f"--parts takes 4a, 4b and 5, not {args.parts!r}")
    counts = args.sessions or ([2, 3] if quick else [4, 16])
    hold_s = (args.hold_ms if args.hold_ms is not None else (5 if quick else 20)) / 1000
    sizes = args.scale or ([100, 200] if quick else [2000, 8000])
    if len(sizes) < 2:
        parser.error("--scale needs two sizes at least")

    print("Sessions sharing a box (row 4) and scale (row 5)")
    print(machine())
    print(f"before: {load()}")
    subreaper = become_subreaper()
    ratios: list[Ratio] = []
    with (
        tempfile.TemporaryDirectory(prefix="gpushare-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="gpushare-bench-", dir=memory_folder()) as ledgers,
    ):
        place = Place(Path(tmp), Path(ledgers))
        print(plugin_source(clean_env(None), place.work))
        print(
            f"ledger folders: {ledgers} ({fs_type(Path(ledgers))}); "
            f"child subreaper: {'yes' if subreaper else 'no'}"
        )
        if "4a" in parts:
            tests = args.tests or (20 if quick else 200)
            contended = contention(place, counts, tests, args.repeats or (1 if quick else 3))
            contention_table(contended, tests)
            ratios += contention_ratios(contended, counts)
        if "4b" in parts:
            tests = args.handover_tests or (2 if quick else 6)
            handed = handover_runs(place, counts, tests, hold_s, args.handover_repeats or (1 if quick else 2))
            handover_table(handed, tests, hold_s)
            ratios += handover_ratios(handed, counts)
        if "5" in parts:
            scaled = scale_runs(place, sizes, args.scale_repeats or (1 if quick else 2))
            scale_table(scaled)
            ratios += scale_ratios(scaled, sizes)
    print(f"after: {load()}")
    print_ratios(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
