"""The pure rules of admission: fairness towards aged waiters, placement, and needs that can never fit."""

from __future__ import annotations

from typing import Any

from ledger_support import gpu, need

from pytest_gpushare.ledger.admission import Fit, evaluate, never_fits, place
from pytest_gpushare.ledger.records import TEST, Booking, GpuState, Owner, Waiter
from pytest_gpushare.units import GiB


def fit_on(state: GpuState, size: float, since: float, ticket: str, now: float, **kw: Any) -> Fit:
    return evaluate(
        state,
        gpu(),
        need(size, **kw),
        owner="1-aaaaaaaaaaaaaaaa",
        context_bytes=0,
        ticket=ticket,
        since=since,
        now=now,
        fair_after=2.0,
    )


def fairness_state(waiter_size: float, exclusive: bool = False) -> GpuState:
    owner = Owner("1-aaaaaaaaaaaaaaaa", 1, "h", "t", "s", "w", None, 10 * GiB, 0.0)
    state = GpuState("GPU-0", owners={owner.key: owner})
    state.bookings.append(Booking("x", owner.key, "busy", 5 * GiB, TEST, 0.0))
    state.waiters.append(
        Waiter("old", owner.key, "big", int(waiter_size * GiB), 0, 1, exclusive, since=100.0)
    )
    return state


def test_before_aging_younger_requests_pass_a_waiter() -> None:
    state = fairness_state(waiter_size=8)
    assert fit_on(state, 2, since=101.0, ticket="young", now=101.5).ok


def test_an_aged_waiter_keeps_what_it_needs_from_younger_requests() -> None:
    state = fairness_state(waiter_size=4)
    # 5GiB free; the old waiter needs 4: a 2GiB request would leave 3, a 1GiB one leaves 4.
    blocked = fit_on(state, 2, since=103.0, ticket="young", now=103.0)
    assert not blocked.ok and "kept for big" in blocked.why
    assert fit_on(state, 1, since=103.0, ticket="young", now=103.0).ok
    # Requests older than the waiter are not held back by it.
    assert fit_on(state, 2, since=99.0, ticket="older", now=103.0).ok


def test_an_aged_exclusive_waiter_blocks_every_younger_lease() -> None:
    state = fairness_state(waiter_size=1, exclusive=True)
    assert not fit_on(state, 0.001, since=103.0, ticket="young", now=103.0).ok


def test_place_and_never_fits_are_pure() -> None:
    fits = {"a": Fit(True, 1, 0, 5), "b": Fit(True, 1, 0, 9), "c": Fit(False, 1, 0, 0)}
    index = {"a": 0, "b": 1, "c": 2}
    assert place(need(1), fits, ["a", "b", "c"], "spread", index) == ["b"]
    assert place(need(1), fits, ["a", "b", "c"], "pack", index) == ["a"]
    assert place(need(1, count=3), fits, ["a", "b", "c"], "pack", index) is None
    assert never_fits(need(1), [gpu()], 0, "t") is None
    assert never_fits(need(1), [], 0, "t") == "t needs 1 GPUs, but no GPU can serve it"
