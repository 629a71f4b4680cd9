"""One locked pass over the ledgers: a damaged or deleted ledger is set aside and rebuilt from the
live owners' holdings, and ``read_status`` reclaims, repairs and reports every ledger."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ledger_support
import pytest
from conftest import wait_until
from ledger_support import Worker, gpu, hold_cfg, leases_in, need, state_of
from test_ledger_folder import JUNK

from pytest_gpushare.errors import LeaseTimeout
from pytest_gpushare.ledger import read_status, trust_lines
from pytest_gpushare.ledger.access import ledger_name
from pytest_gpushare.ledger.codec import BOOKING_FIELDS, LEDGER_FRAME, dump_gpu_state, frame, unframe
from pytest_gpushare.ledger.files import KEEP_DAMAGED, MAX_FILE_BYTES
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.handle import Ledger
from pytest_gpushare.ledger.liveness import live_name
from pytest_gpushare.ledger.probe import read_holdings
from pytest_gpushare.ledger.records import TEST, GpuState
from pytest_gpushare.units import GiB

folder = pytest.fixture(ledger_support.folder)
make = pytest.fixture(ledger_support.make)
spawn = pytest.fixture(ledger_support.spawn)


def test_odd_uuids_get_safe_distinct_file_names() -> None:
    names = {ledger_name("MIG-GPU-abc/1/0"), ledger_name("MIG-GPU-abc/1/1"), ledger_name("GPU-abc")}
    assert len(names) == 3
    assert all("/" not in n and n.startswith("gpu-") and n.endswith(".json") for n in names)


def valid_ledger(folder: Path) -> bytes:
    """The JSON document of GPU-0's ledger, without its header line."""
    return unframe(LEDGER_FRAME, (folder / ledger_name("GPU-0")).read_bytes())[0]


def framed(payload: bytes) -> bytes:
    return frame(LEDGER_FRAME, payload, 7)


