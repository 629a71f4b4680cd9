"""The benchmarks run: each script in its ``--quick`` mode prints its tables and ends with ratio lines.

Timing goals are not asserted here (a loaded CI box must not fail the suite); the safety result
of the schedule benchmark is: the plugin never leases more than is usable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _util  # noqa: E402

RATIO_RE = re.compile(r"^ratio .+ goal (<=|>=) \S+( \S+)? (met|MISSED)$")


def run_bench(script: str, *args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def ratio_lines(lines: list[str]) -> list[str]:
    """The block of ratio lines that ends the output."""
    tail = []
    for line in reversed([x for x in lines if x.strip()]):
        if not line.startswith("ratio "):
            break
        tail.append(line)
    return tail[::-1]


def test_lease_cost_prints_rows_and_ratios() -> None:
    lines = run_bench("lease_cost.py")
    text = "\n".join(lines)
    assert lines[1].startswith("machine: ")
    assert lines[2].startswith("before: load ")
    assert re.search(r"^ledger folder: .+ \(\w+\)$", text, re.M)
    rows = (
        "raw flock + page-cache write",
        "flock + JSON RMW",
        "flock + JSON RMW in place",
        "ledger lock + JSON RMW",
        "lease cycle",
    )
    for row in rows:
        # Once for one process, once for the contending processes.
        assert len(re.findall(rf"^  {re.escape(row)}  +\d", text, re.M)) == 2, row
    assert "what-if" not in text  # rows that measure nothing are gone (issue 13)
    ratios = ratio_lines(lines)
    assert len(ratios) == 2
    assert all(RATIO_RE.match(r) for r in ratios), ratios
    assert ratios[0].startswith("ratio lease cycle / physical floor (median, one process) ")
    assert ratios[1].startswith("ratio lease cycle p99 with 4 contending processes ")


def test_overhead_prints_rows_and_ratios() -> None:
    lines = run_bench("overhead.py")
    text = "\n".join(lines)
    assert "100 trivial tests" in text
    for layout in ("-n 2", "-n 8", "one process"):
        assert re.search(rf"^  {layout}, with plugin +\d+\.\d\d s .* \d\.\d{{3}} +load \d", text, re.M), (
            layout
        )
        assert re.search(rf"^  {layout}, -p no:gpushare +\d+\.\d\d s .* - +load \d", text, re.M), layout
    assert re.search(r"^  -p no:gpushare +\d+ ms", text, re.M)
    assert re.search(r"^  -p no:gpushare, no bytecode +\d+ ms", text, re.M)
    assert re.search(r"^start-up delta without bytecode: -?\d+ ms", text, re.M)
    ratios = ratio_lines(lines)
    assert all(RATIO_RE.match(r) for r in ratios), ratios
    assert ratios[0].startswith("ratio wall with plugin / without, -n 2 (median) ")
    assert ratios[3].startswith("ratio box-ledger writes per test under xdist ")
    assert ratios[4].startswith("ratio start-up delta of --collect-only (median) ")
    assert len(ratios) == 5


def test_broker_prints_rows_and_ratios() -> None:
    lines = run_bench("broker.py")
    text = "\n".join(lines)
    assert "load average before: " in text and "load average after: " in text
    ratios = ratio_lines(lines)
    assert ratios and all(RATIO_RE.match(r) for r in ratios), ratios


def test_quantile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _util.quantile(values, 0.5) == 50.0
    assert _util.quantile(values, 0.99) == 99.0
    assert _util.quantile([3.0], 0.99) == 3.0


def test_ratio_line_shows_the_side_of_the_goal() -> None:
    assert _util.Ratio("r", 1.153, 1.15).line() == "ratio r 1.153x goal <= 1.15x MISSED"
    assert _util.Ratio("r", 1.4, 1.3, higher_is_better=True).line() == "ratio r 1.40x goal >= 1.30x met"
    assert _util.Ratio("r", 0, 0, "times").line() == "ratio r 0.0 times goal <= 0 times met"
