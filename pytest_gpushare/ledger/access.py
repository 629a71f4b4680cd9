"""Reading the ledger folder under its locks: load (repairing damage), reclaim the dead, save;
and the status of every ledger for ``gpushare status`` and the controller's "waiting" lines.

A damaged ledger (garbage, truncated, wrong types, too large) is renamed aside and rebuilt from
the holdings of the owners still alive. A live owner whose holdings cannot be read is
assumed to hold the whole GPU (a placeholder booking) until it rewrites its bookings itself:
never guess low, never overcommit after a rebuild.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_gpushare.ledger.folder import (
    BadFrame,
    FileTooLarge,
    LedgerFolder,
    default_ledger_dir,
    locked,
    open_ledger_folder,
    read_file,
    remove_stale_temps,
    set_aside,
    unframe,
    write_file,
)
from pytest_gpushare.ledger.liveness import (
    KEY_RE,
    HoldingsUnreadable,
    probe_alive,
    read_holdings,
    remove_owner_files,
)
from pytest_gpushare.ledger.records import (
    CONTEXT,
    LEDGER_FRAME,
    UNKNOWN,
    Booking,
    Damaged,
    GpuState,
    Holdings,
    OwnerRecord,
    dump_gpu_state,
    parse_gpu_state,
    parse_holdings,
)
from pytest_gpushare.units import format_size

__all__ = ["Access", "describe", "ledger_name", "lock_name", "owner_summary", "read_status", "waiting_lines"]

#: A ledger lock held longer than this means a hung or stopped process: fail loudly.
LOCK_TIMEOUT_S = 60.0
#: What a live owner with unreadable holdings is assumed to hold on a rebuilt GPU: all of it.
PLACEHOLDER_BYTES = 2**50


@functools.lru_cache(maxsize=256)
def ledger_name(uuid: str) -> str:
    """The ledger file of GPU ``uuid``; its lock file replaces ``.json`` by ``.lock``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", uuid)
    if stem != uuid:
        stem += "-" + hashlib.sha256(uuid.encode()).hexdigest()[:8]
    return f"gpu-{stem}.json"


@functools.lru_cache(maxsize=256)
def lock_name(uuid: str) -> str:
    return ledger_name(uuid)[: -len(".json")] + ".lock"


def owner_summary(record: OwnerRecord | None, key: str) -> dict[str, Any]:
    if record is None:
        return {"key": key}
    data = record.to_dict()
    del data["joined_at"]
    return data


