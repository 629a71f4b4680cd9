"""One access to the ledger folder under its locks: load (repairing damage), check the ledger
against the live owners' holdings, reclaim the dead, save.

* **Damage.** A ledger that is unreadable (garbage, truncated, wrong types, too large) or that
  is not a file we trust (a directory, a FIFO, a symbolic link, a file others may write) is
  renamed aside, with a log line, and rebuilt from the holdings of the owners still alive
  (:mod:`.owners`). A live owner whose holdings cannot be read is assumed to hold the whole GPU
  (a placeholder booking) until it rewrites its bookings itself: never guess low.
* **Truth.** The owners' holdings are the source of truth: each access makes the ledger list
  what every live owner's holdings list on its GPU, and record the usable memory they record,
  so a well-formed ledger that leaves a live holder's booking out, or raises the limit, does not
  last beyond the next access (:func:`pytest_gpushare.ledger.owners.reconcile`).
* **Grace.** A ledger made anew (it was missing or damaged) while a live process still keeps a
  removed liveness file of this folder open, as the kernel shows (:func:`.procfs.lost_owners`),
  lacks that owner's bookings until it comes back; so it admits only restores for up to
  ``grace_s`` (:data:`GRACE_S`), ending as soon as no such process is left. NFS lock recovery is
  the model: after a server restart, clients reclaim their locks in a grace period before anyone
  may take new ones. Where the kernel cannot tell (another account's processes in a group
  folder, no ``/proc``) the whole grace period applies.
* **The dead.** An owner whose liveness lock is free is dead: its bookings and waiters are
  dropped with a log line. One whose liveness cannot be verified (its file is missing or cannot
  be opened) is trusted for ``trust_s`` (:data:`UNVERIFIED_TRUST_S`) from when this process
  first saw it so, then taken for dead the same way; status lists it as unverifiable meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

from pytest_gpushare.ledger.codec import Damaged, dump_gpu_state, parse_gpu_state
from pytest_gpushare.ledger.files import (
    FileTooLarge,
    Unusable,
    listing,
    read_file,
    remove_file,
    remove_stale_temps,
    set_aside,
    write_file,
)
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.liveness import live_name
from pytest_gpushare.ledger.owners import rebuild, reconcile
from pytest_gpushare.ledger.probe import (
    ALIVE,
    DEAD,
    Verdict,
    holdings_of,
    probe,
    remove_owner_files,
    unverified_since,
)
from pytest_gpushare.ledger.procfs import lost_owners
from pytest_gpushare.ledger.records import CONTEXT, KEY_RE, GpuState, Holdings
from pytest_gpushare.ledger.views import owner_summary
from pytest_gpushare.units import format_size

__all__ = ["GRACE_S", "LOCK_TIMEOUT_S", "UNVERIFIED_TRUST_S", "Access", "ledger_name", "lock_name"]

#: A ledger lock held longer than this means a hung or stopped process: fail loudly. Callers with
#: a deadline of their own (a lease request) wait no longer than that.
LOCK_TIMEOUT_S = 60.0
#: How long a ledger made anew admits only restores, at most, while a live owner may be missing.
GRACE_S = 10.0
#: How long an owner whose liveness cannot be verified is trusted, from when a process first
#: finds it so: a live owner puts a removed liveness file back within a second.
UNVERIFIED_TRUST_S = 10.0
#: Why a dead owner's memory is reclaimed: as a log line says it, and as status records it.
_GONE_LINE = "its process is gone"
_GONE_REASON = "its process is gone (its liveness lock was free)"


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
    """One access to some ledgers, under their locks: loads (repairing damage), reconciles with
    the owners' holdings, reclaims the dead, saves, and keeps what it reclaimed, repaired and
    could not verify for the caller to report.

    ``alive_max_age_s``: how old a verdict "alive" on an owner may be (0: probe every owner
    anew); ``trust_s`` and ``grace_s``: see the module docstring; ``me``: the key of this
    process's owner, whose bookings :mod:`.holder` keeps, or None.
    """

    def __init__(
        self,
        folder: LedgerFolder,
        log: Callable[[str], None],
        tag: str,
        label: Callable[[GpuState], str],
        *,
        alive_max_age_s: float = 0.0,
        trust_s: float = UNVERIFIED_TRUST_S,
        grace_s: float = GRACE_S,
        me: str | None = None,
    ) -> None:
        self.folder = folder
        self.log = log
        self.tag = tag
        self.label = label
        self.alive_max_age_s = alive_max_age_s
        self.trust_s = trust_s
        self.grace_s = grace_s
        self.me = me
        self.now = time.time()
        self.reclaimed: list[dict[str, Any]] = []
        self.repaired: list[dict[str, Any]] = []
        #: Owners this access could not verify but still trusts: key -> what status shows.
        self.unverifiable: dict[str, dict[str, Any]] = {}
        self._verdicts: dict[str, Verdict] = {}
        self._gone: dict[str, str] = {}  # dead key -> why
        self._listing: list[str] | None = None
        self._removed: set[str] = set()

    # --- owners -----------------------------------------------------------------------------

    def verdict(self, key: str) -> Verdict:
        """Whether ``key`` lives, probed once per access; junk in its liveness file's place is
        set aside here."""
        found = self._verdicts.get(key)
        if found is None:
            found = self._verdicts[key] = probe(self.folder, key, self.alive_max_age_s)
            if found.junk is not None:
                aside = set_aside(self.folder, live_name(key))
                self.log(
                    f"gpushare: {self.folder.path / live_name(key)} was {found.junk}; moved it to {aside}"
                )
                self.repaired.append({"uuid": None, "reason": found.junk, "moved_to": aside})
                self._listing = None
        return found

    def alive(self, key: str) -> bool:
        """Whether to count ``key`` as live: verified alive, or unverifiable for less than
        ``trust_s`` as far as this process knows."""
        found = self.verdict(key)
        if found.state == ALIVE:
            return True
        if found.state == DEAD:
            return False
        left = self.trust_s - (time.monotonic() - unverified_since(self.folder, key))
        if left > 0:
            self.unverifiable[key] = {"key": key, "why": found.why, "trusted_for_s": round(left, 1)}
            return True
        self._gone[key] = f"its liveness could not be verified for {self.trust_s:.0f}s ({found.why})"
        return False

    def holdings(self, key: str) -> Holdings | None:
        """A live owner's holdings; None when its file is gone; :class:`Damaged` when unreadable."""
        return holdings_of(self.folder, key)

    def listing(self) -> list[str]:
        if self._listing is None:
            self._listing = listing(self.folder)
        return self._listing

    def owner_keys(self) -> list[str]:
        """Keys of the owners that have a liveness file in the folder."""
        names = (n[len("live-") : -len(".lock")] for n in self.listing() if n.startswith("live-"))
        return [k for k in names if KEY_RE.match(k)]

    # --- one ledger -------------------------------------------------------------------------

    def load(self, uuid: str) -> tuple[GpuState, bool]:
        """The GPU's ledger, checked against the live owners' holdings (see the module
        docstring), and whether it must be saved."""
        name = ledger_name(uuid)
        try:
            data = read_file(self.folder, name)
            reason = None
        except (Damaged, FileTooLarge, Unusable) as exc:
            data, reason = None, str(exc)
        if data is not None:
            try:
                state = parse_gpu_state(data, uuid)
            except Damaged as exc:
                reason = str(exc)
            else:
                changed = reconcile(self, state)
                return state, self._grace_kept(state) or changed
        if reason is None:
            state = rebuild(self, uuid)
            if state.bookings:  # not a new GPU: someone removed a ledger in use
                self._repaired(state, "missing", None, "was missing;")
        else:
            aside = set_aside(self.folder, name)
            self._listing = None
            state = rebuild(self, uuid)
            self._repaired(state, reason, aside, f"was unreadable ({reason}); moved it to {aside} and")
        self._grace_begun(state)
        return state, True

    def _repaired(self, state: GpuState, reason: str, aside: str | None, what: str) -> None:
        text = (
            f"gpushare: the ledger of {self.label(state)} {what} rebuilt it from the "
            f"{len(state.owners)} live owner(s) that use it"
        )
        self.log(text)
        state.remember(self.now, "repaired", text)
        self.repaired.append({"uuid": state.uuid, "reason": reason, "moved_to": aside})

    def _grace_begun(self, state: GpuState) -> None:
        """Give a ledger made anew its grace period when a live owner may be missing from it."""
        if self.grace_s <= 0 or lost_owners(self.folder.dir, private=not self.folder.shared) is False:
            return
        state.grace_until = self.now + self.grace_s
        text = (
            f"gpushare: the ledger of {self.label(state)} was made anew while a live process may have "
            f"lost its liveness file here; it admits only restores for up to {self.grace_s:.0f}s, "
            "until its owners are back"
        )
        self.log(text)
        state.remember(self.now, "grace", text)

    def _grace_kept(self, state: GpuState) -> bool:
        """End the grace period once no owner can be missing any more; True if it changed."""
        if not state.grace_until:
            return False
        if state.grace_until > self.now + self.grace_s:
            state.grace_until = self.now + self.grace_s  # nobody may extend it past our own bound
            return True
        if (
            state.grace_until > self.now
            and lost_owners(self.folder.dir, private=not self.folder.shared) is not False
        ):
            return False
        state.grace_until = 0.0
        return True

    def reclaim(self, state: GpuState) -> bool:
        """Drop what dead owners hold or wait for; True if anything was dropped."""
        keys = set(state.owners) | {b.owner for b in state.bookings} | {w.owner for w in state.waiters}
        dead = {k for k in keys if not self.alive(k)}
        if not dead:
            return False
        where = self.label(state)
        for b in (b for b in state.bookings if b.owner in dead):
            what = "the CUDA context" if b.kind == CONTEXT else f"test {b.test_id}"
            why = self._why_gone(b.owner)
            text = (
                f"reclaimed {format_size(b.bytes)} on {where} held by {what} ({_who(state, b.owner)}): {why}"
            )
            self._record(state, text, b.kind, b.test_id, b.bytes, b.owner)
        for w in (w for w in state.waiters if w.owner in dead):
            why = self._why_gone(w.owner)
            text = f"dropped the wait of {w.test_id} for {where} ({_who(state, w.owner)}): {why}"
            self._record(state, text, "waiter", w.test_id, w.bytes, w.owner)
        state.owners = {k: o for k, o in state.owners.items() if k not in dead}
        state.bookings = [b for b in state.bookings if b.owner not in dead]
        state.waiters = [w for w in state.waiters if w.owner not in dead]
        for key in dead - self._removed:
            remove_owner_files(self.folder, key, self.listing())
            self._removed.add(key)
        return True

    def _why_gone(self, key: str) -> str:
        return self._gone.get(key, _GONE_LINE)

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
                "reason": self._gone.get(key, _GONE_REASON),
            }
        )

    def save(self, state: GpuState) -> None:
        state.generation += 1
        write_file(self.folder, ledger_name(state.uuid), dump_gpu_state(state), self.tag)

    def sweep(self, listed: set[str] | None = None) -> None:
        """Turn the files of dead owners into tombstones, and remove stale temporary files and
        tombstones; with ``listed`` (every owner key the folder's ledgers list, when the caller
        loaded them all), also the tombstones that no ledger needs any more."""
        for key in self.owner_keys():
            if key not in self._removed and not self.alive(key):
                remove_owner_files(self.folder, key, self.listing())
                self._removed.add(key)
        self._listing = None
        names = self.listing()
        if listed is not None:
            for name in names:
                if name.startswith("gone-") and name[len("gone-") : -len(".lock")] not in listed:
                    remove_file(self.folder, name)
        remove_stale_temps(self.folder, names, self.now)


def _who(state: GpuState, key: str) -> str:
    owner = state.owners.get(key)
    return owner.describe() if owner else f"owner {key}"
