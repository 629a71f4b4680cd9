"""Acceptance of memory-aware dispatch: real ``pytest -n 4`` subprocesses on simulated GPUs.

The suites under test record, from inside each test, when it asked for its lease (a conftest
hook that runs before the plugin's), when its body started and ended (inside the lease), its
worker and its memory; the assertions read only those records, not the plugin's own report.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

GiB = 2**30
MiB = 2**20

RECORDING_CONFTEST = """
import json, os, time
import pytest

@pytest.hookimpl(tryfirst=True, wrapper=True)
def pytest_runtest_setup(item):
    item.asked_at = time.time()  # before the plugin's lease
    return (yield)

@pytest.fixture(autouse=True)
def _record(request):
    start = time.time()  # the lease is held from here
    yield
    end = time.time()
    marker = request.node.get_closest_marker("gpu")
    mem = marker.kwargs.get("mem", "0GiB") if marker else "0GiB"
    line = json.dumps({
        "id": request.node.nodeid, "session": os.environ.get("SESSION", ""), "pid": os.getpid(),
        "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "mem": int(mem[:-3]) * 2**30,
        "asked": request.node.asked_at, "start": start, "end": end,
    })
    with open(os.environ["RECORD"], "a") as f:
        f.write(line + "\\n")
"""

# Two 14GiB tests where xdist's load scheduler gives each to another worker at once (its first
# chunks are tests 0-1 and 2-3), then 1GiB tests: on 24GiB (21GiB for tests beside four CUDA
# contexts) the two large ones cannot run together.
MIX_SUITE = """
import time, pytest

@pytest.mark.gpu(mem="14GiB")
def test_00_large():
    time.sleep(1.0)

@pytest.mark.gpu(mem="1GiB")
def test_01_small():
    time.sleep(0.1)

@pytest.mark.gpu(mem="14GiB")
def test_02_large():
    time.sleep(1.0)

@pytest.mark.parametrize("i", range(29))
@pytest.mark.gpu(mem="1GiB")
def test_03_small(i):
    time.sleep(0.1)
