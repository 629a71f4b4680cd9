"""What the ledgers show: the waiting lines and who holds the memory a request waits for."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import ledger_support
import pytest
from conftest import wait_until
from ledger_support import need, state_of

from pytest_gpushare.ledger import holders_text, waiting_lines
from pytest_gpushare.ledger.handle import Ledger
from pytest_gpushare.ledger.records import CONTEXT, TEST
from pytest_gpushare.ledger.views import held_by
from pytest_gpushare.units import GiB

folder = pytest.fixture(ledger_support.folder)
make = pytest.fixture(ledger_support.make)


def test_waiters_are_visible_while_they_wait(make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    lease = holder.acquire(need(8), "holder::test", 1)
    waiter = make(session="s1", worker="gw0")
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(waiter.acquire(need(4), "waiter::test", 10)))
    thread.start()
    wait_until(lambda: holder.snapshot()["gpus"][0]["waiters"], "the waiter in the snapshot", timeout=5)
    snap = holder.snapshot()
    json.dumps(snap)
    (w,) = snap["gpus"][0]["waiters"]
    assert (w["test_id"], w["bytes"], w["owner"]["worker_id"]) == ("waiter::test", 4 * GiB, "gw0")
    lines = waiting_lines(snap, session_id="s1", min_wait_s=0)
    assert lines == [
        f"gpushare: waiter::test (gw0) has waited {w['waited_s']:.0f}s for 4.0GiB; "
        "held by holder::test (8.0GiB, session s1)"
    ]
    assert waiting_lines(snap, session_id="other", min_wait_s=0) == []
    holder.release(lease)
    thread.join(10)
    assert outcome and state_of(holder.folder).waiters == []


def lease_entry(test_id: str, size: int, kind: str = TEST, **owner: Any) -> dict[str, Any]:
    """A lease as a status document lists it (only what the lines read)."""
    return {"test_id": test_id, "bytes": size, "kind": kind, "owner": owner}


def test_the_held_by_tail_names_the_test_leases_of_others() -> None:
    gpus = [
        {"leases": [lease_entry("a::t", 2 * GiB, key="k1", session_id="s1", command=None)]},
        {
            "leases": [
                lease_entry("CUDA context", GiB, CONTEXT, key="k2", session_id="s2", command="serve"),
                lease_entry("gpushare run", 4 * GiB, key="k2", session_id="s2", command="serve"),
                lease_entry("mine", GiB, key="me", session_id="s3", command=None),
            ]
        },
    ]
    assert holders_text(gpus) == (
        "; held by a::t (2.0GiB, session s1), gpushare run (4.0GiB, session s2), mine (1.0GiB, session s3)"
    )
    # As ``gpushare run`` says it: the command a lease is held for, and not its own lease.
    assert holders_text(gpus, exclude_owner="me", by_command=True) == (
        "; held by a::t (2.0GiB, session s1), serve (4.0GiB, session s2)"
    )
    assert holders_text([{"leases": []}]) == ""


def test_a_timeout_names_each_holder_in_full() -> None:
    assert held_by(["a (1.0GiB on GPU 0, session s)", "b"], long=True) == (
        "; held by: a (1.0GiB on GPU 0, session s); b"
    )
    assert held_by([], long=True) == ""
