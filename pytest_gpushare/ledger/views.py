"""What the ledgers show: the status document of ``gpushare status`` and :meth:`Ledger.snapshot`,
and the lines said about it: who waits, and who holds the memory they wait for ("held by ...").

Values in, values out: the ledgers are read by :mod:`.access` and :mod:`.handle`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pytest_gpushare.errors import LeaseTimeout, ReleaseDeferred
from pytest_gpushare.ledger.records import CONTEXT, Booking, GpuState, Lease, Owner, Waiter
from pytest_gpushare.units import format_size

__all__ = [
    "describe",
    "held_by",
    "holders_text",
    "lease_holders",
    "limit_setter",
    "limits_of_others",
    "owner_summary",
    "release_deferred",
    "trust_lines",
    "waiting_lines",
]

#: The fields of a booking and of a waiter that status shows, in its order.
_LEASE_KEYS = ("lease_id", "kind", "test_id", "bytes", "taken_at")
_WAITER_KEYS = ("ticket", "test_id", "bytes", "count", "exclusive", "since")


def owner_summary(owner: Owner | None, key: str) -> dict[str, Any]:
    """What status shows of an owner; only its key when the ledger has no record of it."""
    return {"key": key} if owner is None else owner.summary()


def _entry(
    item: Booking | Waiter, keys: Sequence[str], age: tuple[str, float], owners: Mapping[str, Owner]
) -> dict[str, Any]:
    entry = {k: getattr(item, k) for k in keys}
    entry[age[0]] = max(0.0, age[1])
    entry["owner"] = owner_summary(owners.get(item.owner), item.owner)
    return entry


def limit_setter(state: GpuState) -> Owner | None:
    """The owner whose usable memory is the GPU's limit (the most conservative live session)."""
    recorded = [o for o in state.owners.values() if o.usable_bytes is not None]
    return min(recorded, key=lambda o: (o.usable_bytes, o.joined_at)) if recorded else None


def limits_of_others(
    states: Iterable[GpuState], label: Callable[[GpuState], str], me: Owner, usable: Mapping[str, int]
) -> list[str]:
    """Which other session's reservations cap a GPU below ``me``'s own figure (``usable``, per
    GPU uuid): for the message of a wait that timed out (issue 15)."""
    lines = []
    for state in states:
        setter = limit_setter(state)
        mine = usable.get(state.uuid)
        if setter is None or setter.session_id == me.session_id or setter.usable_bytes is None:
            continue
        if mine is None or setter.usable_bytes >= mine:
            continue
        lines.append(
            f"{label(state)}'s limit {format_size(setter.usable_bytes)} is set by session "
            f"{setter.session_id} ({setter.describe()}), which keeps more for its reservations "
            f"than this session's {format_size(mine)}"
        )
    return lines


def release_deferred(lease: Lease, parts: Sequence[tuple[str, int]], why: Exception) -> ReleaseDeferred:
    """The one-line error of a release that could not reach the ledger; ``parts`` are the
    lease's GPUs (as labels) and sizes."""
    where = ", ".join(f"{format_size(size)} on {gpu}" for gpu, size in parts)
    message = (
        f"gpushare: could not give back the lease of {lease.test_id} ({where}): {why}; it stays "
        "booked until this process reaches the ledger again or ends"
    )
    return ReleaseDeferred(message, lease.lease_id, lease.test_id)


def _gpu(state: GpuState, index: int | None, now: float) -> dict[str, Any]:
    owners = state.owners
    setter = limit_setter(state)
    return {
        "uuid": state.uuid,
        "index": index,
        "name": state.name,
        "total_bytes": state.total_bytes,
        "limit_bytes": state.limit(),
        "limit_owner": None if setter is None else setter.summary(),
        "grace_s": round(max(0.0, state.grace_until - now), 1),
        "booked_bytes": state.booked(),
        "leased_bytes": sum(b.bytes for b in state.bookings if b.kind != CONTEXT),
        "context_bytes": sum(b.bytes for b in state.bookings if b.kind == CONTEXT),
        "owners": [owner_summary(o, k) for k, o in owners.items()],
        "leases": [_entry(b, _LEASE_KEYS, ("age_s", now - b.taken_at), owners) for b in state.bookings],
        "waiters": [_entry(w, _WAITER_KEYS, ("waited_s", now - w.since), owners) for w in state.waiters],
        "history": list(state.history),
    }


def describe(
    folder: str,
    states: Sequence[GpuState],
    *,
    taken_at: float,
    reclaimed: list[dict[str, Any]],
    repaired: list[dict[str, Any]],
    unverifiable: list[dict[str, Any]],
    index: Mapping[str, int],
) -> dict[str, Any]:
    """The status document (its keys: :func:`pytest_gpushare.ledger.status.read_status`)."""
    return {
        "folder": folder,
        "taken_at": taken_at,
        "gpus": [_gpu(state, index.get(state.uuid), taken_at) for state in states],
        "reclaimed": reclaimed,
        "repaired": repaired,
        "unverifiable": unverifiable,
    }


