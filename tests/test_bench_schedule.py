"""The schedule benchmark: its ``--quick`` run prints every row and its auditor, which reads the
tests' own records and not the plugin's ledger, finds no start over usable; its references (the
tight lower bound, the offline greedy schedule) and its auditor are right on small cases."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
from test_bench import BENCH, RATIO_RE, ratio_lines, run_bench

sys.path.insert(0, str(BENCH))
import schedule
from schedule import Box, Card, Case

GIB = 2**30
MIB = 2**20


def test_quick_run_prints_every_row_and_no_start_over_usable() -> None:
    lines = run_bench("schedule.py")
    text = "\n".join(lines)
    assert lines[1].startswith("machine: ")
    assert re.search(r"^scenario mix: 60 tests, .*usable 21\.0GiB; load \d", text, re.M)
    rows = re.findall(r"^  (plugin[^\n]*?|fixed slots[^\n]*?) {2,}(\d+) .* (\d+) +\d+\.\d\d$", text, re.M)
    labels = [r[0] for r in rows]
    assert "plugin, contexts 512MiB" in labels
    assert "plugin, contexts 0" in labels
    assert "fixed slots, K=1 (-p no:gpushare)" in labels
    # The run's rows: 7 plugin workers on 21GiB at 3GiB each, one fixed slot; the auditor's zero.
    assert {label: (int(workers), int(over)) for label, workers, over in rows} == {
        label: (1 if label.startswith("fixed") else 7, 0) for label in labels
    }
    for ref in (
        "tight lower bound, contexts 512MiB",
        "tight lower bound, contexts 0",
        "offline greedy, contexts 0",
    ):
        assert f"\n  {ref}" in text, ref
    assert "bound's terms, contexts 0: memory " in text
    assert "HUNG" not in text  # every run ended within its limit
    assert "\n  plain -n auto" not in text  # two workers could put two 14GiB tests on 21GiB
    ratios = ratio_lines(lines)
    assert all(RATIO_RE.match(r) for r in ratios), ratios
    assert ratios[0].startswith("ratio mix makespan / tight bound, plugin, contexts 512MiB ")
    assert any(r.startswith("ratio mix wall, fixed slots, K=1 / plugin, contexts 512MiB ") for r in ratios)
    assert (
        ratios[-1]
        == "ratio mix plugin starts over usable (auditor: the tests' records) 0.0 times goal <= 0 times met"
    )


def test_auditor_counts_tests_and_contexts_against_usable() -> None:
    records = [
        {"worker": "s0/gw0", "gpu": 0, "mem": 8 * GIB, "start": 0.0, "end": 2.0},
        {"worker": "s0/gw1", "gpu": 0, "mem": 8 * GIB, "start": 1.0, "end": 3.0},
        {"worker": "s0/gw0", "gpu": 0, "mem": 8 * GIB, "start": 2.0, "end": 4.0},  # as the first ends
        {"worker": "s0/gw2", "gpu": 1, "mem": 30 * GIB, "start": 0.0, "end": 1.0},
    ]
    peak, over = schedule.occupancy(records, [20 * GIB, 20 * GIB], context=0)
    assert (peak, over) == ([16 * GIB, 30 * GIB], 1)
    # With contexts, gw0's and gw1's stay on GPU 0 until their last ends: 16GiB + 2 x 2GiB.
    peak, over = schedule.occupancy(records, [20 * GIB, 20 * GIB], context=2 * GIB)
    assert (peak, over) == ([20 * GIB, 32 * GIB], 1)
    peak, over = schedule.occupancy(records, [19 * GIB, 40 * GIB], context=2 * GIB)
    assert over == 2  # the second and third starts on GPU 0


def test_lower_bound_takes_the_largest_term_at_the_best_worker_count() -> None:
    four = [Case(f"t{i}", 10 * GIB, 1.0) for i in range(4)]
    # Two workers are enough: memory 40 GiB*s / 20GiB = 2 s, time 4 s / 2 = 2 s; 10GiB is half.
    assert schedule.lower_bound(four, [20 * GIB], workers=4) == (
        2.0,
        {"memory": 2.0, "workers": 2.0, "longest": 1.0, "over half": 0.0},
    )
    small = [Case(f"t{i}", 1 * GIB, 1.0) for i in range(8)]
    bound, terms = schedule.lower_bound(small, [100 * GIB], workers=2)
    assert (bound, max(terms, key=lambda k: terms[k])) == (4.0, "workers")
    long = [Case("long", 1 * GIB, 5.0), *small]
    assert schedule.lower_bound(long, [100 * GIB], workers=8)[0] == 5.0
    mem = [Case(f"t{i}", 5 * GIB, 1.0) for i in range(8)]
    bound, terms = schedule.lower_bound(mem, [20 * GIB], workers=8)
    assert (bound, max(terms, key=lambda k: terms[k])) == (2.0, "memory")
    # Tests over half of a GPU cannot overlap there: two GPUs run two at a time.
    big = [Case(f"t{i}", 12 * GIB, 1.0) for i in range(4)]
    assert schedule.lower_bound(big, [20 * GIB], workers=4)[0] == 4.0
    assert schedule.lower_bound(big, [20 * GIB, 20 * GIB], workers=4)[0] == 2.0
    # Contexts take room, and the bound may use fewer workers to save theirs: on 8GiB with 2GiB
    # contexts, 3 workers leave 2GiB (8 GiB*s take 4 s), 2 workers leave 4GiB but take 4 s too.
    bound, terms = schedule.lower_bound(small, [8 * GIB], workers=3, context=2 * GIB)
    assert (bound, terms["workers"], terms["memory"]) == (4.0, 4.0, 2.0)


def late_contexts_schedule() -> list[dict[str, Any]]:
    """Issue 14's mix on 21GiB with contexts booked late: gw0 runs the five 14GiB x 3 s tests
    while gw1 runs the fifteen 6GiB x 1 s ones (14 + 6 + 2 x 0.5GiB = 21GiB), then all seven
    workers run the forty 1GiB x 0.2 s ones, six rounds: 16.2 s."""
    records: list[dict[str, Any]] = []

    def run(worker: int, mem: int, start: float, seconds: float) -> None:
        records.append(
            {"worker": f"s0/gw{worker}", "gpu": 0, "mem": mem, "start": start, "end": start + seconds}
        )

    for i in range(5):
        run(0, 14 * GIB, 3.0 * i, 3.0)
    for i in range(15):
        run(1, 6 * GIB, 1.0 * i, 1.0)
    for i in range(40):
        run(i % 7, GIB, 15.0 + 0.2 * (i // 7), 0.2)
    return records


def test_contexts_booked_late_beat_every_context_counted_for_the_whole_run() -> None:
    # The bound stays the tight one (15.79 s at 512MiB): a schedule in which the workers that run
    # the 1GiB tests join once the large ones are done holds no more than usable at any start,
    # and ends within 1.03x of it. No bound that counts all of w contexts for the whole run holds.
    mix = schedule.mix_suite()
    bound = schedule.lower_bound(mix, [21 * GIB], workers=7, context=512 * MIB)[0]
    assert bound == pytest.approx(15.79, abs=0.01)
    records = late_contexts_schedule()
    peak, over = schedule.occupancy(records, [21 * GIB], context=512 * MIB)
    assert (peak, over) == ([21 * GIB], 0)
    span = max(r["end"] for r in records)
    assert span == pytest.approx(16.2) and span / bound < 1.03
    # The greedy reference finds it: two workers until no test over 1GiB is left, then all seven.
    best, order, workers = schedule.greedy_reference(mix, [21 * GIB], workers=7, context=512 * MIB)
    assert (round(best, 6), order, workers) == (16.2, "LPT, 2 workers until no test over 1.0GiB", 7)


def test_greedy_packs_by_memory_and_pays_contexts() -> None:
    four = [Case(f"t{i}", 10 * GIB, 1.0) for i in range(4)]
    assert schedule.greedy_makespan(four, [20 * GIB], workers=4) == 2.0
    assert schedule.greedy_makespan(four, [10 * GIB, 10 * GIB], workers=1) == 4.0
    assert schedule.greedy_makespan(four, [20 * GIB], workers=4, context=1 * GIB) == 4.0
    # Longest first: the 3 s test starts at once instead of last.
    tail = [Case(f"s{i}", GIB, 1.0) for i in range(3)] + [Case("long", GIB, 3.0)]
    assert schedule.greedy_makespan(tail, [80 * GIB], workers=2) == 4.0
    assert schedule.greedy_reference(tail, [80 * GIB], workers=2) == (3.0, "LPT", 2)
    # Fewer workers book fewer contexts: on the mix's 21GiB, 7 contexts of 512MiB keep every 6GiB
    # test from running beside a 14GiB one; 2 workers' contexts do not.
    mix = schedule.mix_suite()
    assert schedule.greedy_makespan(sorted(mix, key=lambda c: -c.seconds), [21 * GIB], 7, 512 * MIB) > 21.0
    assert schedule.greedy_makespan(
        sorted(mix, key=lambda c: -c.seconds), [21 * GIB], 2, 512 * MIB
    ) == pytest.approx(19.0)


def test_greedy_refuses_a_test_that_fits_nowhere() -> None:
    try:
        schedule.greedy_makespan([Case("huge", 30 * GIB, 1.0)], [20 * GIB], workers=1)
    except ValueError:
        return
    raise AssertionError("a test larger than every GPU was scheduled")


def test_fixed_slots_and_plain_n_auto_only_where_safe() -> None:
    cases = [Case("a", 14 * GIB, 1.0), Case("b", 1 * GIB, 1.0)]
    assert schedule.fixed_slots(schedule.MIX_BOX, cases) == [0]  # 21GiB // 14.5GiB
    two = Box("2x80GiB", (Card(80 * GIB, reserved=12 * GIB), Card(80 * GIB, reserved=4 * GIB)))
    assert two.usable == [67 * GIB, 75 * GIB]
    assert two.reserve == "0:12.0GiB,1:4.0GiB"
    assert sorted(schedule.gpu_places(two).values()) == [0, 1]  # two alike cards, two uuids
    assert schedule.fixed_slots(two, [Case("c", 16 * GIB, 1.0)]) == [
        0,
        1,
        0,
        1,
        0,
        1,
        0,
        1,
    ]  # 67 and 75 // 16.5
    n = schedule.xdist_own_count()
    plain = schedule.plain_slots(two, cases)
    assert plain is None or plain == [k % 2 for k in range(n)]
    if n >= 2:
        assert schedule.plain_slots(schedule.MIX_BOX, cases) is None  # two 14GiB tests on 21GiB
