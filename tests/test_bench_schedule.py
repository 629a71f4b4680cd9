"""The schedule benchmark runs in its ``--quick`` mode; its safety result is asserted: the plugin
never leases more than is usable."""

from __future__ import annotations

import re
import sys

from test_bench import BENCH, RATIO_RE, ratio_lines, run_bench

sys.path.insert(0, str(BENCH))
import schedule


def test_schedule_prints_rows_and_never_exceeds_usable() -> None:
    lines = run_bench("schedule.py", "--dist", "load")
    text = "\n".join(lines)
    for row in ("plugin --dist load", "offline greedy", "fixed slots", "plain -n auto"):
        assert f"\n  {row}" in text
    ratios = ratio_lines(lines)
    assert all(RATIO_RE.match(r) for r in ratios), ratios
    assert (
        ratios[-1]
        == "ratio 24GiB plugin moments over usable (records and ledger) 0.0 times goal <= 0 times met"
    )
    # The auditor really read the ledger while the plugin ran.
    audited = re.search(r"^  plugin --dist load +(\d+) +12 +", text, re.M)
    assert audited is not None and int(audited.group(1)) > 0


def test_peaks_from_records_counts_starts_over_usable() -> None:
    gib = 2**30
    records = [
        {"gpu": 0, "mem": 8 * gib, "start": 0.0, "end": 2.0},
        {"gpu": 0, "mem": 8 * gib, "start": 1.0, "end": 3.0},
        {"gpu": 0, "mem": 8 * gib, "start": 2.0, "end": 4.0},  # starts as the first ends: no overlap
        {"gpu": 1, "mem": 30 * gib, "start": 0.0, "end": 1.0},
    ]
    peak, over = schedule.peaks_from_records(records, {0: 20 * gib, 1: 20 * gib})
    assert peak == {0: 16 * gib, 1: 30 * gib}
    assert over == 1


def test_lower_bound_and_greedy_reference() -> None:
    gib = 2**30
    cases = [schedule.Case(f"t{i}", 10 * gib, 1.0) for i in range(4)]
    bound, term = schedule.lower_bound(cases, 20 * gib, workers=4)
    assert (bound, term) == (2.0, "memory")
    assert schedule.greedy_makespan(cases, [20 * gib], workers=4) == 2.0
    assert schedule.greedy_makespan(cases, [10 * gib, 10 * gib], workers=1) == 4.0