def trust_lines(snapshot: Mapping[str, Any]) -> list[str]:
    """The lines ``gpushare status`` shows about what cannot be verified now: owners whose
    liveness cannot be checked (trusted a bounded time more) and ledgers in their grace period."""
    lines = []
    for entry in snapshot.get("unverifiable", []):
        lines.append(
            f"gpushare: owner {entry['key']} is unverifiable ({entry['why']}); its bookings count "
            f"for at most {entry['trusted_for_s']:.0f}s more"
        )
    for gpu in snapshot.get("gpus", []):
        if gpu.get("grace_s"):
            lines.append(
                f"gpushare: the ledger of GPU {gpu['uuid']} was made anew; it admits only live "
                f"owners' restores for {gpu['grace_s']:.0f}s more"
            )
    return lines


def held_by(holders: Sequence[str], *, long: bool = False) -> str:
    """The "; held by ..." tail of a line about a wait, or "" when nobody holds anything. ``long``
    descriptions, which have commas of their own, are set apart by semicolons after a colon."""
    if not holders:
        return ""
    if long:
        return "; held by: " + "; ".join(holders)
    return "; held by " + ", ".join(holders)


def holders_text(
    gpus: Iterable[Mapping[str, Any]], *, exclude_owner: str | None = None, by_command: bool = False
) -> str:
    """The "; held by ..." tail naming the test leases on ``gpus`` (entries of a status
    document's ``"gpus"``): each as its test id (``by_command``: the command that ``gpushare run``
    holds it for, when there is one), its size and session; those of ``exclude_owner`` (an owner
    key) left out. "" when there are none."""
    holders = [
        f"{(by_command and lease['owner'].get('command')) or lease['test_id']} "
        f"({format_size(lease['bytes'])}, session {lease['owner'].get('session_id')})"
        for gpu in gpus
        for lease in gpu["leases"]
        if lease["kind"] != CONTEXT and (exclude_owner is None or lease["owner"].get("key") != exclude_owner)
    ]
    return held_by(holders)


def lease_holders(states: Iterable[GpuState], label: Callable[[GpuState], str]) -> tuple[str, ...]:
    """Who holds test memory on the GPUs of ``states``, one long description each: the test, its
    size and GPU (``label``), and its owner's session, worker and pid."""
    holders = []
    for state in states:
        for b in state.bookings:
            if b.kind == CONTEXT:
                continue
            owner = state.owners.get(b.owner)
            who = (
                f"session {owner.session_id}, worker {owner.worker_id}, pid {owner.pid}" if owner else b.owner
            )
            holders.append(f"{b.test_id} ({format_size(b.bytes)} on {label(state)}, {who})")
    return tuple(holders)


def lease_timeout(
    what: str,
    waited: float,
    states: Sequence[GpuState],
    reasons: list[str],
    label: Callable[[GpuState], str],
    me: Owner,
    usable: Mapping[str, int],
    locked_by: str = "",
) -> LeaseTimeout:
    """The error of a request (``what``: "<test>: no GPU memory for <need>") that waited
    ``waited`` seconds in vain on the GPUs of ``states``: why it could not be served there
    (``reasons``, the limits other sessions set, who held a lock), and who holds their memory."""
    reasons = reasons + limits_of_others(states, label, me, usable) + ([locked_by] if locked_by else [])
    holders = lease_holders(states, label)
    message = f"{what} after waiting {waited:.1f}s"
    if reasons:
        message += " (" + "; ".join(reasons) + ")"
    return LeaseTimeout(message + held_by(holders, long=True), waited, holders)


def waiting_lines(
    snapshot: Mapping[str, Any], *, session_id: str | None = None, min_wait_s: float = 10.0
) -> list[str]:
    """One line per request (of ``session_id``, or any) that has waited ``min_wait_s`` or more:
    what it waits for and who holds the GPUs it waits on."""
    seen: dict[str, list[Mapping[str, Any]]] = {}
    waiters: dict[str, Mapping[str, Any]] = {}
    for gpu in snapshot.get("gpus", []):
        for w in gpu["waiters"]:
            if session_id is not None and w["owner"].get("session_id") != session_id:
                continue
            if w["waited_s"] < min_wait_s:
                continue
            waiters.setdefault(w["ticket"], w)
            seen.setdefault(w["ticket"], []).append(gpu)
    lines = []
    for ticket, w in waiters.items():
        what = format_size(w["bytes"]) + (" exclusive" if w["exclusive"] else "")
        if w["count"] > 1:
            what += f" on each of {w['count']} GPUs"
        who = w["owner"].get("worker_id")
        line = f"gpushare: {w['test_id']} ({who}) has waited {w['waited_s']:.0f}s for {what}"
        lines.append(line + holders_text(seen[ticket]))
    return lines
