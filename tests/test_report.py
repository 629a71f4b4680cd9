"""report.py: pure formatting of the header, the summary and the JSON report."""

from __future__ import annotations

import os

import pytest

from pytest_gpushare import report, summary
from pytest_gpushare.gpus import Gpu, GpuInventory, GpuProcess, SimulatedProbe
from pytest_gpushare.planner import Budget, Reservation, make_plan
from pytest_gpushare.units import GiB, MiB

BUDGET = Budget(GiB, 3 * GiB, 512 * MiB, 0.25, None)


def spec_plan():  # type: ignore[no-untyped-def]
    inv = SimulatedProbe("24GiB:used=2GiB").probe()
    return make_plan(inv, BUDGET, reservations=[Reservation(0, 12 * GiB, "Ollama hold", "ollama", 12 * GiB)])


def test_header_has_every_term_and_the_derivation() -> None:
    plan = spec_plan()
    count = plan.worker_count(8)
    lines = report.header_lines(plan, report.WorkerLine("auto", 2, count), ledger="/l")
    assert lines[0] == "gpushare: VRAM analysis (source: simulated (24GiB:used=2GiB))"
    assert lines[1].endswith(
        "total 24.0GiB, free 22.0GiB, Ollama hold 12.0GiB, safety 1.0GiB -> usable 9.0GiB"
    )
    assert lines[2] == (
        "  workers: 2 (floor(9.0GiB / 3.0GiB) = 3; workers-per-gb cap floor(9.0 × 0.25) = 2; "
        "xdist's own count 8; bound by workers-per-gb)"
    )
    assert lines[-1] == "  ledger: /l"


def test_header_quotes_nvml_errors_and_says_no_gpu() -> None:
    plan = make_plan(GpuInventory((), "NVML", error="Driver/library version mismatch"), BUDGET)
    lines = report.header_lines(plan, report.WorkerLine("fixed", 4, plan.worker_count(4)), ledger="/l")
    assert "  NVML failed: Driver/library version mismatch" in lines
    assert "  no GPU: GPU tests follow --gpushare-fallback" in lines
    assert lines[3].startswith("  workers: 4 (set by -n 4; -n auto would give 4: NVML failed")


@pytest.mark.parametrize(
    ("intervals", "peak"),
    [
        ([(0, 2, 4), (1, 3, 4)], 8),
        ([(0, 1, 4), (1, 2, 4)], 4),  # a release and a grant at one instant never overlap
        ([(0, 10, 1), (2, 3, 5), (4, 5, 6), (4.5, 9, 2)], 9),
        ([], 0),
    ],
)
def test_peak_concurrent(intervals: list[tuple[float, float, int]], peak: int) -> None:
    assert report.peak_concurrent(intervals) == peak


def _lease(test: str, taken: float, released: float | None, n: int, uuid: str = "GPU-x") -> dict[str, object]:
    return {
        "test_id": test,
        "worker": "gw0",
        "gpus": [{"uuid": uuid, "index": 0, "bytes": n}],
        "waited_s": 0.5 if test == "b" else 0.0,
        "taken_at": taken,
        "released_at": released,
    }


def test_summarize_counts_peaks_waits_and_not_run() -> None:
    collected = [
        {"test_id": "a", "lease": _lease("a", 0, 2, 4 * GiB), "outcome": "passed", "fallback": None},
        {"test_id": "b", "lease": _lease("b", 1, None, 3 * GiB), "outcome": "failed", "fallback": None},
        {"test_id": "c", "fallback": "skip"},
    ]
    plan = make_plan(GpuInventory((Gpu(0, "GPU-x", "X", 24 * GiB, 24 * GiB, 0),), "NVML"), BUDGET)
    data = report.summarize(collected, ["worker gw1 crashed"], now=5, plan=plan)
    assert data["gpus"]["GPU-x"] == {"index": 0, "leases": 2, "peak_bytes": 7 * GiB}  # b held until now
    assert data["waited_longest"] == [{"test_id": "b", "waited_s": 0.5}]  # a's 0.0s is no wait
    assert data["not_run"] == [{"test_id": "c", "fallback": "skip"}]
    # b waited over [0.5, 1) with 23GiB - 4GiB - a's context free, but no other test was left to run.
    assert data["workers"] == [{"worker": "gw0", "waited_s": 0.5, "waited_with_room_s": 0.0}]
    lines = report.summary_lines(plan, data)
    assert lines[0] == "GPU 0 X: peak leased 7.0GiB of 23.0GiB usable, 2 lease(s)"
    assert lines[1:3] == ["waited longest for memory:", "  0.5s b"]
    assert lines[3] == "worker gw0 waited 0.5s for memory, none of it with room for another pending test"
    assert lines[4:6] == ["1 GPU tests not run (skip: no GPU could serve them):", "  c (skip)"]
    assert "lost: worker gw1 crashed" in lines


def test_waits_too_short_to_print_are_not_listed() -> None:
    leases = [
        {"test_id": t, "lease": {**_lease(t, 0, 1, GiB), "waited_s": w}, "outcome": "passed"}
        for t, w in (("quick", 0.0004), ("rounds_to_zero", 0.049), ("real", 2.0))
    ]
    plan = make_plan(GpuInventory((Gpu(0, "GPU-x", "X", 24 * GiB, 24 * GiB, 0),), "NVML"), BUDGET)
    data = report.summarize(leases, [], now=5, plan=plan)
    assert [w["test_id"] for w in data["waited_longest"]] == ["real"]
    assert "0.0s" not in "\n".join(report.summary_lines(plan, data))


