"""The planner: SPEC's formula, every cap, per-GPU reservations, home GPUs. Pure: plain asserts."""

from __future__ import annotations

import pytest

from pytest_gpushare.gpus import Gpu, GpuInventory, GpuProcess, SimulatedProbe
from pytest_gpushare.planner import (
    Budget,
    Plan,
    Reservation,
    assign_homes,
    credit_for,
    make_plan,
    ollama_reservations,
    reservations_from_sizes,
)
from pytest_gpushare.units import GiB, MiB, PerGpuSizes, format_size, parse_per_gpu_sizes


def budget(**kw: object) -> Budget:
    values: dict[str, object] = {
        "safety_bytes": GiB,
        "worker_mem_bytes": 3 * GiB,
        "context_bytes": 512 * MiB,
        "workers_per_gb": None,
        "max_workers": None,
    }
    values.update(kw)
    return Budget(**values)  # type: ignore[arg-type]


def sim(spec: str) -> GpuInventory:
    return SimulatedProbe(spec).probe()


def ollama(spec: str, inv: GpuInventory, held: dict[int, int] | None = None) -> list[Reservation]:
    """The Ollama hold as the plugin's reservation hook builds it."""
    sizes = parse_per_gpu_sizes(spec, "test")
    out = []
    for g in inv.gpus:
        want = sizes.for_index(g.index)
        if want:
            hold = max(0, want - (held or {}).get(g.index, 0))
            out.append(Reservation(g.index, hold, "Ollama hold", "ollama", want))
    return out


def test_spec_example_gives_9gib_and_2_workers() -> None:
    inv = sim("24GiB:used=2GiB")
    plan = make_plan(inv, budget(workers_per_gb=0.25), reservations=ollama("12GiB", inv))
    assert plan.gpus[0].usable_bytes == 9 * GiB
    assert format_size(plan.gpus[0].usable_bytes) == "9.0GiB"
    count = plan.worker_count(xdist_count=16)
    assert count.workers == 2
    assert count.bound_by == "workers-per-gb"
    assert "floor(9.0GiB / 3.0GiB) = 3" in count.derivation
    assert "floor(9.0 × 0.25) = 2" in count.derivation


def test_ollama_already_holding_is_not_counted_twice() -> None:
    # The same box with Ollama loaded (10.8GiB, inside `used`): hold back only the rest.
    held = int(10.8 * GiB)
    inv = sim(f"24GiB:used={2 * GiB + held}B")
    plan = make_plan(inv, budget(workers_per_gb=0.25), reservations=ollama("12GiB", inv, {0: held}))
    g = plan.gpus[0]
    assert g.reservations[0].bytes == 12 * GiB - held
    assert g.usable_bytes == 9 * GiB
    assert g.capacity_bytes == 24 * GiB - 12 * GiB - GiB


@pytest.mark.parametrize(
    ("spec", "kw", "reserve", "xdist", "expected", "bound"),
    [
        # Σ floor(usable/worker mem) over GPUs: 2×80GiB, 12GiB reserve each, safety 1 -> 67 each
        ("2x80GiB", {}, "12GiB", 64, 44, "worker mem"),
        ("2x80GiB", {"workers_per_gb": 0.25}, "12GiB", 64, 33, "workers-per-gb"),
        ("2x80GiB", {"max_workers": 5}, "12GiB", 64, 5, "max-workers"),
        ("2x80GiB", {}, "12GiB", 4, 4, "xdist's own count"),
        # per-GPU reservation: GPU 0 keeps 70GiB for a service, GPU 1 nothing
        ("2x80GiB", {}, "0:70GiB", 64, 3 + 26, "worker mem"),
        # usable below one worker's budget: the formula says 0, at least 1 worker
        ("4GiB:used=1GiB", {}, "0", 8, 1, "at least 1"),
        # mixed GPUs, each floored on its own (never the sum)
        ("24GiB,16GiB", {"worker_mem_bytes": 5 * GiB}, "0", 64, 4 + 3, "worker mem"),
    ],
)
def test_worker_count_table(
    spec: str, kw: dict[str, object], reserve: str, xdist: int, expected: int, bound: str
) -> None:
    inv = sim(spec)
    res = reservations_from_sizes(parse_per_gpu_sizes(reserve, "t"), inv.gpus, "reserve")
    plan = make_plan(inv, budget(**kw), reservations=res)
    count = plan.worker_count(xdist)
    assert (count.workers, count.bound_by) == (expected, bound)


def test_zero_usable_memory_defers_to_xdist() -> None:
    inv = sim("8GiB:used=7.5GiB")
    plan = make_plan(inv, budget())
    assert plan.gpus[0].usable_bytes == 0
    assert not plan.has_usable_gpu
    count = plan.worker_count(6)
    assert count.workers == 6
    assert "no GPU has usable memory" in count.derivation


def test_no_gpu_defers_to_xdist_and_says_why() -> None:
    plan = make_plan(GpuInventory((), "NVML", error="Driver/library version mismatch"), budget())
    count = plan.worker_count(3)
    assert count.workers == 3
    assert "NVML failed" in count.derivation
    assert plan.worker_count(None).workers == 1


