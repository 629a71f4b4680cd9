"""Ledger and holdings files as bytes: the frame's header line, and a ledger written and read back."""

from __future__ import annotations

import pytest

from pytest_gpushare.ledger.codec import BadFrame, dump_gpu_state, frame, parse_gpu_state, unframe
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
