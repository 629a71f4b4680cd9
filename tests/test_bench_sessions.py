"""The sessions benchmark (issue 13, rows 4 and 5) runs in its ``--quick`` mode and prints its
three tables and its ratio lines; the hand-over analysis counts what it says it counts."""

from __future__ import annotations

import re
import sys

from test_bench import BENCH, RATIO_RE, ratio_lines, run_bench

sys.path.insert(0, str(BENCH))
import sessions


def test_sessions_prints_rows_and_ratios() -> None:
    lines = run_bench("sessions.py")
    text = "\n".join(lines)
    assert lines[1].startswith("machine: ")
    assert lines[2].startswith("before: load ")
    assert re.search(r"^plugin: \S+ \(", text, re.M)
    assert re.search(r"^ledger folders: .+ \(\w+\); child subreaper: (yes|no)$", text, re.M)
    for n in (2, 3):
        for mode in ("with plugin", "-p no:gpushare"):
            # sessions, mode, round wall, min, max, session wall, CPU (all, controllers, workers),
            # CPU per test, orphans, load
            row = rf"^  {n} +{re.escape(mode)} +(\d+\.\d\d s +){{4}}(\d+\.\d s +){{3}}\d+ us +0 +load \d"
            assert re.search(row, text, re.M), (n, mode)
        for mode in ("with plugin", "floor: flock, -p no:gpushare"):
            # sessions, mode, tests, cross count and its quantiles, same count and quantiles, overlaps
            row = rf"^  {n} +{re.escape(mode)} +{2 * n} +\d+ +(\S+ ms +){{3}}\d+ +(\S+ ms +){{2}}0 +\d+\.\d\d s +load \d"
            assert re.search(row, text, re.M), (n, mode)
    for tests in (100, 200):
        for mode in ("with plugin", "-p no:gpushare"):
            row = rf"^  {tests} +{re.escape(mode)} +(\d+\.\d MiB +){{3}}\d+\.\d\d s +load \d"
            assert re.search(row, text, re.M), (tests, mode)
    ratios = ratio_lines(lines)
    assert all(RATIO_RE.match(r) for r in ratios), ratios
    assert [re.sub(r" (-?\d+\.\d+|nan)(x| \S+) goal .*", "", r) for r in ratios] == [
        "ratio wall with plugin / without, 2 sessions of -n 2 (median)",
        "ratio CPU with plugin / without, 2 sessions of -n 2 (median)",
        "ratio wall with plugin / without, 3 sessions of -n 2 (median)",
        "ratio CPU with plugin / without, 3 sessions of -n 2 (median)",
        "ratio p99 cross-session hand-over with plugin, 2 sessions",
        "ratio p99 cross-session hand-over with plugin, 3 sessions",
        "ratio tests of different sessions that overlapped with plugin",
        "ratio controller peak RSS added by the plugin per test (100 to 200 tests)",
        "ratio largest worker peak RSS added by the plugin per test (100 to 200 tests)",
    ]
    # The plugin never let two 50GiB tests run at once on the 80GiB GPU.
    assert ratios[6].endswith(" met"), ratios[6]


def event(session: str, asked: float, start: float, end: float) -> sessions.Event:
    return sessions.Event(session, asked, start, end)


def test_handovers_count_only_waiting_tests_and_split_by_session() -> None:
    found = sessions.handovers(
        [
            event("b", 0.5, 1.2, 2.0),  # asked while "a" ran: a cross-session hand-over of 0.2 s
            event("a", 0.0, 0.0, 1.0),
            event("b", 1.5, 2.05, 3.0),  # asked while the one before ran: same session, 0.05 s
            event("a", 3.5, 3.6, 4.0),  # asked after the previous end: not waiting, no hand-over
            event("c", 3.7, 3.9, 4.5),  # started before the previous ended: an overlap
        ]
    )
    assert found.tests == 5
    assert [round(g, 6) for g in found.cross] == [0.2]
    assert [round(g, 6) for g in found.same] == [0.05]
    assert found.overlaps == 1


def test_added_per_test_is_the_slope_of_what_the_plugin_adds() -> None:
    def peaks(controller: int, worker: int) -> list[sessions.Peaks]:
        return [sessions.Peaks(controller, worker, max(controller, worker), 1.0, "load 0")]

    runs = {
        (1000, "with plugin"): peaks(50_000, 40_000),
        (1000, "-p no:gpushare"): peaks(45_000, 39_000),
        (3000, "with plugin"): peaks(60_000, 41_000),
        (3000, "-p no:gpushare"): peaks(46_000, 39_500),
    }
    # The controller: 5,000 KiB added at 1,000 tests, 14,000 at 3,000: 4.5 KiB per test.
    assert sessions.added_per_test(runs, 1000, 3000, "controller_kb") == 4.5
    assert sessions.added_per_test(runs, 1000, 3000, "worker_kb") == 0.25