"""


@pytest.fixture
def env(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment of the suites under test; returns the record file."""
    record = tmp_path / "record.jsonl"
    for key in [k for k in list(__import__("os").environ) if k.startswith("GPUSHARE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.setenv("GPUSHARE_SIMULATE", "24GiB")
    monkeypatch.setenv("RECORD", str(record))
    pytester.makeconftest(RECORDING_CONFTEST)
    return record


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", "-n", "4", "-v", *args, timeout=180)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stuck_behind_a_wait(recs: list[dict[str, Any]], waited_s: float = 0.5) -> list[str]:
    """Small tests that a worker held next while the test before them waited for memory."""
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by_worker[r["worker"]].append(r)
    stuck = []
    for runs in by_worker.values():
        runs.sort(key=lambda r: r["start"])
        for before, after in itertools.pairwise(runs):
            if before["start"] - before["asked"] > waited_s and after["mem"] < before["mem"]:
                stuck.append(after["id"])
    return stuck


def test_small_tests_are_never_stuck_behind_a_large_one_that_waits(
    pytester: pytest.Pytester, env: Path
) -> None:
    pytester.makepyfile(MIX_SUITE)
    result = run(pytester)
    result.assert_outcomes(passed=32)
    result.stdout.fnmatch_lines(["scheduling tests via MemoryScheduling", "gpushare: dispatch: memory"])
    recs = records(env)
    assert len(recs) == 32
    assert stuck_behind_a_wait(recs) == []
    assert max(r["start"] - r["asked"] for r in recs) < 0.5  # nothing waited for memory
    large = sorted((r for r in recs if r["mem"] == 14 * GiB), key=lambda r: r["start"])
    assert large[0]["end"] <= large[1]["start"]

    # xdist's own scheduler, on the same suite: the second large test waits on its worker, and
    # the small test xdist gave that worker next waits with it (and -v names xdist's scheduler)
    env.unlink()
    result = run(pytester, "--gpushare-dispatch=xdist")
    result.assert_outcomes(passed=32)
    result.stdout.fnmatch_lines(["scheduling tests via LoadScheduling"])
    assert "gpushare: dispatch" not in result.stdout.str()
    assert stuck_behind_a_wait(records(env))


def test_other_dist_modes_and_runs_without_gpu_tests_keep_xdists_scheduling(
    pytester: pytest.Pytester, env: Path
) -> None:
    pytester.makepyfile(MIX_SUITE)
    result = run(pytester, "--dist=loadscope")
    result.assert_outcomes(passed=32)
    result.stdout.fnmatch_lines(["scheduling tests via LoadScopeScheduling"])
    assert "gpushare: dispatch" not in result.stdout.str()

    pytester.makepyfile("import pytest\n@pytest.mark.parametrize('i', range(12))\ndef test_cpu(i): pass\n")
    result = run(pytester)
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["gpushare: dispatch: xdist: no GPU tests"])


STARVE_SUITE = """
import time, pytest

@pytest.mark.parametrize("i", range(2))
@pytest.mark.gpu(mem="12GiB")
def test_0_medium(i):
    time.sleep(1.0)

@pytest.mark.gpu(mem="19GiB")
def test_1_large():
    time.sleep(0.3)

@pytest.mark.parametrize("i", range(120))
@pytest.mark.gpu(mem="1GiB")
def test_2_small(i):
    time.sleep(0.1)

@pytest.mark.parametrize("i", range(60))
def test_3_cpu(i):
    time.sleep(0.1)
"""


def test_a_large_test_passed_over_runs_within_the_bound(pytester: pytest.Pytester, env: Path) -> None:
    # Earlier runs' durations make the 12GiB tests the heaviest and the 19GiB one lighter than
    # them: both 12GiB tests go to one worker, the 19GiB test cannot fit beside them, and then
    # seldom beside three workers fed with 1GiB tests (and tests without GPU work).
    durations = {f"test_starve.py::test_0_medium[{i}]": 3.0 for i in range(2)}
    durations["test_starve.py::test_1_large"] = 0.3
    durations.update({f"test_starve.py::test_2_small[{i}]": 0.1 for i in range(120)})
    durations.update({f"test_starve.py::test_3_cpu[{i}]": 0.1 for i in range(60)})
    cache = pytester.path / ".pytest_cache" / "v" / "gpushare"
    cache.mkdir(parents=True)
    (cache / "durations").write_text(json.dumps(durations))
    pytester.makepyfile(test_starve=STARVE_SUITE)
    result = run(pytester)
    result.assert_outcomes(passed=183)
    recs = records(env)
    first = min(r["start"] for r in recs)
    large = next(r for r in recs if r["mem"] == 19 * GiB)
    medium_end = max(r["end"] for r in recs if r["mem"] == 12 * GiB)
    small_end = max(r["end"] for r in recs if r["mem"] == GiB)
    # The bound (docs/concepts/dispatch.rst): reserved STARVE_S (2 s) after it was first passed
    # over, it is sent once the tests sent before have run (the 12GiB tests end; the others'
    # queues drain meanwhile), and starts after what its worker held then (at most 0.5 s of
    # queued tests); 1 s of slack for a loaded machine.
    bound = max(medium_end, first + 2.0) + 0.5 + 1.0
    assert large["start"] <= bound, (large["start"] - first, medium_end - first)
    assert large["start"] - large["asked"] < 0.5  # it did not wait for memory
    assert large["end"] < small_end  # not last, as it would be without the bound


def test_a_killed_workers_pending_tests_still_run(pytester: pytest.Pytester, env: Path) -> None:
    pytester.makepyfile(
        """
        import os, time, pytest

        @pytest.mark.gpu(mem="14GiB")
        def test_0_large():
            time.sleep(0.5)

        @pytest.mark.gpu(mem="1GiB")
        def test_1_dies():
            os._exit(3)

        @pytest.mark.parametrize("i", range(20))
        @pytest.mark.gpu(mem="1GiB")
        def test_2_after(i):
            time.sleep(0.02)
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=21, failed=1)
    result.stdout.fnmatch_lines(["gpushare: dispatch: memory", "*crashed while running*test_1_dies*"])
    assert len(records(env)) == 21


SHARED_SUITE = """
import time, pytest

@pytest.mark.parametrize("i", range(4))
@pytest.mark.gpu(mem="10GiB")
def test_large(i):
    time.sleep(0.3)

@pytest.mark.parametrize("i", range(6))
@pytest.mark.gpu(mem="6GiB")
def test_medium(i):
    time.sleep(0.2)

@pytest.mark.parametrize("i", range(16))
@pytest.mark.gpu(mem="1GiB")
def test_small(i):
    time.sleep(0.05)
"""


def test_two_sessions_sharing_a_box_never_overcommit(pytester: pytest.Pytester, env: Path) -> None:
    pytester.makepyfile(SHARED_SUITE)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "4", "-q"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=pytester.path,
            env={**__import__("os").environ, "SESSION": name},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    recs = records(env)
    assert len(recs) == 2 * 26
    usable = 23 * GiB  # 24GiB less the 1GiB safety
    # A worker keeps its CUDA context booked from its first lease until it ends: at least from
    # its first test's start to its last test's end.
    alive: dict[int, tuple[float, float]] = {}
    for r in recs:
        first, last = alive.get(r["pid"], (r["start"], r["end"]))
        alive[r["pid"]] = (min(first, r["start"]), max(last, r["end"]))
    for moment in sorted(r["start"] for r in recs):
        held = sum(r["mem"] for r in recs if r["start"] <= moment < r["end"])
        contexts = sum(1 for first, last in alive.values() if first <= moment <= last) * 512 * MiB
        assert held + contexts <= usable, (moment, held / GiB, contexts / GiB)
    assert max(r["start"] for r in recs if r["session"] == "a") > min(
        r["start"] for r in recs if r["session"] == "b"
    )
    assert max(r["start"] for r in recs if r["session"] == "b") > min(
        r["start"] for r in recs if r["session"] == "a"
    )


def test_x_stops_dispatch_at_once(pytester: pytest.Pytester, env: Path) -> None:
    pytester.makepyfile(
        """
        import time, pytest

        @pytest.mark.gpu(mem="14GiB")
        def test_0_large():
            time.sleep(0.5)

        @pytest.mark.gpu(mem="1GiB")
        def test_1_fails():
            assert False

        @pytest.mark.parametrize("i", range(80))
        @pytest.mark.gpu(mem="1GiB")
        def test_2_after(i):
            time.sleep(0.5)
        """
    )
    result = run(pytester, "-x")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 1
    result.stdout.fnmatch_lines(["gpushare: dispatch: memory"])
    # What the four workers held when the failure came (two or three tests each) ran; nothing
    # was sent after it.
    assert outcomes.get("passed", 0) <= 12, outcomes