class Access:
    """One access to some ledgers, under their locks: loads (repairing damage), reclaims the
    dead, saves, and keeps what it reclaimed and repaired for the caller to report.

    ``alive_max_age_s``: how old a verdict "alive" on an owner may be (0: probe every owner anew).
    """

    def __init__(
        self,
        folder: LedgerFolder,
        log: Callable[[str], None],
        tag: str,
        label: Callable[[GpuState], str],
        alive_max_age_s: float = 0.0,
    ) -> None:
        self.folder = folder
        self.alive_max_age_s = alive_max_age_s
        self.log = log
        self.tag = tag
        self.label = label
        self.now = time.time()
        self.reclaimed: list[dict[str, Any]] = []
        self.repaired: list[dict[str, Any]] = []
        self._alive: dict[str, bool] = {}
        self._listing: list[str] | None = None
        self._removed: set[str] = set()

    def alive(self, key: str) -> bool:
        if key not in self._alive:
            self._alive[key] = probe_alive(self.folder, key, self.alive_max_age_s)
        return self._alive[key]

    def listing(self) -> list[str]:
        if self._listing is None:
            self._listing = os.listdir(self.folder.path)
        return self._listing

    def load(self, uuid: str) -> tuple[GpuState, bool]:
        """The GPU's ledger and whether it must be saved (it was missing or rebuilt)."""
        name = ledger_name(uuid)
        try:
            data = read_file(self.folder, name)
            if data is None:
                state = self.rebuild(uuid)
                if state.bookings:  # not a new GPU: someone removed a ledger in use
                    text = (
                        f"gpushare: the ledger of {self.label(state)} was missing; rebuilt it from the "
                        f"{len(state.owners)} live owner(s) that use it"
                    )
                    self.log(text)
                    state.remember(self.now, "repaired", text)
                    self.repaired.append({"uuid": uuid, "reason": "missing", "moved_to": None})
                return state, True
            return parse_gpu_state(data, uuid), False
        except (Damaged, FileTooLarge) as exc:
            reason = str(exc)
        aside = set_aside(self.folder, name)
        state = self.rebuild(uuid)
        text = (
            f"gpushare: the ledger of {self.label(state)} was unreadable ({reason}); moved it to {aside} "
            f"and rebuilt it from the {len(state.owners)} live owner(s) that use it"
        )
        self.log(text)
        state.remember(self.now, "repaired", text)
        self.repaired.append({"uuid": uuid, "reason": reason, "moved_to": aside})
        return state, True

    def owner_keys(self) -> list[str]:
        """Keys of the owners that have a liveness file in the folder."""
        names = (n[len("live-") : -len(".lock")] for n in self.listing() if n.startswith("live-"))
        return [k for k in names if KEY_RE.match(k)]

    def holdings(self, key: str) -> Holdings | None:
        """A live owner's holdings; None when it is gone; :class:`Damaged` when unreadable."""
        try:
            data = read_holdings(self.folder, key)
        except HoldingsUnreadable as exc:
            raise Damaged(str(exc)) from None
        return None if data is None else parse_holdings(data, key)

    def rebuild(self, uuid: str) -> GpuState:
        """A ledger for ``uuid`` from the holdings of the owners still alive."""
        state = GpuState(uuid=uuid)
        for key in self.owner_keys():
            if not self.alive(key):
                continue
            try:
                holdings = self.holdings(key)
            except Damaged as exc:
                # Unknown holdings of a live owner: never guess low.
                state.owners[key] = OwnerRecord(
                    key, int(key.split("-")[0]), "?", "?", "?", "?", None, None, self.now
                )
                text = f"(unreadable holdings: {exc})"[:200]
                state.bookings.append(
                    Booking(f"{key}-unknown", key, text, PLACEHOLDER_BYTES, UNKNOWN, self.now)
                )
                continue
            if holdings is None:
                continue
            owner = holdings.owner
            owner.usable_bytes = holdings.usable.get(uuid)
            bookings = holdings.bookings.get(uuid, [])
            if bookings or owner.usable_bytes is not None:
                state.owners[key] = owner
                state.bookings.extend(bookings)
        return state

    def resolve_unknown(self, state: GpuState) -> bool:
        """Replace the placeholders of live owners whose holdings can be read again; True if any."""
        changed = False
        for key in sorted({b.owner for b in state.bookings if b.kind == UNKNOWN}):
            if not self.alive(key):
                continue  # reclaim drops it
            try:
                holdings = self.holdings(key)
            except Damaged:
                continue
            state.bookings = [b for b in state.bookings if b.owner != key]
            if holdings is not None:
                owner = holdings.owner
                owner.usable_bytes = holdings.usable.get(state.uuid)
                state.owners[key] = owner
                state.bookings.extend(holdings.bookings.get(state.uuid, []))
            changed = True
        return changed

    def reclaim(self, state: GpuState) -> bool:
        """Drop what dead owners hold or wait for; True if anything was dropped."""
        keys = set(state.owners) | {b.owner for b in state.bookings} | {w.owner for w in state.waiters}
        dead = {k for k in keys if not self.alive(k)}
        if not dead:
            return False
        where = self.label(state)
        for b in state.bookings:
            if b.owner not in dead:
                continue
            owner = state.owners.get(b.owner)
            who = owner.describe() if owner else f"owner {b.owner}"
            what = "the CUDA context" if b.kind == CONTEXT else f"test {b.test_id}"
            size = format_size(b.bytes)
            text = f"gpushare: reclaimed {size} on {where} held by {what} ({who}): its process is gone"
            self._record(state, text, b.kind, b.test_id, b.bytes, owner_summary(owner, b.owner))
        for w in state.waiters:
            if w.owner in dead:
                owner = state.owners.get(w.owner)
                who = owner.describe() if owner else f"owner {w.owner}"
                text = f"gpushare: dropped the wait of {w.test_id} for {where} ({who}): its process is gone"
                self._record(state, text, "waiter", w.test_id, w.bytes, owner_summary(owner, w.owner))
        state.owners = {k: o for k, o in state.owners.items() if k not in dead}
        state.bookings = [b for b in state.bookings if b.owner not in dead]
        state.waiters = [w for w in state.waiters if w.owner not in dead]
        for key in dead - self._removed:
            remove_owner_files(self.folder, key, self.listing())
            self._removed.add(key)
        return True

    def _record(
        self, state: GpuState, text: str, kind: str, test_id: str, size: int, owner: dict[str, Any]
    ) -> None:
        self.log(text)
        state.remember(self.now, "reclaimed", text)
        self.reclaimed.append(
            {
                "uuid": state.uuid,
                "kind": kind,
                "test_id": test_id,
                "bytes": size,
                "owner": owner,
                "reason": "its process is gone (its liveness lock was free)",
            }
        )

    def save(self, state: GpuState) -> None:
        state.generation += 1
        write_file(self.folder, ledger_name(state.uuid), dump_gpu_state(state), self.tag)

    def sweep(self) -> None:
        """Remove the files of owners that died without a trace in any ledger, and stale temps."""
        for key in self.owner_keys():
            if key not in self._removed and not self.alive(key):
                remove_owner_files(self.folder, key, self.listing())
                self._removed.add(key)
        remove_stale_temps(self.folder, self.listing(), self.now)