def mutate(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The document changed, framed again (a well-formed file whose content is wrong)."""
    parsed = json.loads(data)
    change(parsed)
    return framed(json.dumps(parsed).encode())


def first_booking(field: str, value: Any) -> Callable[[bytes], bytes]:
    """The first booking's ``field`` set to ``value`` (bookings are rows of BOOKING_FIELDS)."""

    def change(d: dict[str, Any]) -> None:
        d["bookings"][0][BOOKING_FIELDS.index(field)] = value

    return lambda data: mutate(data, change)


def torn(data: bytes) -> bytes:
    """A write cut short over an older copy: the new header, the start of the new document, then the
    end of the old one."""
    old, new = framed(data), framed(data.replace(b'"kept::test"', b'"kept::test, renamed"'))
    return new[: len(new) // 2] + old[len(new) // 2 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda data: b"\x00\xffthis is not json",
    "empty": lambda data: b"",
    "truncated": lambda data: framed(data)[: len(data) // 2],
    "torn write": torn,
    "no header": lambda data: data,
    "not json": lambda data: framed(b"\x00\xffthis is not json"),
    "not an object": lambda data: framed(b"[1, 2, 3]"),
    "bytes as text": first_booking("bytes", "6GiB"),
    "negative bytes": first_booking("bytes", -1),
    "bool bytes": first_booking("bytes", True),
    "absurd bytes": first_booking("bytes", 10**30),
    "nan time": first_booking("taken_at", float("nan")),
    "short row": lambda data: mutate(data, lambda d: d["bookings"][0].pop()),
    "booking as object": lambda data: mutate(data, lambda d: d["bookings"].append({"bytes": 1})),
    "owners as object": lambda data: mutate(data, lambda d: d.update(owners={})),
    "owner twice": lambda data: mutate(data, lambda d: d["owners"].append(d["owners"][0])),
    "missing waiters": lambda data: mutate(data, lambda d: d.pop("waiters")),
    "unknown kind": first_booking("kind", "gift"),
    "dangling owner": lambda data: mutate(data, lambda d: d["owners"].clear()),
    "path in a key": first_booking("owner", "../../etc"),
    "other gpu": lambda data: mutate(data, lambda d: d.update(uuid="GPU-9")),
    "future version": lambda data: mutate(data, lambda d: d.update(version=99)),
    "huge": lambda data: framed(data) + b" " * MAX_FILE_BYTES,
    "deep nesting": lambda data: framed(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_ledger_is_set_aside_and_rebuilt_from_live_owners(
    folder: Path, make: Callable[..., Ledger], damage: str
) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    path = folder / ledger_name("GPU-0")
    path.write_bytes(DAMAGE[damage](valid_ledger(folder)))
    lines: list[str] = []
    ledger = make(log=lines.append)
    # The live holder's 6GiB survived the damage: 5GiB more would overcommit.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.1)
    assert ledger.acquire(need(4), "t", 1)
    assert sorted(b.test_id for b in leases_in(folder)) == ["kept::test", "t"]
    (repaired,) = [line for line in lines if "unreadable" in line]
    assert repaired.startswith("gpushare: the ledger of GPU 0 (Sim 0, GPU-0) was unreadable (")
    assert "rebuilt it from the 2 live owner(s) that use it" in repaired
    aside = [n for n in os.listdir(folder) if n.startswith(ledger_name("GPU-0") + ".damaged-")]
    assert len(aside) == 1 and aside[0] in repaired


def test_a_deleted_ledger_is_rebuilt_from_live_owners(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    (folder / ledger_name("GPU-0")).unlink()
    lines: list[str] = []
    ledger = make(log=lines.append)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.1)
    assert [b.test_id for b in leases_in(folder)] == ["kept::test"]
    assert lines == [
        "gpushare: the ledger of GPU 0 (Sim 0, GPU-0) was missing; "
        "rebuilt it from the 2 live owner(s) that use it"
    ]


def test_unreadable_holdings_of_a_live_owner_block_the_gpu_until_it_speaks(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    lines: list[str] = []
    holder = make(worker="gw1", log=lines.append)
    holder.acquire(need(6), "kept::test", 1)
    with open(folder / live_name(holder.owner.key), "r+b") as f:
        f.write(b"garbage")
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    ledger = make()
    # Unknown holdings: never guess low, so nothing fits until the holder shows what it holds.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t", 0.1)
    holder.snapshot()
    assert any("lacked 1 booking(s)" in line for line in lines)
    holdings = read_holdings(open_ledger_folder(folder), holder.owner.key)
    assert holdings is not None and json.loads(holdings)["bookings"]["GPU-0"][0][2] == "kept::test"
    assert ledger.acquire(need(4), "t", 1)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t2", 0.1)


def test_holdings_readable_again_replace_the_placeholder(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    live = folder / live_name(holder.owner.key)
    good = live.read_bytes()
    with open(live, "r+b") as f:
        f.write(b"garbage")
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    ledger = make()
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t", 0.1)  # the placeholder holds the GPU
    with open(live, "r+b") as f:  # the holdings are whole again (the owner rewrote them, say)
        f.write(good)
    assert ledger.acquire(need(4), "t", 1)
    assert sorted(b.test_id for b in leases_in(folder)) == ["kept::test", "t"]


def test_only_a_few_damaged_copies_are_kept(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    for _ in range(KEEP_DAMAGED + 3):
        (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
        ledger.snapshot()
    aside = [n for n in os.listdir(folder) if ".damaged-" in n]
    assert len(aside) == KEEP_DAMAGED


def test_status_reclaims_and_reports_in_json(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    live = make(session="live", worker="gw0")
    live.acquire(need(2), "tests/test_live.py::test_a", 1)
    other = spawn("hold", hold_cfg(folder, 3, test_id="tests/test_dead.py::test_b"))
    held = other.wait_event("held", timeout=30)
    other.kill()
    lines: list[str] = []
    status = read_status(folder, log=lines.append)
    assert json.loads(json.dumps(status)) == status
    (g,) = status["gpus"]
    assert g["uuid"] == "GPU-0" and g["name"] == "Sim 0" and g["limit_bytes"] == 10 * GiB
    assert [(x["test_id"], x["bytes"], x["owner"]["session_id"]) for x in g["leases"]] == [
        ("tests/test_live.py::test_a", 2 * GiB, "live")
    ]
    (reclaimed,) = status["reclaimed"]
    assert reclaimed["test_id"] == "tests/test_dead.py::test_b"
    assert reclaimed["owner"]["pid"] == held["pid"]
    assert reclaimed["bytes"] == 3 * GiB and "its process is gone" in reclaimed["reason"]
    assert len(lines) == 1 and "tests/test_dead.py::test_b" in lines[0]
    assert g["history"][-1]["event"] == "reclaimed"
    # A second look finds nothing more to reclaim.
    assert read_status(folder)["reclaimed"] == []


def test_status_rebuilds_a_damaged_ledger_from_live_owners(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(session="live")
    holder.acquire(need(3), "kept::test", 1)
    (folder / ledger_name("GPU-0")).write_bytes(frame(LEDGER_FRAME, b"{broken", 3))
    status = read_status(folder)
    (repair,) = status["repaired"]
    assert repair["reason"].startswith("not JSON") and repair["moved_to"]
    (g,) = status["gpus"]
    assert [(x["test_id"], x["kind"]) for x in g["leases"]] == [("kept::test", TEST)]


def test_status_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    status = read_status(tmp_path / "nothing")
    assert status["gpus"] == [] and status["reclaimed"] == []
    assert not (tmp_path / "nothing").exists()


def test_status_sets_an_unreadable_ledger_aside(folder: Path, make: Callable[..., Ledger]) -> None:
    make().close()
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    lines: list[str] = []
    status = read_status(folder, log=lines.append)
    assert status["gpus"] == []
    assert status["repaired"][0]["moved_to"].startswith(ledger_name("GPU-0") + ".damaged-")
    assert "unreadable" in lines[0]


# --- the whole folder removed (issue 15, 3) ---------------------------------------------------


def test_a_removed_folder_comes_back_with_the_live_holders_booking(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    """The folder is removed while another process holds 8GiB; a session that comes 3s later
    must not be granted that memory: the holder is back, with its booking, by then."""
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.wait_event("held", timeout=30)
    shutil.rmtree(folder)
    wait_until((folder / live_name(held["key"])).exists, "the holder is back", timeout=10)
    ledger = make()
    with pytest.raises(LeaseTimeout, match=r"tests/test_x\.py::test_big"):
        ledger.acquire(need(4), "late", 0.3)
    assert [b.test_id for b in leases_in(folder)] == ["tests/test_x.py::test_big"]
    assert any("had been removed or replaced" in e.get("line", "") for e in other.events)


def test_a_fresh_ledger_admits_only_restores_while_a_live_owner_is_missing(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    """The grace period: the holder is stopped and cannot come back yet, so the rebuilt ledger
    lacks its booking; no new grant until it is back, and at most grace_s."""
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.wait_event("held", timeout=30)
    os.kill(held["pid"], signal.SIGSTOP)
    try:
        shutil.rmtree(folder)
        lines: list[str] = []
        ledger = make(log=lines.append)
        with pytest.raises(LeaseTimeout, match="admits only live owners' restores"):
            ledger.acquire(need(1), "late", 0.3)
        status = read_status(folder)
        assert status["gpus"][0]["grace_s"] > 0
        assert any("made anew" in line for line in trust_lines(status))
        assert any("admits only restores for up to 10s" in line for line in lines)
    finally:
        os.kill(held["pid"], signal.SIGCONT)
    # Back, its booking is restored and the grace period ends at once.
    assert ledger.acquire(need(2), "late", 10).parts == (("GPU-0", 2 * GiB),)
    assert sorted(b.test_id for b in leases_in(folder)) == ["late", "tests/test_x.py::test_big"]
    assert state_of(folder).grace_until == 0


def test_the_grace_period_is_bounded(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Worker]
) -> None:
    other = spawn("hold", hold_cfg(folder, 8))
    held = other.wait_event("held", timeout=30)
    os.kill(held["pid"], signal.SIGSTOP)
    try:
        shutil.rmtree(folder)
        ledger = make(grace_s=1.0)
        start = time.monotonic()
        assert ledger.acquire(need(4), "late", 10).parts
        assert 0.5 <= time.monotonic() - start < 8
    finally:
        os.kill(held["pid"], signal.SIGCONT)


def test_a_fresh_folder_without_lost_owners_has_no_grace_period(make: Callable[..., Ledger]) -> None:
    ledger = make()
    start = time.monotonic()
    assert ledger.acquire(need(1), "first", 5).parts
    assert time.monotonic() - start < 1


# --- the ledger held to the live owners' holdings (issue 15, also found) -----------------------


def rewrite(folder: Path, change: Callable[[GpuState], None]) -> None:
    """Replace GPU-0's ledger with a well-formed one that ``change`` made (as a buggy or hostile
    writer would)."""
    state = state_of(folder)
    change(state)
    (folder / ledger_name("GPU-0")).write_bytes(dump_gpu_state(state))


def test_a_ledger_that_leaves_out_a_live_holders_booking_is_corrected(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    rewrite(folder, lambda s: setattr(s, "bookings", []))
    lines: list[str] = []
    ledger = make(log=lines.append)
    with pytest.raises(LeaseTimeout):  # 6 + 5 > 10: the holder's booking is back
        ledger.acquire(need(5), "t", 0.1)
    assert [b.test_id for b in leases_in(folder)] == ["kept::test"]
    assert any(
        "lacked 1 booking(s)" in line and "that its holdings list (kept::test)" in line for line in lines
    )


def test_a_ledger_that_raises_a_cautious_sessions_limit_is_corrected(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    lines: list[str] = []
    generous = make(session="A", log=lines.append)
    careful = make([gpu(usable=6 * GiB)], session="B")
    key = careful.owner.key

    def raise_limit(state: GpuState) -> None:
        state.owners[key] = dataclasses.replace(state.owners[key], usable_bytes=10 * GiB)

    rewrite(folder, raise_limit)
    with pytest.raises(LeaseTimeout):
        generous.acquire(need(7), "a", 0.1)
    assert state_of(folder).limit() == 6 * GiB
    assert any("recorded 10.0GiB usable" in line and "holdings say 6.0GiB" in line for line in lines)


def test_a_ledger_that_drops_a_live_owner_entirely_is_corrected(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    careful = make([gpu(usable=6 * GiB)], session="B")
    careful.acquire(need(2), "kept", 1)

    def drop(state: GpuState) -> None:
        state.owners.pop(careful.owner.key)
        state.bookings = [b for b in state.bookings if b.owner != careful.owner.key]

    rewrite(folder, drop)
    generous = make(session="A")
    with pytest.raises(LeaseTimeout):  # limit 6GiB, 2GiB booked: 5GiB does not fit
        generous.acquire(need(5), "a", 0.1)
    assert generous.acquire(need(4), "a", 1)


# --- junk named like an owner's file (issue 15, 5) ------------------------------------------


@pytest.mark.parametrize("junk", ["directory", "fifo"])
def test_junk_named_like_a_liveness_file_is_set_aside(
    folder: Path, make: Callable[..., Ledger], junk: str
) -> None:
    make().close()
    path = folder / "live-1-deadbeefdeadbeef.lock"
    if junk == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    lines: list[str] = []
    ledger = make(log=lines.append)
    assert ledger.acquire(need(1), "t", 5).parts
    assert read_status(folder)["gpus"][0]["leases"]
    assert not path.exists()
    assert any("live-1-deadbeefdeadbeef.lock was not a regular file" in line for line in lines), lines


def test_the_docs_list_every_kind_of_damage_that_is_rebuilt() -> None:
    """docs/concepts/trust-model.rst names the kinds of damage that are rebuilt rather than
    refused, and how many: exactly those these tests make."""
    page = (Path(__file__).parents[2] / "docs" / "concepts" / "trust-model.rst").read_text()
    section = page.split("What is rebuilt rather than refused")[1].split("What an admin must do")[0]
    listed = re.findall(r"``([a-z ]+)``", section.split(".. The names below")[1])
    tested = [*DAMAGE, *JUNK, "writable by every account", "owned by another account", "missing"]
    assert sorted(listed) == sorted(tested)
    assert f"These {len(tested)} kinds are tested one" in " ".join(section.split())
