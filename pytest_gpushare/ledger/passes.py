"""One locked pass of a process's :class:`~pytest_gpushare.ledger.handle.Ledger` over some of its
ledgers, and the process's presence in the folder.

A pass locks the ledgers of the GPUs it touches in sorted order (so two processes never wait on
each other in a cycle), loads them (:mod:`.access`: damage repaired, the ledger held to the live
owners' holdings, the dead reclaimed), makes each show exactly what this process holds
(:mod:`.holder`), lets its body decide, and writes back what changed, the holdings in the safe
order. Every wait of a pass, for this process's own mutex and for each lock, ends at the
caller's deadline.

**Presence.** Before each pass, and every :data:`~pytest_gpushare.ledger.liveness.WATCH_S` from
the watch thread, the process checks that it can be seen: that the folder at the path is still
the one it holds open, and its liveness file still there. A private folder that was removed is
made again (a replaced one is checked anew, and refused when unsafe; a removed group folder is
left to the admin who made it), the liveness file is put back
with the holdings, and a pass over every GPU of the ledger restores this process's bookings
(issue 15): promptly, not only at its next release.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pytest_gpushare.errors import LedgerError, LockTimeout
from pytest_gpushare.ledger.access import Access, lock_name
from pytest_gpushare.ledger.admission import LedgerGpu
from pytest_gpushare.ledger.folder import LedgerFolder, open_ledger_folder
from pytest_gpushare.ledger.holder import Holder
from pytest_gpushare.ledger.liveness import watch
from pytest_gpushare.ledger.locks import locked
from pytest_gpushare.ledger.records import GpuState, Owner
from pytest_gpushare.ledger.signals import WaitingLook, Watches

__all__ = [
    "ALIVE_MAX_AGE_S",
    "MIN_LOCK_WAIT_S",
    "OPEN_LOCK_S",
    "RELEASE_LOCK_S",
    "WITHDRAW_LOCK_S",
    "Pass",
    "Passes",
]

#: An owner found alive is probed again after this long at the earliest. Probing every owner in
#: every access cost more than the rest of the access with many processes; a dead owner's memory
#: is reclaimed this much later at most (never handed out while it may be in use).
ALIVE_MAX_AGE_S = 0.2
#: Even a request whose deadline has passed gets this long for the locks of its one last try:
#: ordinary contention lasts milliseconds.
MIN_LOCK_WAIT_S = 0.1
#: How long a release or a close waits for the ledgers' locks.
RELEASE_LOCK_S = 10.0
#: How long a request that ended withdraws its waiter records (its owner's next access drops
#: what is left).
WITHDRAW_LOCK_S = 0.5
#: How long opening a ledger waits for the locks of its first look (then it leaves it).
OPEN_LOCK_S = 1.0


@dataclass
class Pass:
    acc: Access
    states: dict[str, GpuState]
    dirty: set[str] = field(default_factory=set)
    holdings_first: bool = False  # a grant: holdings are written before the ledgers
    holdings_after: bool = False  # a release: after them
    lease_id: str | None = None  # the lease this pass grants, if any


class Passes:
    """The passes of one owner (this process) in the folder at ``path``; see the module docstring.

    ``lock_timeout`` caps every wait for a lock; ``trust_s`` and ``grace_s`` go to each
    :class:`~pytest_gpushare.ledger.access.Access`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        gpus: Mapping[str, LedgerGpu],
        owner: Owner,
        log: Callable[[str], None],
        label: Callable[[GpuState], str],
        *,
        lock_timeout: float,
        trust_s: float,
        grace_s: float,
    ) -> None:
        self.gpus = gpus
        self.log = log
        self.label = label
        self.lock_timeout = lock_timeout
        self.trust_s = trust_s
        self.grace_s = grace_s
        self.key = owner.key
        self.watches = Watches()  # this owner's idle watches on the folder, for its next waits
        self.waiting = WaitingLook(owner.session_id)  # whether other sessions wait, seen without locks
        self.mutex = threading.RLock()
        self.folder: LedgerFolder = open_ledger_folder(path)
        try:
            self.holder = Holder(self.folder, owner, gpus, log, label)
        except BaseException:
            self.folder.close()
            raise
        self._watch = watch(self._watch_tick)
        self.closed = False
        self.left = False  # leave() took this owner out of every ledger

    def access(self) -> Access:
        return Access(
            self.folder,
            self.log,
            self.key,
            self.label,
            alive_max_age_s=ALIVE_MAX_AGE_S,
            trust_s=self.trust_s,
            grace_s=self.grace_s,
            me=self.key,
        )

    @contextlib.contextmanager
    def run(self, uuids: Sequence[str], timeout: float | None = None) -> Iterator[Pass]:
        """Lock ``uuids``' ledgers within ``timeout`` (capped by ``lock_timeout``; raises
        :class:`~pytest_gpushare.errors.LockTimeout`), load them, reconcile this process's own
        records; the body decides; then write what changed (holdings in the safe order)."""
        wait = self.lock_timeout if timeout is None else max(MIN_LOCK_WAIT_S, min(timeout, self.lock_timeout))
        deadline = time.monotonic() + wait
        with self.exclusive(wait):
            self._present()
            left = max(0.0, deadline - time.monotonic())
            with locked(self.folder, [lock_name(u) for u in uuids], left, self.log):
                p = self._load(uuids)
                yield p
                self._write_back(p)

    @contextlib.contextmanager
    def exclusive(self, wait: float) -> Iterator[None]:
        """This owner's mutex (one pass at a time per process), waited for ``wait`` seconds at
        most (:class:`~pytest_gpushare.errors.LockTimeout`)."""
        if not self.mutex.acquire(timeout=wait):
            raise LockTimeout(
                f"could not begin an access to {self.folder.path} within {wait:.1f}s: another thread "
                "of this process is in one",
                str(self.folder.path),
                "another thread of this process",
            )
        try:
            yield
        finally:
            self.mutex.release()

    def _present(self) -> None:
        """Make sure other processes can see this owner: the folder at the path is the one held
        open, and the liveness file is in it (see the module docstring)."""
        if self.folder.moved():
            old = self.folder
            # A private folder is made again; a group folder is the admin's to make (made by one
            # member, it would be that member's private folder).
            self.folder = open_ledger_folder(old.path, create=not old.shared)
            self.holder.ensure_live(self.folder)
            old.close()
            self.log(
                f"gpushare: the ledger folder {old.path} had been removed or replaced; this process "
                "is back in it, with its bookings"
            )
            return
        self.holder.ensure_live(self.folder)

    def _load(self, uuids: Sequence[str]) -> Pass:
        p = Pass(self.access(), {})
        for uuid in sorted(set(uuids)):
            state, changed = p.acc.load(uuid)
            changed = p.acc.reclaim(state) or changed
            changed = self.holder.reconcile(state) or changed
            p.states[uuid] = state
            if changed:
                p.dirty.add(uuid)
        return p

    def _write_back(self, p: Pass) -> None:
        """Save the changed ledgers; this process's holdings before them for a grant or a new
        usable figure (they must never list less than the ledgers, nor a larger limit), after
        them for a release."""
        if p.holdings_first:
            self.holder.write()
        else:
            self.holder.write_first()
        for uuid in sorted(p.dirty):
            p.acc.save(p.states[uuid])
        self.holder.write_after(release=p.holdings_after)

    def leave(self, timeout: float) -> None:
        """Take this process's record, bookings and waiters out of the ledgers of its GPUs, its
        liveness file turned into a tombstone first (:meth:`Holder.vacate`)."""
        self.closed = True
        self._watch.stop()
        self.holder.vacate()
        with (
            self.exclusive(timeout),
            locked(self.folder, [lock_name(u) for u in self.gpus], timeout, self.log),
        ):
            acc = self.access()
            for uuid in sorted(self.gpus):
                state, _ = acc.load(uuid)
                acc.reclaim(state)
                state.owners.pop(self.key, None)
                state.bookings = [b for b in state.bookings if b.owner != self.key]
                state.waiters = [w for w in state.waiters if w.owner != self.key]
                acc.save(state)
        self.left = True

    def _watch_tick(self) -> None:
        """From the watch thread: when this owner cannot be seen any more (its liveness file or
        folder is gone), come back at once, with a pass over every GPU."""
        if self.closed or not self.mutex.acquire(blocking=False):
            return  # a pass is running, and checks the same first
        try:
            if not (self.holder.lost() or self.folder.moved()):
                return
            with self.run(list(self.gpus), timeout=self.lock_timeout):
                pass
        except (LedgerError, OSError) as exc:
            self.log(f"gpushare: could not restore this process's place in {self.folder.path}: {exc}")
        finally:
            self.mutex.release()

    def close(self) -> None:
        """Stop watching, give the liveness lock up and the folder back. Unless :meth:`leave`
        succeeded, the tombstone stays, for others to reclaim what the ledgers still list."""
        self.closed = True
        self._watch.stop()
        try:
            self.holder.close(tombstone=not self.left)
        finally:
            self.watches.close()
            self.folder.close()
