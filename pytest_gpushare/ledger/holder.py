"""This process as a holder of leases: its liveness lock, and what it holds and waits for.

A :class:`Holder` keeps the bookings the process holds on each GPU, the tickets of its requests
that wait, and the usable memory its session computed per GPU. It writes them as the owner's
holdings into its liveness file (:mod:`.liveness`): before a grant reaches a ledger (and before a
new usable figure does) and after a release has left one, so the holdings never list less than
the ledgers do, nor a larger limit; other processes hold every ledger to them
(:mod:`.owners`). And it makes every ledger it touches show exactly that
(:meth:`Holder.reconcile`), restoring what is missing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.admission import LedgerGpu
from pytest_gpushare.ledger.codec import dump_holdings
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.ledger.liveness import Liveness
from pytest_gpushare.ledger.records import UNKNOWN, Booking, GpuState, Holdings, Owner

__all__ = ["Holder"]


class Holder:
    """What ``owner`` (this process) holds and waits for on ``gpus``, behind its liveness lock in
    ``folder`` (held until :meth:`close`). Not thread-safe: the caller serialises."""

    def __init__(
        self,
        folder: LedgerFolder,
        owner: Owner,
        gpus: Mapping[str, LedgerGpu],
        log: Callable[[str], None],
        label: Callable[[GpuState], str],
    ) -> None:
        self._gpus = gpus
        self._log = log
        self._label = label
        self.usable = {uuid: max(0, g.usable_bytes) for uuid, g in gpus.items()}
        #: The owner as its holdings record it (the ledgers add its usable memory on their GPU).
        self.record = dataclasses.replace(owner, usable_bytes=None, joined_at=time.time())
        self.held: dict[str, list[Booking]] = {}
        self.tickets: set[str] = set()
        self._suspect = False  # a rebuild could not read the holdings: write them again
        self._stale = False  # the usable memory changed since the holdings were written
        self._live = Liveness(folder, owner, self._holdings())

    @property
    def liveness_fd(self) -> int:
        """The descriptor that holds this owner's liveness lock."""
        return self._live.fd

    def set_usable(self, usable: Mapping[str, int]) -> None:
        for uuid, value in usable.items():
            if uuid in self.usable and self.usable[uuid] != max(0, int(value)):
                self.usable[uuid] = max(0, int(value))
                self._stale = True

    def hold(self, uuid: str, bookings: Iterable[Booking]) -> None:
        self.held.setdefault(uuid, []).extend(bookings)

    def unhold(self, lease_id: str) -> None:
        for uuid in self.held:
            self.held[uuid] = [b for b in self.held[uuid] if b.lease_id != lease_id]

    def lost(self) -> bool:
        """Whether the liveness file was removed (others cannot see this owner alive)."""
        return self._live.lost()

    def ensure_live(self, folder: LedgerFolder) -> None:
        """Put the liveness file back in ``folder`` if it is gone from there (other processes
        would soon take us for dead)."""
        if self._live.ensure(folder):
            self._log("gpushare: the liveness file of this process had been removed; recreated it")

    def write(self) -> None:
        """Write the holdings as they are now."""
        self._live.write(self._holdings())
        self._stale = False

    def write_first(self) -> bool:
        """Before the ledgers are saved: write the holdings if the usable memory changed since
        they were written (a larger limit must never reach a ledger before the holdings)."""
        if self._stale:
            self.write()
            return True
        return False

    def write_after(self, release: bool) -> None:
        """Write the holdings once the ledgers are saved, after a ``release`` or when a rebuild
        could not read them; a failure is logged, not raised."""
        if not (release or self._suspect):
            return
        self._suspect = False
        try:
            self.write()
        except LedgerError as exc:
            # Stale holdings only err on the safe side (they list more).
            self._log(f"gpushare: could not update this process's holdings: {exc}")

    def vacate(self) -> None:
        """Before leaving the ledgers: turn the liveness file into this owner's tombstone, lock
        still held, so that nobody puts it back into a ledger it is leaving, and any process
        that finds what it leaves behind reclaims it at once."""
        self._live.vacate()

    def close(self, *, tombstone: bool = False) -> None:
        """Forget what is held, give the liveness lock up and remove the owner's files (keeping
        the tombstone of :meth:`vacate` when the ledgers may still list this owner)."""
        self.held.clear()
        self._live.close(tombstone=tombstone)

    def _holdings(self) -> bytes:
        return dump_holdings(Holdings(owner=self.record, usable=dict(self.usable), bookings=self.held))

    def reconcile(self, state: GpuState) -> bool:
        """Make the ledger show exactly what this process holds and waits for; True if it changed."""
        changed = False
        gpu = self._gpus[state.uuid]
        key = self.record.key
        if (state.name, state.total_bytes) != (gpu.name, gpu.total_bytes):
            state.name, state.total_bytes = gpu.name, gpu.total_bytes
            changed = True
        record = dataclasses.replace(self.record, usable_bytes=self.usable.get(state.uuid))
        if state.owners.get(key) != record:
            state.owners[key] = record
            changed = True
        changed = self._restore(state) or changed
        stale = [w for w in state.waiters if w.owner == key and w.ticket not in self.tickets]
        if stale:
            state.waiters = [w for w in state.waiters if w not in stale]
            changed = True
        return changed

    def _restore(self, state: GpuState) -> bool:
        """Make the ledger list exactly this process's bookings on its GPU; True if it changed."""
        key = self.record.key
        mine = [b for b in state.bookings if b.owner == key]
        if any(b.kind == UNKNOWN for b in mine):
            # A rebuild could not read our holdings: write them again.
            self._suspect = True
        wanted = self.held.get(state.uuid, [])
        if set(mine) == set(wanted):
            return False
        missing = [b for b in wanted if b not in mine]
        if missing:
            text = (
                f"gpushare: the ledger of {self._label(state)} lacked {len(missing)} booking(s) of this "
                f"process ({', '.join(b.test_id for b in missing)}); restored them"
            )
            self._log(text)
            state.remember(time.time(), "restored", text)
        state.bookings = [b for b in state.bookings if b.owner != key] + list(wanted)
        return True
