"""summary.py: what the controller shows of the session; here, each worker's wait for memory in the
terminal summary and the JSON report, from a real ``pytest -n 2`` on a simulated GPU, each GPU
test's entry made of its setup and teardown reports, what the module loads, and the thread that
prints waiting lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from conftest import wait_until
from process_support import clean_env, run_command

from pytest_gpushare import summary
from pytest_gpushare.entries import REPORT_ATTR, LeaseEntry, setup_entry, teardown_entry
from pytest_gpushare.report import NOTABLE_WAIT_S, worker_wait_text
from pytest_gpushare.runtime import LeaseRecord

pytest_plugins = ["pytester"]

# Two 5GiB tests on a GPU with 7GiB usable: the one that gets its lease first (the holder) keeps
# it until the ledger shows the other one waiting, and 0.5s more. A 1GiB test runs after the
# first of them on that worker (--dist loadfile keeps a file on one worker, in order): all
# through the wait it is pending, and it fits in the 7 - 5 - 0.5 (the holder's CUDA context)
# that is free. Every test notes, in its own words, when it asked for its lease (before the
# plugin's setup), when it got it, and the holder when it saw the other wait and when it ended.
CONFTEST = """
import os, time, pytest
from pytest_gpushare.ledger import read_status

OUT = os.environ["STAMPS"]

def note(item, what):
    with open(os.path.join(OUT, f"{item.name}.{what}"), "w") as f:
        f.write(repr(time.time()))

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    note(item, "asked")

@pytest.fixture(autouse=True)
def got(request):
    note(request.node, "got")

def someone_waits():
    return any(g["waiters"] for g in read_status(os.environ["GPUSHARE_LEDGER_DIR"])["gpus"])

@pytest.fixture
def turn(request):
    def run():
        other = ({"test_big_a", "test_big_b"} - {request.node.name}).pop()
        if not os.path.exists(os.path.join(OUT, other + ".done")):  # first: hold while it waits
            deadline = time.time() + 120
            while not someone_waits():
                assert time.time() < deadline, "the other test never waited"
                time.sleep(0.005)
            note(request.node, "seen")
            time.sleep(0.5)
        note(request.node, "done")
    return run
"""

FIRST = """
import pytest

@pytest.mark.gpu(mem="5GiB")
def test_big_a(turn):
    turn()

@pytest.mark.gpu(mem="1GiB")
def test_small():
    pass
"""

SECOND = """
import pytest

@pytest.mark.gpu(mem="5GiB")
def test_big_b(turn):
    turn()
