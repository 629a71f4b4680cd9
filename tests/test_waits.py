"""waits.py: each worker's wait for memory, and the part of it with room for another pending test."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from pytest_gpushare.waits import Wait, WorkerWaits, find_waits, natural_key, per_worker

A, B = "GPU-a", "GPU-b"


def rec(
    test_id: str,
    worker: str,
    parts: list[tuple[str, int]],
    taken: float,
    released: float | None,
    waited: float = 0.0,
) -> dict[str, Any]:
    """A lease record as runtime.LeaseRecord.to_dict writes it (sizes in GiB-free units here)."""
    return {
        "test_id": test_id,
        "worker": worker,
        "gpus": [{"uuid": u, "index": 0 if u == A else 1, "bytes": n} for u, n in parts],
        "waited_s": waited,
        "taken_at": taken,
        "released_at": released,
        "held_s": None if released is None else released - taken,
    }


def figures(
    leases: list[dict[str, Any]], usable: dict[str, int], context: int = 0, finished: float = 100.0
) -> dict[str, tuple[float, float]]:
    found = find_waits(leases, usable, context_bytes=context, finished=finished)
    return {w.worker: (w.waited_s, w.waited_with_room_s) for w in per_worker(leases, found)}


def test_overlapping_leases_on_two_gpus_hand_computed() -> None:
    leases = [
        rec("a", "gw0", [(A, 6)], 0, 10),
        rec("b", "gw1", [(A, 3)], 2, 6),
        rec("c", "gw2", [(B, 5)], 0, 7),
        rec("h", "gw3", [(A, 1), (B, 1)], 0, 5),  # one lease on both GPUs
        # d waits on A over [4, 10): free 10-6-3-1=0 then 10-6-3=1 until 6 (no pending need fits:
        # e, f and g need 4), then 10-6=4 from 6 on, which e, f or g would fill: 4s of room.
        rec("d", "gw1", [(A, 5)], 10, 12, waited=6),
        # e waits on B over [5, 8): free 8-5=3 until 7 (others need 4 or 5), 8 from 7: 1s of room.
        rec("e", "gw2", [(B, 4)], 8, 9, waited=3),
        rec("f", "gw3", [(A, 4)], 12, 13),
        rec("g", "gw0", [(B, 4)], 9, 11),
    ]
    assert figures(leases, {A: 10, B: 8}) == {
        "gw0": (0.0, 0.0),
        "gw1": (6.0, 4.0),
        "gw2": (3.0, 1.0),
        "gw3": (0.0, 0.0),
    }
    waits = find_waits(leases, {A: 10, B: 8}, context_bytes=0, finished=100)
    assert waits == [Wait("gw1", "d", 4, 10, ((6, 10),)), Wait("gw2", "e", 5, 8, ((7, 8),))]


def test_no_waits() -> None:
    leases = [rec("a", "gw0", [(A, 6)], 0, 10), rec("b", "gw1", [(A, 3)], 2, 6)]
    assert find_waits(leases, {A: 10}, context_bytes=0, finished=20) == []
    assert per_worker(leases, []) == [WorkerWaits("gw0", 0.0, 0.0), WorkerWaits("gw1", 0.0, 0.0)]
    assert per_worker([], []) == []


@pytest.mark.parametrize("need", [5, 2])
def test_a_wait_with_no_pending_test_left_has_no_room(need: int) -> None:
    # Free memory (4) is below b's need of 5, or above its need of 2 (memory another session held,
    # which the records cannot see): either way no *other* test was left to use it.
    leases = [rec("a", "gw0", [(A, 6)], 0, 5), rec("b", "gw1", [(A, need)], 5, 6, waited=4)]
    assert figures(leases, {A: 10}) == {"gw0": (0.0, 0.0), "gw1": (4.0, 0.0)}


@pytest.mark.parametrize(("pending_need", "room"), [(5, 0.0), (4, 4.0)])
def test_room_means_the_smallest_pending_need_fits(pending_need: int, room: float) -> None:
    leases = [
        rec("a", "gw0", [(A, 6)], 0, 5),
        rec("b", "gw1", [(A, 5)], 5, 6, waited=4),  # free 4 over [1, 5)
        rec("c", "gw0", [(A, pending_need)], 5, 6),  # pending all along
    ]
    assert figures(leases, {A: 10})["gw1"] == (4.0, room)


def test_a_pending_test_of_the_waiters_own_need_counts() -> None:
    # The waiter's own need is the smallest, and another pending test needs as much.
    leases = [
        rec("a", "gw0", [(A, 6)], 0, 5),
        rec("b", "gw1", [(A, 2)], 5, 6, waited=4),
        rec("c", "gw0", [(A, 2)], 5, 6),
    ]
    assert figures(leases, {A: 10})["gw1"] == (4.0, 4.0)


def test_room_ends_when_the_last_test_that_fits_has_started() -> None:
    leases = [
        rec("a", "gw0", [(A, 7)], 0, 10),
        rec("b", "gw1", [(A, 5)], 10, 11, waited=10),  # free 3 over [0, 10)
        rec("c", "gw2", [(A, 1)], 4, 5),  # fits, pending until 4 (then it holds 1: free 2)
        rec("d", "gw2", [(A, 3)], 6, 7),  # fits the 3 free from 5 until it starts at 6
        rec("e", "gw0", [(A, 6)], 20, 21),  # never fits while a holds 7
    ]
    waits = find_waits(leases, {A: 10}, context_bytes=0, finished=30)
    assert [w.room for w in waits] == [((0, 4), (5, 6))]


def test_cuda_contexts_count_from_a_processs_first_lease_on_the_gpu() -> None:
    leases = [
        rec("a", "gw0", [(A, 6)], 0, 10),
        rec("b", "gw1", [(A, 5)], 10, 11, waited=8),  # over [2, 10): 10 - 6 - gw0's context
        rec("c", "gw2", [(A, 3)], 11, 12),
    ]
    assert figures(leases, {A: 10}, context=1)["gw1"] == (8.0, 8.0)  # 3 free: c fits
    assert figures(leases, {A: 10}, context=2)["gw1"] == (8.0, 0.0)  # 2 free: c does not


def test_a_lease_never_given_back_holds_until_the_run_finished() -> None:
    leases = [
        rec("a", "gw0", [(A, 6)], 0, None),
        rec("b", "gw1", [(A, 6)], 15, 16, waited=10),  # free 4 over [5, 15) while a lives
        rec("c", "gw2", [(A, 4)], 20, 21),
    ]
    assert figures(leases, {A: 10}, finished=30)["gw1"] == (10.0, 10.0)
    assert figures(leases, {A: 10}, finished=10)["gw1"] == (10.0, 10.0)  # a ended at 10: all free
    bigger = [*leases[:2], rec("c", "gw2", [(A, 5)], 20, 21)]
    assert figures(bigger, {A: 10}, finished=12)["gw1"] == (10.0, 3.0)  # 10 free from 12 to 15


def test_a_multi_gpu_wait_has_room_where_any_of_its_gpus_had_some() -> None:
    leases = [
        rec("a", "gw0", [(A, 8)], 0, 2),
        rec("c", "gw2", [(A, 9)], 2, 10),
        rec("d", "gw3", [(B, 9)], 0, 1),
        rec("b", "gw0", [(B, 9)], 4, 10),
        rec("w", "gw1", [(A, 5), (B, 5)], 10, 12, waited=10),
        rec("p", "gw3", [(A, 2)], 30, 31),
    ]
    # p needs 2: A has 2 free over [0, 2) and 1 after; B has all 10 free over [1, 4), 1 otherwise.
    waits = find_waits(leases, {A: 10, B: 10}, context_bytes=0, finished=40)
    assert [w.room for w in waits] == [((0, 4),)]


def test_a_gpu_the_plan_does_not_know_never_has_room() -> None:
    leases = [
        rec("b", "gw1", [("GPU-remote", 5)], 5, 6, waited=4),
        rec("c", "gw0", [("GPU-remote", 1)], 9, 10),
    ]
    assert figures(leases, {A: 10})["gw1"] == (4.0, 0.0)


def test_workers_in_natural_order_and_figures_rounded_for_json() -> None:
    leases = [rec("x", f"gw{i}", [(A, 1)], i, i + 1, waited=1 / 3) for i in (10, 2, 1)]
    got = per_worker(leases, find_waits(leases, {A: 10}, context_bytes=0, finished=20))
    assert [w.worker for w in got] == ["gw1", "gw2", "gw10"]
    assert got[0].to_dict() == {"worker": "gw1", "waited_s": 0.3333, "waited_with_room_s": 0.3333}
    assert sorted(["gw10", "main", "gw9"], key=natural_key) == ["gw9", "gw10", "main"]


# --- against the definition, moment by moment ---------------------------------------------------


def brute_force_room(
    leases: list[dict[str, Any]], usable: dict[str, int], context: int, finished: float
) -> dict[str, float]:
    """The definition applied at the midpoint of every stretch between two events."""

    def end(x: dict[str, Any]) -> float:
        return finished if x["released_at"] is None else x["released_at"]

    firsts: dict[tuple[str, str], float] = {}
    for x in leases:
        for p in x["gpus"]:
            key = (x["worker"], p["uuid"])
            firsts[key] = min(firsts.get(key, float("inf")), x["taken_at"])
    edges = sorted(
        {x["taken_at"] for x in leases}
        | {end(x) for x in leases}
        | {x["taken_at"] - x["waited_s"] for x in leases}
    )
    room: dict[str, float] = {}
    for x in leases:
        start, stop = x["taken_at"] - x["waited_s"], x["taken_at"]
        for a, b in itertools.pairwise([e for e in edges if start <= e <= stop]):
            t = (a + b) / 2
            others = [max(p["bytes"] for p in y["gpus"]) for y in leases if y is not x and y["taken_at"] > t]
            if not others:
                continue
            for p in x["gpus"]:
                g = p["uuid"]
                if g not in usable:
                    continue
                held = sum(
                    q["bytes"]
                    for y in leases
                    for q in y["gpus"]
                    if q["uuid"] == g and y["taken_at"] <= t < end(y)
                )
                held += context * sum(1 for (_, u), at in firsts.items() if u == g and at <= t)
                if usable[g] - held >= min(others):
                    room[x["worker"]] = room.get(x["worker"], 0.0) + (b - a)
                    break
    return room


def random_run(seed: int, n: int, workers: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    clocks = dict.fromkeys(range(workers), 0.0)
    leases = []
    for i in range(n):
        w = rng.randrange(workers)
        waited = rng.choice([0.0, 0.0, rng.randint(1, 6) * 0.5])
        taken = clocks[w] + waited
        held = rng.randint(1, 8) * 0.5
        gpus = rng.choice([[A], [B], [A, B]] if i % 7 == 0 else [[A], [B]])
        need = rng.randint(1, 6)
        released = None if rng.random() < 0.05 else taken + held
        leases.append(rec(f"t{i}", f"gw{w}", [(g, need) for g in gpus], taken, released, waited))
        clocks[w] = taken + held
    return leases


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("context", [0, 1])
def test_agrees_with_the_definition_on_random_runs(seed: int, context: int) -> None:
    leases = random_run(seed, 40)
    finished = max(x["taken_at"] + 4 for x in leases)
    usable = {A: 10, B: 8}
    got = figures(leases, usable, context, finished)
    want = brute_force_room(leases, usable, context, finished)
    assert {w: r for w, (_, r) in got.items() if r} == pytest.approx({w: r for w, r in want.items() if r})


def test_thousands_of_records_stay_fast_and_consistent() -> None:
    # A quadratic algorithm takes minutes here; this one well under a second.
    leases = random_run(99, 20_000, workers=16)
    finished = max(x["taken_at"] + 4 for x in leases)
    waits = find_waits(leases, {A: 24, B: 24}, context_bytes=1, finished=finished)
    for w in waits:
        assert all(w.start <= a < b <= w.end for a, b in w.room)
    for totals in per_worker(leases, waits):
        assert 0 <= totals.waited_with_room_s <= totals.waited_s + 1e-6