def test_summary_says_per_worker_how_long_it_waited_and_how_much_had_room() -> None:
    def entry(
        test: str, worker: str, taken: float, released: float, n: int, waited: float
    ) -> dict[str, object]:
        lease = {**_lease(test, taken, released, n), "worker": worker, "waited_s": waited}
        return {"test_id": test, "lease": lease, "outcome": "passed"}

    plan = make_plan(GpuInventory((Gpu(0, "GPU-x", "X", 24 * GiB, 24 * GiB, 0),), "NVML"), BUDGET)
    collected = [
        entry("a", "gw0", 0, 10, 20 * GiB, 0.0),
        # b waits over [2, 10) with 23GiB - 20GiB - gw0's 512MiB context free: c's 1GiB fits.
        entry("b", "gw1", 10, 11, 8 * GiB, 8.0),
        entry("c", "gw2", 12, 13, GiB, 0.0),
    ]
    data = report.summarize(collected, [], now=20, plan=plan)
    assert data["workers"] == [
        {"worker": "gw0", "waited_s": 0.0, "waited_with_room_s": 0.0},
        {"worker": "gw1", "waited_s": 8.0, "waited_with_room_s": 8.0},
        {"worker": "gw2", "waited_s": 0.0, "waited_with_room_s": 0.0},
    ]
    lines = report.summary_lines(plan, data)
    waits = [x for x in lines if x.startswith("worker ")]
    assert waits == ["worker gw1 waited 8.0s for memory, 8.0s of it with room for another pending test"]
    assert report.json_report(plan, data, 0, 20)["workers"] == data["workers"]

    nobody = report.summarize([entry("a", "gw0", 0, 10, 20 * GiB, 0.0)], [], now=20, plan=plan)
    assert not [x for x in report.summary_lines(plan, nobody) if x.startswith("worker ")]


def test_gpu_tests_not_run_are_named_up_to_ten() -> None:
    not_run = [{"test_id": f"t.py::test_{i}", "fallback": "cpu" if i % 2 else "skip"} for i in range(13)]
    lines = report.not_run_lines(not_run)
    assert lines[0] == "13 GPU tests not run (cpu, skip: no GPU could serve them):"
    assert lines[1:11] == [f"  t.py::test_{i} ({x['fallback']})" for i, x in enumerate(not_run[:10])]
    assert lines[11] == "  and 3 more (all in the --gpushare-report JSON)"
    assert len(lines) == 12
    assert report.not_run_lines([]) == []


def test_leases_on_another_hosts_gpus_are_listed_apart() -> None:
    # A remote xdist worker plans and leases on its own host's GPUs (SPEC "Past one box").
    remote = {"test_id": "r", "lease": _lease("r", 0, 1, 2 * GiB, uuid="GPU-remote"), "outcome": "passed"}
    plan = make_plan(GpuInventory((Gpu(0, "GPU-x", "X", 24 * GiB, 24 * GiB, 0),), "NVML"), BUDGET)
    data = report.summarize([remote], [], now=5, plan=plan)
    lines = report.summary_lines(plan, data)
    assert lines[:2] == [
        "GPU 0 X: peak leased 0B of 23.0GiB usable, 0 lease(s)",
        "GPU 0 GPU-remote (another host): peak leased 2.0GiB, 1 lease(s)",
    ]


def test_pin_lines_say_what_each_worker_got() -> None:
    lines = report.pin_lines(
        [("gw0", "GPU 0 only"), ("gw1", "GPU 2 (then 3)")],
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "TF_FORCE_GPU_ALLOW_GROWTH": "true"},
    )
    assert lines == [
        "gpushare: workers pinned by CUDA_VISIBLE_DEVICES, home GPU first as cuda:0: "
        "gw0 GPU 0 only; gw1 GPU 2 (then 3)",
        "gpushare: set in each worker: CUDA_DEVICE_ORDER=PCI_BUS_ID, TF_FORCE_GPU_ALLOW_GROWTH=true",
    ]
    assert report.pin_lines([], {"A": "1"}) == []


def test_foreign_processes_on_a_private_folder_are_pointed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = Gpu(0, "GPU-x", "X", 24 * GiB, 20 * GiB, 4 * GiB, (GpuProcess(os.getpid(), GiB),))
    plan = make_plan(GpuInventory((gpu,), "NVML"), BUDGET)
    assert summary._foreign_processes(plan) == {}  # our own process
    monkeypatch.setattr(os, "getuid", lambda: os.stat(f"/proc/{os.getpid()}").st_uid + 1)
    found = summary._foreign_processes(plan)
    assert found == {0: [os.getpid()]}
    line = report.foreign_lines(found)[0]
    assert line.startswith(f"WARNING: other accounts' processes use GPU 0 (pids {os.getpid()})")
    assert "--gpushare-ledger-dir" in line


def test_observed_lines_put_over_users_first() -> None:
    rows = [
        {"test_id": "t::ok", "declared_bytes": 2 * GiB, "observed_bytes": GiB, "source": "nvml", "verdict": "ok",
         "factor": 0.5, "suggested_bytes": 1536 * MiB},
        {"test_id": "t::liar", "declared_bytes": GiB, "observed_bytes": 3 * GiB, "source": "torch",
         "verdict": "over", "factor": 3.0, "suggested_bytes": 4 * GiB},
    ]  # fmt: skip
    lines = report.observed_lines(rows)
    assert lines == [
        "tests that used more than they declared (suggested mem= in brackets):",
        '  3.0x t::liar: declared 1.0GiB, peak 3.0GiB (torch) [mem="4.0GiB"]',
    ]
