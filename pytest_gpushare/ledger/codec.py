"""Ledger and holdings files as bytes: the frame around them, strict reading, compact writing.

Both files are *framed* (:func:`frame`): a header line with the payload's length, CRC-32 and,
for a ledger, a generation number, which :func:`unframe` checks, so damage of any kind is told
from data and set aside, and a waiter can read the header alone to see whether a ledger changed.

Owners, bookings and waiters are kept as rows (JSON arrays of their values, in the order of
:data:`OWNER_FIELDS`, :data:`BOOKING_FIELDS` and :data:`WAITER_FIELDS`), not as objects: with
16 processes on a GPU the ledger is read and written under its lock at every access, and rows
make it about a third smaller and a third quicker to parse and to write.

A ledger's payload begins with ``"waiting"``: the sessions whose requests wait on the GPU, as
:func:`session_tag` names them, at most :data:`WAITING_NAMED` (two are enough to tell any reader
whether a session other than its own waits). A process can so see whether another session waits
by reading the file's first bytes, without its lock (:func:`waiting_in_head`). It is made from
the waiters when the ledger is written, after the dead owners' waiters were dropped, so it is as
true as they are; readers never take it for more than a hint (the waiters are the record), and a
reader of an older version ignores the key.

Parsing never trusts the data: any wrong type, missing field, absurd number or dangling
reference raises :class:`Damaged`, and the ledger treats the whole file as unreadable. Pure
functions over bytes; the files themselves are handled by :mod:`.folder` and :mod:`.liveness`.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any, TypeGuard

from pytest_gpushare.ledger.records import (
    HISTORY_KEEP,
    KEY_RE,
    KINDS,
    Booking,
    GpuState,
    Holdings,
    Owner,
    Waiter,
)

__all__ = [
    "BOOKING_FIELDS",
    "HOLDINGS_FRAME",
    "LEDGER_FRAME",
    "OWNER_FIELDS",
    "WAITER_FIELDS",
    "BadFrame",
    "Damaged",
    "dump_gpu_state",
    "dump_holdings",
    "frame",
    "parse_gpu_state",
    "parse_holdings",
    "session_tag",
    "unframe",
    "waiting_in_head",
    "waiting_sessions",
]

VERSION = 1
#: The kinds named in the header lines of a ledger file and of a holdings file.
LEDGER_FRAME = "LEDGER"
HOLDINGS_FRAME = "HOLDINGS"
_KEY_MATCH = KEY_RE.match
#: More than any GPU will hold for decades: a larger number is damage.
MAX_BYTES = 2**60
MAX_TEXT = 10_000
OWNER_FIELDS = (
    "key",
    "pid",
    "host",
    "start_time",
    "session_id",
    "worker_id",
    "command",
    "usable_bytes",
    "joined_at",
)
#: How many waiting sessions a ledger's head names at most.
WAITING_NAMED = 2
#: How many bytes of a ledger file hold its header line and its waiting sessions.
WAITING_HEAD_BYTES = 160
BOOKING_FIELDS = ("lease_id", "owner", "test_id", "bytes", "kind", "taken_at")
WAITER_FIELDS = ("ticket", "owner", "test_id", "bytes", "context_bytes", "count", "exclusive", "since")


class BadFrame(Exception):
    """A framed file's header is missing, or its payload is cut short or does not match its
    checksum; ``str()`` says which."""


class Damaged(Exception):
    """The content of a ledger or holdings file cannot be used; ``str()`` says why."""


_WAITING = re.compile(rb'[^\n]{0,80}\n\{"version":%d,"waiting":"([0-9a-f ]{0,80})"' % VERSION)
_FRAME = re.compile(rb"GPUSHARE-([A-Z]{1,20}) ([0-9]{1,9}) ([0-9a-f]{8})(?: ([0-9]{1,19}))?\n")


def frame(kind: str, payload: bytes, generation: int | None = None) -> bytes:
    """``payload`` behind a header line naming ``kind`` (``LEDGER``, ``HOLDINGS``), the payload's
    length and CRC-32, and, when given, a generation number that grows with each write."""
    head = b"GPUSHARE-%s %d %08x" % (kind.encode(), len(payload), zlib.crc32(payload))
    if generation is not None:
        head += b" %d" % generation
    return head + b"\n" + payload


def unframe(kind: str, data: bytes) -> tuple[bytes, int | None]:
    """The payload and generation of a :func:`frame`; bytes after the payload are ignored (a
    holdings file, rewritten in place, may keep an older, longer tail). Raises :class:`BadFrame`."""
    match = _FRAME.match(data)
    if match is None or match.group(1) != kind.encode():
        raise BadFrame(f"no {kind.lower()} header")
    size = int(match.group(2))
    payload = data[match.end() : match.end() + size]
    if len(payload) != size:
        raise BadFrame(f"{kind.lower()} cut short ({len(payload)} of {size} bytes)")
    if b"%08x" % zlib.crc32(payload) != match.group(3):
        raise BadFrame(f"{kind.lower()} does not match its checksum")
    generation = match.group(4)
    return payload, None if generation is None else int(generation)


# --- strict reading ---------------------------------------------------------------------------


def _get(data: dict[str, Any], key: str) -> Any:
    if key not in data:
        raise Damaged(f"missing {key!r}")
    return data[key]


def _int(data: dict[str, Any], key: str, *, low: int = 0, high: int = MAX_BYTES, null: bool = False) -> Any:
    value = _get(data, key)
    if value is None and null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Damaged(f"{key!r} is not a number in [{low}, {high}]: {str(value)[:40]!r}")
    return value


def _float(data: dict[str, Any], key: str) -> float:
    value = _get(data, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise Damaged(f"{key!r} is not a time: {str(value)[:40]!r}")
    return float(value)


def _text(data: dict[str, Any], key: str, *, null: bool = False) -> Any:
    value = _get(data, key)
    if value is None and null:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Damaged(f"{key!r} is not a text: {str(value)[:40]!r}")
    return value


def _key(data: dict[str, Any], key: str) -> str:
    value = _get(data, key)
    if not isinstance(value, str) or not KEY_RE.match(value):
        raise Damaged(f"{key!r} is not an owner key: {str(value)[:40]!r}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Damaged(f"{what} is not an object")
    return value


def _row(data: Any, fields: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(data, list) or len(data) != len(fields):
        raise Damaged(f"{what} is not a row of {len(fields)} values")
    return dict(zip(fields, data, strict=True))


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = _get(data, key)
    if not isinstance(value, list):
        raise Damaged(f"{key!r} is not a list")
    return value


def _owner_checked(data: Any) -> Owner:
    d = _row(data, OWNER_FIELDS, "an owner")
    return Owner(
        key=_key(d, "key"),
        pid=_int(d, "pid", high=2**31),
        host=_text(d, "host"),
        start_time=_text(d, "start_time"),
        session_id=_text(d, "session_id"),
        worker_id=_text(d, "worker_id"),
        command=_text(d, "command", null=True),
        usable_bytes=_int(d, "usable_bytes", null=True),
        joined_at=_float(d, "joined_at"),
    )


def _booking_checked(data: Any) -> Booking:
    d = _row(data, BOOKING_FIELDS, "a booking")
    kind = _text(d, "kind")
    if kind not in KINDS:
        raise Damaged(f"unknown booking kind {kind[:40]!r}")
    return Booking(
        lease_id=_text(d, "lease_id"),
        owner=_key(d, "owner"),
        test_id=_text(d, "test_id"),
        bytes=_int(d, "bytes"),
        kind=kind,
        taken_at=_float(d, "taken_at"),
    )


def _waiter_checked(data: Any) -> Waiter:
    d = _row(data, WAITER_FIELDS, "a waiter")
    exclusive = _get(d, "exclusive")
    if not isinstance(exclusive, bool):
        raise Damaged("'exclusive' is not true or false")
    return Waiter(
        ticket=_text(d, "ticket"),
        owner=_key(d, "owner"),
        test_id=_text(d, "test_id"),
        bytes=_int(d, "bytes"),
        context_bytes=_int(d, "context_bytes"),
        count=_int(d, "count", low=1, high=4096),
        exclusive=exclusive,
        since=_float(d, "since"),
    )


# The fast readers below accept exactly what the checked readers accept when every field is
# well-formed, in one expression each; anything else goes to the checked reader, which says
# what is wrong. A ledger is read on every access under its lock, so this is the hot path.


def _is_text(value: Any) -> TypeGuard[str]:
    return type(value) is str and len(value) <= MAX_TEXT


def _is_size(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_BYTES


def _is_time(value: Any) -> TypeGuard[float]:
    return type(value) in (int, float) and 0 <= value < math.inf


def _owner(r: Any) -> Owner:
    if type(r) is list and len(r) == 9:
        key, pid, host, start, session, worker, command, usable, joined = r
        if (
            type(key) is str
            and _KEY_MATCH(key)
            and type(pid) is int
            and 0 <= pid <= 2**31
            and _is_text(host)
            and _is_text(start)
            and _is_text(session)
            and _is_text(worker)
            and (command is None or _is_text(command))
            and (usable is None or _is_size(usable))
            and _is_time(joined)
        ):
            return Owner(key, pid, host, start, session, worker, command, usable, float(joined))
    return _owner_checked(r)


def _booking(r: Any) -> Booking:
    if type(r) is list and len(r) == 6:
        lease_id, owner, test_id, size, kind, taken = r
        if (
            _is_text(lease_id)
            and type(owner) is str
            and _KEY_MATCH(owner)
            and _is_text(test_id)
            and _is_size(size)
            and kind in KINDS
            and _is_time(taken)
        ):
            return Booking(lease_id, owner, test_id, size, kind, float(taken))
    return _booking_checked(r)


def _waiter(r: Any) -> Waiter:
    if type(r) is list and len(r) == 8:
        ticket, owner, test_id, size, context, count, exclusive, since = r
        if (
            _is_text(ticket)
            and type(owner) is str
            and _KEY_MATCH(owner)
            and _is_text(test_id)
            and _is_size(size)
            and _is_size(context)
            and type(count) is int
            and 1 <= count <= 4096
            and type(exclusive) is bool
            and _is_time(since)
        ):
            return Waiter(ticket, owner, test_id, size, context, count, exclusive, float(since))
    return _waiter_checked(r)


def _history(data: Any) -> dict[str, Any]:
    d = _object(data, "a history entry")
    return {"at": _float(d, "at"), "event": _text(d, "event"), "text": _text(d, "text")}


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Damaged(f"not JSON ({str(exc)[:80]})") from None
    d = _object(parsed, what)
    if d.get("version") != VERSION:
        raise Damaged(f"unknown version {str(d.get('version'))[:20]!r}")
    return d


def parse_gpu_state(data: bytes, uuid: str) -> GpuState:
    """The ledger of GPU ``uuid`` from a file's bytes (framed), or :class:`Damaged`."""
    try:
        payload, generation = unframe(LEDGER_FRAME, data)
    except BadFrame as exc:
        raise Damaged(str(exc)) from None
    d = _load(payload, "the ledger")
    if _text(d, "uuid") != uuid:
        raise Damaged(f"it belongs to another GPU ({str(d['uuid'])[:60]})")
    owners: dict[str, Owner] = {}
    for raw in _list(d, "owners"):
        owner = _owner(raw)
        if owner.key in owners:
            raise Damaged(f"owner {owner.key} is recorded twice")
        owners[owner.key] = owner
    state = GpuState(
        uuid=uuid,
        name=_text(d, "name"),
        total_bytes=_int(d, "total_bytes"),
        owners=owners,
        bookings=[_booking(b) for b in _list(d, "bookings")],
        waiters=[_waiter(w) for w in _list(d, "waiters")],
        history=[_history(h) for h in _list(d, "history")][-HISTORY_KEEP:],
        generation=generation or 0,
        grace_until=_float(d, "grace_until") if "grace_until" in d else 0.0,
    )
    for ref in [b.owner for b in state.bookings] + [w.owner for w in state.waiters]:
        if ref not in owners:
            raise Damaged(f"a booking or waiter names owner {ref}, who is not recorded")
    return state


