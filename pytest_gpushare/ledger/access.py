"""One access to the ledger folder under its locks: load (repairing damage), reclaim the dead,
save; and :func:`read_status`, one such access to every ledger for ``gpushare status``.

A damaged ledger (garbage, truncated, wrong types, too large) is renamed aside and rebuilt from
the holdings of the owners still alive. A live owner whose holdings cannot be read is
assumed to hold the whole GPU (a placeholder booking) until it rewrites its bookings itself:
never guess low, never overcommit after a rebuild.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_gpushare.ledger.codec import (
    LEDGER_FRAME,
    BadFrame,
    Damaged,
    dump_gpu_state,
    parse_gpu_state,
    parse_holdings,
    unframe,
)
from pytest_gpushare.ledger.folder import (
    FileTooLarge,
    LedgerFolder,
    default_ledger_dir,
    open_ledger_folder,
    read_file,
    remove_stale_temps,
    set_aside,
    write_file,
)
from pytest_gpushare.ledger.liveness import HoldingsUnreadable, probe_alive, read_holdings, remove_owner_files
from pytest_gpushare.ledger.locks import locked
from pytest_gpushare.ledger.records import CONTEXT, KEY_RE, UNKNOWN, Booking, GpuState, Holdings, Owner
from pytest_gpushare.ledger.views import describe, owner_summary
from pytest_gpushare.units import format_size

__all__ = ["Access", "ledger_name", "lock_name", "read_status"]

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
            if data is not None:
                return parse_gpu_state(data, uuid), False
            reason = None
        except (Damaged, FileTooLarge) as exc:
            reason = str(exc)
        if reason is None:
            state = self.rebuild(uuid)
            if state.bookings:  # not a new GPU: someone removed a ledger in use
                self._repaired(state, "missing", None, "was missing;")
            return state, True
        aside = set_aside(self.folder, name)
        state = self.rebuild(uuid)
        self._repaired(state, reason, aside, f"was unreadable ({reason}); moved it to {aside} and")
        return state, True

    def _repaired(self, state: GpuState, reason: str, aside: str | None, what: str) -> None:
        text = (
            f"gpushare: the ledger of {self.label(state)} {what} rebuilt it from the "
            f"{len(state.owners)} live owner(s) that use it"
        )
        self.log(text)
        state.remember(self.now, "repaired", text)
        self.repaired.append({"uuid": state.uuid, "reason": reason, "moved_to": aside})

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
                self._assume_all(state, key, str(exc))
                continue
            if holdings is None:
                continue
            owner = _owner_on(holdings, uuid)
            bookings = holdings.bookings.get(uuid, [])
            if bookings or owner.usable_bytes is not None:
                state.owners[key] = owner
                state.bookings.extend(bookings)
        return state

    def _assume_all(self, state: GpuState, key: str, why: str) -> None:
        """Unknown holdings of a live owner: never guess low, book the whole GPU for it."""
        state.owners[key] = Owner(key, int(key.partition("-")[0]), "?", "?", "?", "?", None, None, self.now)
        text = f"(unreadable holdings: {why})"[:200]
        state.bookings.append(Booking(f"{key}-unknown", key, text, PLACEHOLDER_BYTES, UNKNOWN, self.now))

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
                state.owners[key] = _owner_on(holdings, state.uuid)
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
        for b in (b for b in state.bookings if b.owner in dead):
            what = "the CUDA context" if b.kind == CONTEXT else f"test {b.test_id}"
            size = format_size(b.bytes)
            text = f"reclaimed {size} on {where} held by {what} ({_who(state, b.owner)}): its process is gone"
            self._record(state, text, b.kind, b.test_id, b.bytes, b.owner)
        for w in (w for w in state.waiters if w.owner in dead):
            text = (
                f"dropped the wait of {w.test_id} for {where} ({_who(state, w.owner)}): its process is gone"
            )
            self._record(state, text, "waiter", w.test_id, w.bytes, w.owner)
        state.owners = {k: o for k, o in state.owners.items() if k not in dead}
        state.bookings = [b for b in state.bookings if b.owner not in dead]
        state.waiters = [w for w in state.waiters if w.owner not in dead]
        for key in dead - self._removed:
            remove_owner_files(self.folder, key, self.listing())
            self._removed.add(key)
        return True

    def _record(self, state: GpuState, what: str, kind: str, test_id: str, size: int, key: str) -> None:
        text = f"gpushare: {what}"
        self.log(text)
        state.remember(self.now, "reclaimed", text)
        self.reclaimed.append(
            {
                "uuid": state.uuid,
                "kind": kind,
                "test_id": test_id,
                "bytes": size,
                "owner": owner_summary(state.owners.get(key), key),
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


def _owner_on(holdings: Holdings, uuid: str) -> Owner:
    """The owner of ``holdings`` as the ledger of ``uuid`` records it: with its usable memory there."""
    return dataclasses.replace(holdings.owner, usable_bytes=holdings.usable.get(uuid))


def _who(state: GpuState, key: str) -> str:
    owner = state.owners.get(key)
    return owner.describe() if owner else f"owner {key}"


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
        with locked(checked, [name[: -len(".json")] + ".lock"], lock_timeout):
            state = _status_of(acc, name)
        if state is not None:
            states.append(state)
    acc.sweep()
    return describe(
        str(checked.path),
        states,
        taken_at=time.time(),
        reclaimed=acc.reclaimed,
        repaired=acc.repaired,
        index={},
    )


def _status_of(acc: Access, name: str) -> GpuState | None:
    """The ledger file ``name`` loaded, reclaimed and saved (the caller holds its lock); None when
    it was unreadable and no live owner uses its GPU (it is set aside)."""
    try:
        uuid = _peek_uuid(read_file(acc.folder, name))
    except FileTooLarge:
        uuid = None
    if uuid is None or ledger_name(uuid) != name:
        uuid = _uuid_from_holdings(acc, name)
    if uuid is None:
        aside = set_aside(acc.folder, name)
        acc.log(f"gpushare: {acc.folder.path / name} was unreadable and unused; moved it to {aside}")
        acc.repaired.append({"uuid": None, "reason": "unreadable", "moved_to": aside})
        return None
    state, changed = acc.load(uuid)
    changed = acc.reclaim(state) or changed
    if acc.resolve_unknown(state) or changed:
        acc.save(state)
    return state


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
