"""Ledger and holdings files as bytes: the frame's header line, and a ledger written and read back."""

from __future__ import annotations

import pytest

from pytest_gpushare.ledger.codec import (
    WAITING_HEAD_BYTES,
    BadFrame,
    dump_gpu_state,
    frame,
    parse_gpu_state,
    session_tag,
    unframe,
    waiting_in_head,
)
from pytest_gpushare.ledger.records import CONTEXT, TEST, Booking, GpuState, Owner, Waiter


def test_frames_carry_length_checksum_and_generation() -> None:
    data = frame("LEDGER", b'{"a":1}', 41)
    assert data.startswith(b"GPUSHARE-LEDGER 7 ") and data.endswith(b' 41\n{"a":1}')
    assert unframe("LEDGER", data) == (b'{"a":1}', 41)
    assert unframe("LEDGER", data + b"old tail") == (b'{"a":1}', 41)
    assert unframe("HOLDINGS", frame("HOLDINGS", b"x")) == (b"x", None)
    with pytest.raises(BadFrame, match="no ledger header"):
        unframe("LEDGER", b'{"a":1}')
    with pytest.raises(BadFrame, match="no ledger header"):
        unframe("LEDGER", frame("HOLDINGS", b"x"))
    with pytest.raises(BadFrame, match="cut short"):
        unframe("LEDGER", data[:-1])
    with pytest.raises(BadFrame, match="does not match its checksum"):
        unframe("LEDGER", data[:-2] + b"2}")


def test_a_ledger_reads_back_as_it_was_written() -> None:
    owner = Owner("1-aaaaaaaaaaaaaaaa", 1, "h", "boot:1", "s", "gw0", "python x.py", 10, 2.5)
    state = GpuState("GPU-0", "Sim 0", 16, owners={owner.key: owner}, generation=6)
    state.bookings += [
        Booking("1-aaaaaaaaaaaaaaaa-ctx", owner.key, "CUDA context", 1, CONTEXT, 3.0),
        Booking("1-aaaaaaaaaaaaaaaa-1", owner.key, "t::a", 4, TEST, 3.0),
    ]
    state.waiters.append(Waiter("w1", owner.key, "t::b", 8, 0, 2, True, 4.0))
    state.remember(5.0, "repaired", "a line")
    assert parse_gpu_state(dump_gpu_state(state), "GPU-0") == state


def test_a_ledgers_head_names_at_most_two_waiting_sessions_within_its_first_bytes() -> None:
    owners = [
        Owner(f"{n}-aaaaaaaaaaaaaaaa", n, "h", "boot:1", f"session-{n % 3}", "gw0", None, 10, 2.5)
        for n in range(6)
    ]
    state = GpuState("GPU-0", "Sim 0", 16, owners={o.key: o for o in owners}, generation=2**62)
    assert waiting_in_head(dump_gpu_state(state)[:WAITING_HEAD_BYTES]) == []
    state.waiters += [Waiter(f"w{n}", owners[n].key, "t::b", 8, 0, 1, False, 4.0) for n in (1, 4, 2, 0)]
    data = dump_gpu_state(state)
    assert waiting_in_head(data[:WAITING_HEAD_BYTES]) == [session_tag("session-1"), session_tag("session-2")]
    assert parse_gpu_state(data, "GPU-0") == state  # the head is made from the waiters, not read back
    assert waiting_in_head(frame("LEDGER", b'{"version":1,"uuid":"GPU-0"}', 3)) is None  # an older writer's