def session_tag(session_id: str) -> str:
    """A session as a ledger's head names it: the CRC-32 of its id, in hex (ids may be long; two
    sessions that share a tag only make the waiters of one look like the other's own)."""
    return f"{zlib.crc32(session_id.encode()):08x}"


def waiting_sessions(state: GpuState) -> list[str]:
    """The tags of the sessions with a waiter on the GPU, each once, in the waiters' order."""
    tags: dict[str, None] = {}
    for w in state.waiters:
        owner = state.owners.get(w.owner)
        tags[session_tag(owner.session_id if owner is not None else w.owner)] = None
    return list(tags)


def waiting_in_head(head: bytes) -> list[str] | None:
    """The tags of the waiting sessions that a ledger file's first :data:`WAITING_HEAD_BYTES`
    name; None when they name none (a ledger written by an older version: read it whole)."""
    match = _WAITING.match(head)
    return None if match is None else match.group(1).decode().split()


def dump_gpu_state(state: GpuState) -> bytes:
    """The ledger file's bytes: the state as JSON, framed with its generation, the waiting
    sessions first."""
    document = {
        "version": VERSION,
        "waiting": " ".join(waiting_sessions(state)[:WAITING_NAMED]),
        "uuid": state.uuid,
        "name": state.name,
        "total_bytes": state.total_bytes,
        "owners": [o.to_row() for o in state.owners.values()],
        "bookings": [b.to_row() for b in state.bookings],
        "waiters": [w.to_row() for w in state.waiters],
        "history": state.history,
    }
    if state.grace_until:
        # Only while there is one: a reader of an older version ignores the key.
        document["grace_until"] = state.grace_until
    payload = json.dumps(document, separators=(",", ":")).encode()
    return frame(LEDGER_FRAME, payload, state.generation)


def parse_holdings(data: bytes, key: str) -> Holdings:
    """An owner's holdings file, or :class:`Damaged`."""
    d = _load(data, "the holdings")
    owner = _owner(_get(d, "owner"))
    if owner.key != key:
        raise Damaged("it names another owner")
    usable: dict[str, int] = {}
    for uuid, value in _object(_get(d, "usable"), "'usable'").items():
        usable[uuid] = _int({"usable": value}, "usable")
    bookings: dict[str, list[Booking]] = {}
    for uuid, items in _object(_get(d, "bookings"), "'bookings'").items():
        if not isinstance(items, list):
            raise Damaged("bookings of a GPU are not a list")
        parsed = [_booking(b) for b in items]
        if any(b.owner != key for b in parsed):
            raise Damaged("it lists bookings of another owner")
        bookings[uuid] = parsed
    return Holdings(owner=owner, usable=usable, bookings=bookings)


def dump_holdings(holdings: Holdings) -> bytes:
    return json.dumps(
        {
            "version": VERSION,
            "owner": holdings.owner.to_row(),
            "usable": holdings.usable,
            "bookings": {u: [b.to_row() for b in items] for u, items in holdings.bookings.items() if items},
        },
        separators=(",", ":"),
    ).encode()
