""":func:`read_status`: one access to every ledger of a folder, for ``gpushare status``.

Reading is an access like any other (:mod:`.access`): the dead are reclaimed, damage is set
aside and rebuilt, ledgers are checked against their live owners' holdings. It waits for a
ledger's lock no longer than :data:`STATUS_LOCK_TIMEOUT_S`: a stopped or hung process that holds
one makes status fail in that time with a message that names it (issue 15), not hang.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_gpushare.ledger.access import Access, ledger_name
from pytest_gpushare.ledger.codec import LEDGER_FRAME, BadFrame, Damaged, unframe
from pytest_gpushare.ledger.files import FileTooLarge, Unusable, read_file, set_aside
from pytest_gpushare.ledger.folder import default_ledger_dir, open_ledger_folder
from pytest_gpushare.ledger.locks import locked
from pytest_gpushare.ledger.records import GpuState
from pytest_gpushare.ledger.views import describe

__all__ = ["STATUS_LOCK_TIMEOUT_S", "read_status"]

#: How long status waits for a ledger's lock.
STATUS_LOCK_TIMEOUT_S = 5.0


def read_status(
    folder: str | os.PathLike[str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
    lock_timeout: float = STATUS_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Every ledger of the folder (default: :func:`default_ledger_dir`) after reclaiming the dead
    and repairing damage, as one JSON-serialisable dict::

        {"folder", "taken_at", "reclaimed": [...this access...], "repaired": [...],
         "unverifiable": [{"key", "why", "trusted_for_s"}],
         "gpus": [{"uuid", "index", "name", "total_bytes", "limit_bytes", "limit_owner",
                   "booked_bytes", "leased_bytes", "context_bytes", "grace_s", "owners": [...],
                   "leases": [{"lease_id", "kind", "test_id", "bytes", "taken_at", "age_s", "owner"}],
                   "waiters": [{"ticket", "test_id", "bytes", "count", "exclusive", "since",
                                "waited_s", "owner"}],
                   "history": [{"at", "event", "text"}]}]}

    ``owner`` entries carry key, pid, host, start_time, session_id, worker_id, command and
    usable_bytes; ``index`` is None here (it is the session's numbering; :meth:`Ledger.snapshot`
    fills it). ``unverifiable`` lists the owners whose liveness could not be checked (their
    liveness file is missing or cannot be opened), each trusted for ``trusted_for_s`` more.
    A missing folder reads as empty. Raises :class:`~pytest_gpushare.errors.LockTimeout`, naming
    the holder, when a ledger stays locked for ``lock_timeout`` seconds.
    """
    path = Path(folder) if folder is not None else default_ledger_dir()
    if not path.exists() and not path.is_symlink():
        return {
            "folder": str(path),
            "taken_at": time.time(),
            "gpus": [],
            "reclaimed": [],
            "repaired": [],
            "unverifiable": [],
        }
    say = log if log is not None else (lambda _line: None)
    with open_ledger_folder(path, create=False) as checked:
        acc = Access(
            checked,
            say,
            f"status{os.getpid()}",
            lambda s: f"GPU {s.uuid}" + (f" ({s.name})" if s.name else ""),
        )
        states = []
        for name in sorted(n for n in acc.listing() if n.startswith("gpu-") and n.endswith(".json")):
            with locked(checked, [name[: -len(".json")] + ".lock"], lock_timeout, say):
                state = _status_of(acc, name)
            if state is not None:
                states.append(state)
        acc.sweep(listed={key for state in states for key in _keys(state)})
        return describe(
            str(checked.path),
            states,
            taken_at=time.time(),
            reclaimed=acc.reclaimed,
            repaired=acc.repaired,
            unverifiable=list(acc.unverifiable.values()),
            index={},
        )


def _status_of(acc: Access, name: str) -> GpuState | None:
    """The ledger file ``name`` loaded, reclaimed and saved (the caller holds its lock); None when
    it was unreadable and no live owner uses its GPU (it is set aside)."""
    try:
        uuid = _peek_uuid(read_file(acc.folder, name))
    except (FileTooLarge, Unusable, Damaged):
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
    if changed:
        acc.save(state)
    return state


def _keys(state: GpuState) -> set[str]:
    return set(state.owners) | {b.owner for b in state.bookings} | {w.owner for w in state.waiters}


def _peek_uuid(data: bytes | None) -> str | None:
    try:
        parsed = json.loads(unframe(LEDGER_FRAME, data or b"")[0])
    except (BadFrame, ValueError, RecursionError):
        return None
    uuid = parsed.get("uuid") if isinstance(parsed, dict) else None
    return uuid if isinstance(uuid, str) else None


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
