"""What observations mean: suggested markers, verdicts, the table, and the memory across runs."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.observations import (
    NOT_MEASURABLE,
    GpuObservation,
    budget_from_history,
    classify,
    merge_history,
    observation_record,
    observed_table,
    parse_budget_mode,
    run_observations,
    suggest_mem,
)
from pytest_gpushare.units import GiB, MiB, format_size, parse_size

A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


# --- advice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peak", "margin", "expected"),
    [
        (0, 0.2, 256 * MiB),
        (100 * MiB, 0.2, 256 * MiB),
        (700 * MiB, 0.2, GiB),  # 840MiB
        (GiB, 0.0, GiB),
        (GiB, 0.2, 1536 * MiB),
        (3 * GiB, 0.2, 4 * GiB),  # 3.6GiB
        (4 * GiB, 0.2, 5 * GiB),  # 4.8GiB
        (10 * GiB + 1, 0.0, 11 * GiB),
    ],
)
def test_suggest_mem(peak: int, margin: float, expected: int) -> None:
    suggestion = suggest_mem(peak, margin)
    assert suggestion == expected
    assert parse_size(format_size(suggestion), "test") == suggestion  # prints exactly


def test_suggest_mem_refuses_negative_input() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        suggest_mem(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        suggest_mem(GiB, -0.1)


def test_classify() -> None:
    assert classify(4 * GiB, 4 * GiB + 1) == "over"
    assert classify(4 * GiB, 4 * GiB) == "ok"
    assert classify(8 * GiB, GiB) == "generous"
    assert classify(GiB, 100 * MiB) == "ok"  # 10x, but less than 1GiB wasted
    assert classify(4 * GiB, GiB) == "ok"  # 4x is not more than 4x


def test_observed_table_lists_over_users_first_with_their_factor() -> None:
    records = [
        {"test_id": "t::ok", "declared_bytes": 2 * GiB, "observed_bytes": GiB, "source": "nvml"},
        {"test_id": "t::unknown", "declared_bytes": GiB, "observed_bytes": None, "source": NOT_MEASURABLE},
        {"test_id": "t::over2", "declared_bytes": GiB, "observed_bytes": 2 * GiB, "source": "nvml"},
        {"test_id": "t::generous", "declared_bytes": 16 * GiB, "observed_bytes": GiB, "source": "torch"},
        {"test_id": "t::over3", "declared_bytes": GiB, "observed_bytes": 3 * GiB, "source": "torch"},
    ]
    table = observed_table(records)
    assert [(r["test_id"], r["verdict"], r["factor"]) for r in table] == [
        ("t::over3", "over", 3.0),
        ("t::over2", "over", 2.0),
        ("t::generous", "generous", 0.06),
        ("t::ok", "ok", 0.5),
        ("t::unknown", NOT_MEASURABLE, None),
    ]
    assert [r["suggested_bytes"] for r in table] == [4 * GiB, 2560 * MiB, 1536 * MiB, 1536 * MiB, None]
    assert table[0]["source"] == "torch"


def test_observation_round_trips_through_a_dict() -> None:
    obs = GpuObservation(A, "cuda:0", GiB, 2 * GiB, "nvml", 2 * GiB, None, 0, 300 * MiB, True, 3)
    assert GpuObservation.from_dict(obs.to_dict()) == obs


def test_observation_record_takes_the_worst_gpu() -> None:
    a = GpuObservation(A, "cuda:0", 4 * GiB, 2 * GiB, "nvml", context_bytes=300 * MiB)
    b = GpuObservation(B, "cuda:1", 4 * GiB, 6 * GiB, "torch", context_bytes=500 * MiB)
    c = GpuObservation(B, "cuda:1", 8 * GiB, None, NOT_MEASURABLE, note="NVML: GPU is lost")
    record = observation_record("t::two", [a.to_dict(), b])
    assert (record["declared_bytes"], record["observed_bytes"], record["source"]) == (
        4 * GiB,
        6 * GiB,
        "torch",
    )
    assert record["context_bytes"] == 500 * MiB
    assert len(record["gpus"]) == 2
    lost = observation_record("t::lost", [c])
    assert (lost["declared_bytes"], lost["observed_bytes"], lost["source"]) == (8 * GiB, None, NOT_MEASURABLE)
    assert lost["note"] == "NVML: GPU is lost"


# --- memory across runs ----------------------------------------------------------------------

DAY = 86400.0


def test_merge_history_keeps_the_last_peaks_of_each_test() -> None:
    history: object = None
    for run in range(7):
        history = merge_history(history, {"t::a": (run + 1) * GiB}, 300 * MiB + run, now=1000.0 + run)
    assert isinstance(history, dict)
    assert history["tests"]["t::a"] == {
        "peaks": [3 * GiB, 4 * GiB, 5 * GiB, 6 * GiB, 7 * GiB],
        "seen": 1006.0,
    }
    assert history["contexts"] == [300 * MiB + r for r in range(2, 7)]


def test_merge_history_forgets_tests_not_run_for_a_month() -> None:
    history = merge_history(None, {"t::old": GiB, "t::kept": GiB}, None, now=0.0)
    history = merge_history(history, {"t::kept": 2 * GiB}, None, now=29 * DAY)
    history = merge_history(history, {"t::new": GiB}, None, now=31 * DAY)
    assert sorted(history["tests"]) == ["t::kept", "t::new"]
    assert history["contexts"] == []


@pytest.mark.parametrize(
    "garbage",
    [
        "nonsense",
        {"version": 99, "tests": {"t::a": {"peaks": [GiB], "seen": 0}}},
        {"version": 1, "tests": {"t::a": {"peaks": ["1GiB", -1, True], "seen": 0}, "t::b": 3}},
        {"version": 1, "tests": [], "contexts": "x"},
    ],
)
def test_merge_history_drops_what_it_cannot_read(garbage: object) -> None:
    merged = merge_history(garbage, {"t::new": GiB}, None, now=0.0)
    assert merged == {"version": 1, "tests": {"t::new": {"peaks": [GiB], "seen": 0.0}}, "contexts": []}


def test_run_observations_collects_measured_peaks_and_the_largest_context() -> None:
    records: list[dict[str, Any]] = [
        {"test_id": "t::a", "observed_bytes": GiB, "context_bytes": 300 * MiB},
        {"test_id": "t::b", "observed_bytes": None, "context_bytes": 500 * MiB},
        {"test_id": "t::c", "observed_bytes": 0, "context_bytes": None},
    ]
    assert run_observations(records) == ({"t::a": GiB, "t::c": 0}, 500 * MiB)
    assert run_observations([]) == ({}, None)


def test_budget_from_history() -> None:
    peaks = {f"t::{i}": i * 100 * MiB for i in range(1, 21)}  # 100MiB .. 2000MiB
    history = merge_history(None, peaks, 400 * MiB, now=0.0)
    p95 = budget_from_history(history, "p95", context_fallback=512 * MiB)
    assert p95 is not None
    assert (p95.statistic_bytes, p95.context_bytes, p95.tests) == (1900 * MiB, 400 * MiB, 20)
    assert p95.bytes == 2816 * MiB  # 1900 + 380 + 400 = 2680MiB, rounded up to 256MiB steps
    assert p95.describe() == (
        "95th percentile of 20 tests' observed peaks 1.9GiB +20% + context 400.0MiB (observed) "
        "-> 2.8GiB per worker"
    )
    largest = budget_from_history(history, "max", context_fallback=512 * MiB, margin=0.0)
    assert largest is not None
    assert (largest.statistic_bytes, largest.bytes) == (2000 * MiB, 2560 * MiB)
    assert budget_from_history(history, "off", context_fallback=512 * MiB) is None
    assert budget_from_history(None, "p95", context_fallback=512 * MiB) is None


def test_budget_assumes_the_context_setting_when_none_was_observed() -> None:
    history = merge_history(None, {"t::a": GiB}, None, now=0.0)
    budget = budget_from_history(history, "max", context_fallback=512 * MiB, margin=0.0)
    assert budget is not None
    assert (budget.bytes, budget.context_observed) == (1536 * MiB, False)
    assert "(assumed)" in budget.describe()


def test_budget_counts_each_test_at_its_largest_kept_peak() -> None:
    history = merge_history(None, {"t::a": 4 * GiB}, None, now=0.0)
    history = merge_history(history, {"t::a": GiB}, None, now=1.0)
    budget = budget_from_history(history, "p95", context_fallback=0, margin=0.0)
    assert budget is not None and budget.statistic_bytes == 4 * GiB


def test_parse_budget_mode() -> None:
    assert parse_budget_mode(" P95 ", "x") == "p95"
    with pytest.raises(
        SettingError, match=r"^--gpushare-worker-mem-from-history: expected one of off, p95, max"
    ):
        parse_budget_mode("median", "--gpushare-worker-mem-from-history")