def describe(
    folder: LedgerFolder, states: Sequence[GpuState], acc: Access, index: Mapping[str, int]
) -> dict[str, Any]:
    now = time.time()
    gpus = []
    for state in states:
        owners = state.owners
        leases = [
            {
                "lease_id": b.lease_id,
                "kind": b.kind,
                "test_id": b.test_id,
                "bytes": b.bytes,
                "taken_at": b.taken_at,
                "age_s": max(0.0, now - b.taken_at),
                "owner": owner_summary(owners.get(b.owner), b.owner),
            }
            for b in state.bookings
        ]
        waiters = [
            {
                "ticket": w.ticket,
                "test_id": w.test_id,
                "bytes": w.bytes,
                "count": w.count,
                "exclusive": w.exclusive,
                "since": w.since,
                "waited_s": max(0.0, now - w.since),
                "owner": owner_summary(owners.get(w.owner), w.owner),
            }
            for w in state.waiters
        ]
        gpus.append(
            {
                "uuid": state.uuid,
                "index": index.get(state.uuid),
                "name": state.name,
                "total_bytes": state.total_bytes,
                "limit_bytes": state.limit(),
                "booked_bytes": state.booked(),
                "leased_bytes": sum(b.bytes for b in state.bookings if b.kind != CONTEXT),
                "context_bytes": sum(b.bytes for b in state.bookings if b.kind == CONTEXT),
                "owners": [owner_summary(o, k) for k, o in owners.items()],
                "leases": leases,
                "waiters": waiters,
                "history": list(state.history),
            }
        )
    return {
        "folder": str(folder.path),
        "taken_at": now,
        "gpus": gpus,
        "reclaimed": acc.reclaimed,
        "repaired": acc.repaired,
    }


def _peek_uuid(data: bytes | None) -> str | None:
    try:
        parsed = json.loads(unframe(LEDGER_FRAME, data or b"")[0])
    except (BadFrame, ValueError, RecursionError):
        return None
    uuid = parsed.get("uuid") if isinstance(parsed, dict) else None
    return uuid if isinstance(uuid, str) else None


def read_status(
    folder: str | os.PathLike[str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Every ledger of the folder (default: :func:`default_ledger_dir`) after reclaiming the dead
    and repairing damage, as one JSON-serialisable dict::

        {"folder", "taken_at", "reclaimed": [...this access...], "repaired": [...],
         "gpus": [{"uuid", "index", "name", "total_bytes", "limit_bytes", "booked_bytes",
                   "leased_bytes", "context_bytes", "owners": [...],
                   "leases": [{"lease_id", "kind", "test_id", "bytes", "taken_at", "age_s", "owner"}],
                   "waiters": [{"ticket", "test_id", "bytes", "count", "exclusive", "since",
                                "waited_s", "owner"}],
                   "history": [{"at", "event", "text"}]}]}

    ``owner`` entries carry key, pid, host, start_time, session_id, worker_id, command and
    usable_bytes; ``index`` is None here (it is the session's numbering; :meth:`Ledger.snapshot`
    fills it). A missing folder reads as empty.
    """
    path = Path(folder) if folder is not None else default_ledger_dir()
    if not path.exists() and not path.is_symlink():
        return {"folder": str(path), "taken_at": time.time(), "gpus": [], "reclaimed": [], "repaired": []}
    checked = open_ledger_folder(path, create=False)
    say = log if log is not None else (lambda _line: None)
    acc = Access(
        checked, say, f"status{os.getpid()}", lambda s: f"GPU {s.uuid}" + (f" ({s.name})" if s.name else "")
    )
    states = []
    for name in sorted(n for n in acc.listing() if n.startswith("gpu-") and n.endswith(".json")):
        lock = name[: -len(".json")] + ".lock"
        with locked(checked, [lock], lock_timeout):
            try:
                uuid = _peek_uuid(read_file(checked, name))
            except FileTooLarge:
                uuid = None
            if uuid is None or ledger_name(uuid) != name:
                uuid = _uuid_from_holdings(acc, name)
            if uuid is None:
                aside = set_aside(checked, name)
                say(f"gpushare: {checked.path / name} was unreadable and unused; moved it to {aside}")
                acc.repaired.append({"uuid": None, "reason": "unreadable", "moved_to": aside})
                continue
            state, changed = acc.load(uuid)
            changed = acc.reclaim(state) or changed
            if acc.resolve_unknown(state) or changed:
                acc.save(state)
            states.append(state)
    acc.sweep()
    return describe(checked, states, acc, {})


def _uuid_from_holdings(acc: Access, name: str) -> str | None:
    """The GPU a damaged ledger file belonged to, from the holdings of live owners."""
    for key in acc.owner_keys():
        try:
            holdings = acc.holdings(key)
        except Damaged:
            continue
        for uuid in [] if holdings is None else list(holdings.usable) + list(holdings.bookings):
            if ledger_name(uuid) == name:
                return uuid
    return None


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
        holders = [
            f"{lease['test_id']} ({format_size(lease['bytes'])}, session {lease['owner'].get('session_id')})"
            for gpu in seen[ticket]
            for lease in gpu["leases"]
            if lease["kind"] != CONTEXT
        ]
        what = format_size(w["bytes"]) + (" exclusive" if w["exclusive"] else "")
        if w["count"] > 1:
            what += f" on each of {w['count']} GPUs"
        who = w["owner"].get("worker_id")
        line = f"gpushare: {w['test_id']} ({who}) has waited {w['waited_s']:.0f}s for {what}"
        lines.append(line + ("; held by " + ", ".join(holders) if holders else ""))
    return lines