def test_reservations_sum_per_gpu_and_capacity_uses_full_size() -> None:
    inv = sim("2x24GiB")
    res = [
        Reservation(0, 2 * GiB, "reserve"),
        Reservation(0, GiB, "vLLM", kind="vllm"),
        Reservation(1, 0, "Ollama hold", "ollama", full_bytes=8 * GiB),
    ]
    plan = make_plan(inv, budget(), reservations=res)
    g0, g1 = plan.gpus
    assert g0.reserve_bytes == 3 * GiB and g0.usable_bytes == 20 * GiB
    assert g1.usable_bytes == 23 * GiB  # Ollama holds its 8GiB already: nothing more held back
    assert g1.capacity_bytes == 15 * GiB  # but a test can never have Ollama's part


def test_reservations_from_sizes_index_override_wins() -> None:
    inv = sim("3x24GiB")
    res = reservations_from_sizes(parse_per_gpu_sizes("2GiB,1:5GiB,2:0", "t"), inv.gpus, "reserve")
    assert [(r.gpu_index, r.bytes) for r in res] == [(0, 2 * GiB), (1, 5 * GiB)]


def _gpu(procs: tuple[GpuProcess, ...] | None, free: int = 10 * GiB) -> Gpu:
    return Gpu(0, "GPU-x", "X", 24 * GiB, free, 24 * GiB - free, procs)


def test_credit_is_capped_at_what_each_holder_booked() -> None:
    gpu = _gpu((GpuProcess(10, 3 * GiB), GpuProcess(11, 9 * GiB), GpuProcess(12, GiB)))
    # pid 10 uses less than it booked (credit 3), pid 11 more (credit its 4), pid 12 is a stranger
    assert credit_for(gpu, {10: 4 * GiB, 11: 4 * GiB}) == 7 * GiB
    assert credit_for(_gpu(None), {10: 4 * GiB}) == 0  # untrusted figures: nothing credited


def test_credit_enters_free_but_never_above_total() -> None:
    gpu = _gpu((GpuProcess(10, 6 * GiB),), free=2 * GiB)
    inv = GpuInventory((gpu,), "NVML")
    plan = make_plan(inv, budget(), credits={"GPU-x": 6 * GiB})
    assert plan.gpus[0].free_bytes == 8 * GiB
    assert plan.gpus[0].usable_bytes == 7 * GiB
    huge = make_plan(inv, budget(), credits={"GPU-x": 100 * GiB})
    assert huge.gpus[0].free_bytes == 24 * GiB


def test_untrusted_process_figures_are_flagged() -> None:
    inv = GpuInventory((_gpu(None),), "NVML")
    assert not make_plan(inv, budget()).per_process_trusted
    assert make_plan(sim("24GiB"), budget()).per_process_trusted


def test_what_the_probe_corrected_is_noted_once_before_other_notes() -> None:
    inv = GpuInventory((_gpu(()),), "NVML", notes=("GPU 0 (GPU-x): NVML reported free ...",))
    plan = make_plan(inv, budget(), notes=["n"])
    assert plan.notes == ("GPU 0 (GPU-x): NVML reported free ...", "n")
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_round_trips_through_workerinput_dict() -> None:
    inv = sim("24GiB:used=2GiB,16GiB:name=RTX 4080")
    plan = make_plan(inv, budget(workers_per_gb=0.5), reservations=ollama("0:12GiB", inv), notes=["n"])
    again = Plan.from_dict(plan.to_dict())
    assert again == plan


@pytest.mark.parametrize(
    ("spec", "workers", "expected"),
    [
        ("2x80GiB", 4, {0: 2, 1: 2}),
        ("80GiB,24GiB", 4, {0: 3, 1: 1}),
        ("80GiB,24GiB", 1, {0: 1}),
        ("3x24GiB", 2, {0: 1, 1: 1}),
    ],
)
def test_homes_in_proportion_to_usable(spec: str, workers: int, expected: dict[int, int]) -> None:
    plan = make_plan(sim(spec), budget())
    homes = assign_homes(plan, workers)
    counts: dict[int, int] = {}
    for uuid in homes:
        idx = plan.by_uuid(uuid).gpu.index
        counts[idx] = counts.get(idx, 0) + 1
    assert counts == expected
    assert homes[0] == plan.gpus[0].gpu.uuid  # gw0 on the GPU with most usable memory


def test_homes_when_nothing_is_usable_follow_total() -> None:
    plan = make_plan(sim("8GiB:used=8GiB,16GiB:used=16GiB"), budget())
    homes = assign_homes(plan, 3)
    assert len(homes) == 3 and homes[0] == plan.gpus[1].gpu.uuid


def test_ollama_reservations_hold_what_ollama_does_not_hold_yet() -> None:
    gpus = tuple(
        Gpu(index=i, uuid=f"GPU-{i}", name="x", total_bytes=24 * GiB, free_bytes=20 * GiB, used_bytes=4 * GiB)
        for i in range(3)
    )
    sizes = PerGpuSizes(default=12 * GiB, per_index={2: 0})
    out = ollama_reservations(sizes, {0: 4 * GiB, 1: 20 * GiB}, gpus)
    assert [(r.gpu_index, r.bytes, r.ceiling_bytes, r.kind) for r in out] == [
        (0, 8 * GiB, 12 * GiB, "ollama"),
        (1, 0, 12 * GiB, "ollama"),
    ]