"""


def stamp(folder: Path, test: str, what: str) -> float:
    return float((folder / f"{test}.{what}").read_text())


def test_a_workers_wait_and_its_room_for_the_pending_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_first=FIRST, test_second=SECOND)
    env = clean_env(GPUSHARE_LEDGER_DIR=str(tmp_path / "ledger"), GPUSHARE_OLLAMA="off", STAMPS=str(stamps))
    proc = run_command(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly"),
            *("-n", "2", "--dist", "loadfile", "--gpushare-simulate=8GiB", "--gpushare-safety=1GiB"),
            *("--gpushare-context-mem=512MiB", "--gpushare-report=report.json"),
        ],
        cwd=pytester.path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout
    report = json.loads((pytester.path / "report.json").read_text())
    leases = {x["test_id"].split("::")[-1]: x for x in report["leases"]}
    workers = {w["worker"]: w for w in report["workers"]}
    holder = next(t for t in ("test_big_a", "test_big_b") if (stamps / f"{t}.seen").exists())
    waiter = ({"test_big_a", "test_big_b"} - {holder}).pop()
    assert leases[holder]["worker"] != leases[waiter]["worker"]
    assert set(workers) == {x["worker"] for x in report["leases"]}

    # What each worker waited lies between when its tests asked and when they got their leases.
    for worker, figures in workers.items():
        asked_to_got = sum(
            stamp(stamps, t, "got") - stamp(stamps, t, "asked")
            for t, x in leases.items()
            if x["worker"] == worker
        )
        assert 0 <= figures["waited_with_room_s"] <= figures["waited_s"] <= asked_to_got + 1e-3

    # The waiter waited at least from when the holder saw it wait to when the holder ended; all
    # that while the small test was pending and fitted. (Its record's wait ends when the answer
    # reached its worker, at most got - done after the grant: that much may fall outside.)
    seen, done = stamp(stamps, holder, "seen"), stamp(stamps, holder, "done")
    late = stamp(stamps, waiter, "got") - done
    mine = workers[leases[waiter]["worker"]]
    assert done - seen >= 0.5
    assert mine["waited_s"] >= done - seen - 1e-3
    assert mine["waited_with_room_s"] >= done - seen - late - 1e-3

    # The terminal summary: one line per worker that waited, with the report's figures.
    lines = [x for x in proc.stdout.splitlines() if x.startswith("worker ") and " for memory, " in x]
    want = [
        worker_wait_text(w["worker"], w["waited_s"], w["waited_with_room_s"])
        for w in report["workers"]
        if w["waited_s"] >= NOTABLE_WAIT_S
    ]
    assert lines == want
    assert worker_wait_text(mine["worker"], mine["waited_s"], mine["waited_with_room_s"]) in lines


def _run_with_report(
    pytester: pytest.Pytester, tmp_path: Path, simulate: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``pytest -n 2`` of pytester's folder on simulated GPUs, with a JSON report; it passed."""
    proc = run_command(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", f"--gpushare-simulate={simulate}",
         "--gpushare-report=report.json"],
        cwd=pytester.path,
        env=clean_env(GPUSHARE_LEDGER_DIR=str(tmp_path / "ledger"), GPUSHARE_OLLAMA="off", **env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    return proc


def test_no_worker_line_when_nobody_waited(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_one="import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_a(gpu): pass\n")
    proc = _run_with_report(pytester, tmp_path, "8GiB")
    assert "gpushare" in proc.stdout and "1 lease(s)" in proc.stdout
    assert " for memory, " not in proc.stdout
    (worker,) = json.loads((pytester.path / "report.json").read_text())["workers"]
    assert worker["waited_s"] < NOTABLE_WAIT_S and worker["waited_with_room_s"] <= worker["waited_s"]


SIMULATED_CONFTEST = """
import json, os, sys, pytest
from pytest_gpushare import lease

OUT = os.environ["OUT"]

@pytest.fixture(scope="session")
def block():
    with lease(mem="1GiB"):
        yield

def pytest_runtest_logreport(report):
    # Before the plugin's own (trylast) takes the entry off: what each report carries.
    entry = getattr(report, "gpushare", None)
    if entry is not None:
        with open(os.path.join(OUT, "entries.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\\n")

def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):
        with open(os.path.join(OUT, f"modules-{os.getpid()}.json"), "w") as f:
            json.dump([m for m in sys.modules if m.startswith("pytest_gpushare")], f)
"""

SIMULATED_TESTS = """
import pytest

@pytest.mark.gpu(mem="2GiB")
def test_marker():
    pass

@pytest.mark.gpu(mem="512MiB")
def test_fixture(gpu):
    pass

@pytest.mark.gpu(mem="1GiB", count=2)
def test_two(gpus, block):
    pass
"""


def test_tests_on_simulated_gpus_are_not_watched_and_the_report_still_says_not_measurable(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Nothing can be measured on a simulated GPU: the workers do not watch the tests (observe is
    never imported) and their reports say nothing of it; the controller writes each GPU test's
    "not measurable" row itself, as a worker's watch would have (no row for a lease() block)."""
    out = tmp_path / "out"
    out.mkdir()
    pytester.makeconftest(SIMULATED_CONFTEST)
    pytester.makepyfile(test_sim=SIMULATED_TESTS)
    proc = _run_with_report(pytester, tmp_path, "2x8GiB", OUT=str(out))
    assert "not measurable" not in proc.stdout  # the summary hides it on simulated GPUs, as before
    report = json.loads((pytester.path / "report.json").read_text())
    rows = {r["test_id"].split("::")[-1]: r for r in report["observed"]}
    declared = {"test_marker": 2 * 2**30, "test_fixture": 2**29, "test_two": 2**30}
    assert {t: r["declared_bytes"] for t, r in rows.items()} == declared
    assert all((r["verdict"], r["observed_bytes"]) == ("not measurable", None) for r in rows.values())
    entries = [json.loads(line) for line in (out / "entries.jsonl").read_text().splitlines()]
    assert len(entries) >= 6 and not any("observed" in e for e in entries)
    modules = [json.loads(p.read_text()) for p in out.glob("modules-*.json")]
    assert modules and not any("pytest_gpushare.observe" in m for m in modules)


def test_the_controller_writes_a_simulated_gpus_observations_as_a_watch_would() -> None:
    """What the controller writes for a test on simulated GPUs is the watch's own "not measurable"."""
    from pytest_gpushare.observations import observation_record, on_simulated
    from pytest_gpushare.observe import Watch
    from pytest_gpushare.runtime import GpuLease

    leases = [
        GpuLease("cpu", i, f"GPU-{i}", "Simulated GPU", 2**30, 8 * 2**30, False, simulated=True)
        for i in (0, 1)
    ]
    watch = Watch(0)
    watch.begin(leases)
    watched = observation_record("t.py::test_a", watch.end())
    written = observation_record("t.py::test_a", [on_simulated(f"GPU-{i}", "cpu", 2**30) for i in (0, 1)])
    assert written == watched


# --- each GPU test's entry, from its setup and teardown reports ---------------------------------


def _report(nodeid: str, when: str, entry: LeaseEntry | None, worker: str | None = None) -> pytest.TestReport:
    """A report as the controller receives it: from xdist's worker ``worker`` (its ``node``)."""
    rep = pytest.TestReport(nodeid, (nodeid, 0, nodeid), {}, "passed", None, when)  # type: ignore[arg-type]
    if entry is not None:
        setattr(rep, REPORT_ATTR, entry)
    if worker is not None:
        rep.node = SimpleNamespace(gateway=SimpleNamespace(id=worker))  # type: ignore[attr-defined]
    return rep


def _collector() -> summary.Collector:
    return summary.Collector(cast(pytest.Config, None), list)


def _halves(record: LeaseRecord, released_at: float, **teardown: Any) -> tuple[LeaseEntry, LeaseEntry]:
    """The entries of a test's setup and teardown reports, as testhooks.py makes them."""
    setup = setup_entry(record)
    record.released_at = released_at
    args = {"outcome": None, "fallback": None, "observed": [], "log": [], **teardown}
    return setup, teardown_entry(released_at=record.released_at, **args)


def test_each_report_carries_only_what_the_controller_does_not_know_by_then() -> None:
    record = LeaseRecord("t.py::test_a", "gw0", [("GPU-1", 0, 2**30)], 0.25004, 100.0)
    setup, teardown = _halves(record, 101.5, outcome="failed", log=["a note"])
    # The setup half: the lease's GPUs, wait and start; the test id and worker are the report's.
    assert setup == {"taken": [[["GPU-1", 0, 2**30]], 0.25, 100.0]}
    assert teardown == {"outcome": "failed", "released_at": 101.5, "log": ["a note"]}
    # Neither half of a passed test that took no lease says anything (a CPU fallback says so).
    assert teardown_entry(None, None, [], None, []) == {}
    assert teardown_entry(None, "cpu", [], None, []) == {"fallback": "cpu"}


def test_the_controller_keeps_one_entry_per_test_and_takes_it_off_both_reports() -> None:
    record = LeaseRecord("t.py::test_a", "gw0", [("GPU-1", 0, 2**30)], 0.25, 100.0)
    setup, teardown = _halves(record, 101.5, outcome="failed", observed=[{"uuid": "GPU-1"}], log=["a note"])
    collector = _collector()
    halves = {"setup": setup, "teardown": teardown}
    reports = [_report("t.py::test_a", when, half, "gw0") for when, half in halves.items()]
    for rep in reports:
        collector.pytest_runtest_logreport(rep)
    # The entry is what a teardown report carried whole before: the record as released.
    assert collector.collected == [
        {
            "test_id": "t.py::test_a",
            "outcome": "failed",
            "observed": [{"uuid": "GPU-1"}],
            "lease": record.to_dict(),
            "log": ["a note"],
        }
    ]
    assert collector.running == {}
    # pytest's terminal reporter keeps every report to the end of the run: none keeps an entry.
    assert not any(hasattr(rep, REPORT_ATTR) for rep in reports)


def test_a_lease_handed_on_to_the_next_test_travels_as_its_start_alone() -> None:
    """A worker's test that takes over its previous test's lease says only when: the controller
    knows the GPUs from that test's setup report (shared, not copied) and the wait is 0 s."""
    first = LeaseRecord("t.py::test_a", "gw0", [("GPU-1", 0, 2**30)], 0.5, 100.0)
    second = LeaseRecord("t.py::test_b", "gw0", [("GPU-1", 0, 2**30)], 0.0, 101.0, carried=True)
    (setup_a, teardown_a), (setup_b, teardown_b) = _halves(first, 100.9), _halves(second, 102.0)
    assert setup_b == {"carried_at": 101.0}
    collector = _collector()
    for nodeid, setup, teardown in (
        ("t.py::test_a", setup_a, teardown_a),
        ("t.py::test_b", setup_b, teardown_b),
    ):
        collector.pytest_runtest_logreport(_report(nodeid, "setup", json.loads(json.dumps(setup)), "gw0"))
        collector.pytest_runtest_logreport(_report(nodeid, "teardown", teardown, "gw0"))
    assert [e["lease"] for e in collector.collected] == [first.to_dict(), second.to_dict()]
    a, b = (e["lease"]["gpus"] for e in collector.collected)
    assert a is b


def test_the_controller_keeps_one_copy_of_what_every_report_repeats() -> None:
    """Each report arrives deserialised on its own: the node id is the report's (pytest keeps it
    anyway), and a uuid, a worker id or a key that two entries share is one string."""
    collector = _collector()
    nodeids = []
    for i in range(2):
        nodeid = "".join(["t.py::test_", str(i)])  # not interned, as a deserialised one
        record = LeaseRecord(nodeid, "gw0", [("GPU-1", 0, 2**30)], 0.0, 100.0)
        for when, half in zip(("setup", "teardown"), _halves(record, 101.0), strict=True):
            collector.pytest_runtest_logreport(_report(nodeid, when, json.loads(json.dumps(half)), "gw0"))
        nodeids.append(nodeid)
    first, second = (e["lease"] for e in collector.collected)
    assert [first["test_id"], second["test_id"]] == nodeids
    assert first["test_id"] is nodeids[0] and second["test_id"] is nodeids[1]
    assert first["worker"] is second["worker"] and first["gpus"][0]["uuid"] is second["gpus"][0]["uuid"]
    assert {id(k) for k in first} == {id(k) for k in second}


def test_a_passed_test_without_a_lease_gets_its_outcome_from_the_report() -> None:
    collector = _collector()
    collector.pytest_runtest_logreport(_report("t.py::test_cpu", "setup", None))
    collector.pytest_runtest_logreport(_report("t.py::test_cpu", "teardown", LeaseEntry(fallback="cpu")))
    assert collector.collected == [{"test_id": "t.py::test_cpu", "fallback": "cpu", "outcome": "passed"}]


def test_one_test_on_two_workers_at_once_keeps_each_workers_lease() -> None:
    """``--dist each`` runs every test on every worker: a node id alone names two leases."""
    mine = LeaseRecord("t.py::test_a", "gw0", [("GPU-1", 0, 2**30)], 0.0, 100.0)
    theirs = LeaseRecord("t.py::test_a", "gw1", [("GPU-2", 1, 2**30)], 0.0, 100.5)
    (my_setup, _), (their_setup, their_teardown) = _halves(mine, 102.0), _halves(theirs, 101.0)
    collector = _collector()
    collector.pytest_runtest_logreport(_report("t.py::test_a", "setup", my_setup, "gw0"))
    collector.pytest_runtest_logreport(_report("t.py::test_a", "setup", their_setup, "gw1"))
    collector.pytest_runtest_logreport(_report("t.py::test_a", "teardown", their_teardown, "gw1"))
    # gw0's worker dies holding its lease: the one it lost is its own, still held.
    collector.pytest_handlecrashitem("t.py::test_a", _report("t.py::test_a", "???", None, "gw0"), None)
    assert [e["lease"] for e in collector.collected[:1]] == [theirs.to_dict()]
    lost = collector.collected[1]
    assert (lost["outcome"], lost["lease"]["worker"], lost["lease"]["taken_at"]) == ("crashed", "gw0", 100.0)
    assert lost["lease"]["released_at"] >= 100.0
    assert len(collector.lost) == 1 and collector.running == {}


def test_the_controllers_modules_load_no_ledger_access_or_frameworks_on_import() -> None:
    """Waiting lines (the ledger's status) and the frameworks' defaults (enforce, observe) load on
    first use: a run without GPU work, ``--collect-only`` among them, never pays for them."""
    code = (
        "import json, sys, pytest_gpushare.summary, pytest_gpushare.workers; "
        "print(json.dumps([m for m in sys.modules if m.startswith('pytest_gpushare')]))"
    )
    proc = run_command([sys.executable, "-c", code], env=clean_env())
    assert proc.returncode == 0, proc.stdout
    loaded = set(json.loads(proc.stdout))
    assert {"pytest_gpushare.summary", "pytest_gpushare.workers"} <= loaded
    lazy = {"pytest_gpushare.enforce", "pytest_gpushare.observe", "pytest_gpushare.ledger.status"}
    assert loaded.isdisjoint(lazy | {"pytest_gpushare.ledger.access", "pytest_gpushare.ledger.views"})


# --- the thread that prints waiting lines --------------------------------------------------------


class Terminal:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_wait_watcher_prints_from_a_thread_that_takes_no_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    masks: list[set[signal.Signals]] = []

    def lines(self: summary.WaitWatcher, now: float) -> list[str]:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # the calling thread's mask
        return [f"gpushare: t::x (gw0) has waited {len(masks)}s for 1.0GiB"]

    monkeypatch.setattr(summary.WaitWatcher, "lines", lines)
    terminal = Terminal()
    watcher = summary.WaitWatcher(terminal, str(tmp_path), "session", 0.0, interval=0.01)
    watcher.start()
    try:
        wait_until(lambda: len(terminal.lines) >= 2, "two waiting lines")
    finally:
        watcher.stop()
    assert terminal.lines[0] == "gpushare: t::x (gw0) has waited 1s for 1.0GiB"
    # A Ctrl-C goes to the main thread, which stops the session: never to this one.
    assert {signal.SIGINT, signal.SIGTERM} <= masks[0]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not any(t.name == "gpushare-waits" for t in threading.enumerate())
