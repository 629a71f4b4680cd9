"""File-locked lease ledgers shared by every process and session on the box.

Library level: no pytest here. Any process that wants GPU memory opens a :class:`Ledger` on the
shared ledger folder and calls :meth:`Ledger.acquire` / :meth:`Ledger.release`; the rules of who
may take what are in :mod:`pytest_gpushare.ledger.admission` (fairness and its bound included).

Files in the folder:

* ``gpu-<uuid>.json`` per GPU, guarded by ``gpu-<uuid>.lock`` (kernel flock; filelock takes a
  free lock, a busy one is waited for in the kernel: :mod:`.ledgerfs`): the owners that use the
  GPU with the usable memory their sessions computed, the bookings (test leases and CUDA
  contexts) and the waiters (:mod:`.ledgerstate`). Replaced atomically under the lock (a
  reader never sees half a file), framed with a checksum so that damage reads as damage, and
  with a generation number that grows with every write.
* ``live-<key>.lock`` per owning process, flocked for its whole life (:mod:`.liveness`): a
  booking or waiter whose owner's lock can be taken belongs to a dead process and is reclaimed,
  with a log line, at the next access of any process (:mod:`.ledgeraccess`; a process that
  found that owner alive within :data:`ALIVE_MAX_AGE_S` trusts that verdict). Its content is
  what the owner holds, written before a grant reaches a ledger: the source of truth for
  rebuilding a damaged ledger. Each process also re-checks its own bookings in every ledger it
  touches, and restores what is missing.

Every access locks the ledgers of the GPUs it touches in sorted order (so two processes never
wait on each other in a cycle), which makes a multi-GPU lease all-or-nothing.

Waiting: a request that cannot be served registers as a waiter on each candidate GPU (visible to
``gpushare status`` and the controller's "waiting" lines) and sleeps with bounded back-off
(:data:`BACKOFF_MIN_S` doubling to :data:`BACKOFF_MAX_S`), looking at the candidate ledgers'
header lines (their generation changes with every write) and retrying when one changed, and at
least every :data:`FULL_CHECK_S`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_gpushare.errors import LeaseTimeout, LedgerError, NeverFits
from pytest_gpushare.ledger.access import (
    LOCK_TIMEOUT_S,
    Access,
    describe,
    ledger_name,
    lock_name,
    read_status,
    waiting_lines,
)
from pytest_gpushare.ledger.admission import (
    FAIR_AFTER_S,
    Fit,
    LedgerGpu,
    Need,
    evaluate,
    gpu_label,
    never_fits,
    place,
)
from pytest_gpushare.ledger.folder import (
    default_ledger_dir,
    locked,
    open_ledger_folder,
    prepare_ledger_dir,
    read_head,
)
from pytest_gpushare.ledger.liveness import Liveness, Owner
from pytest_gpushare.ledger.records import (
    CONTEXT,
    TEST,
    UNKNOWN,
    Booking,
    GpuState,
    Holdings,
    OwnerRecord,
    Waiter,
    dump_holdings,
)
from pytest_gpushare.units import format_size

__all__ = [
    "FAIR_AFTER_S",
    "Lease",
    "Ledger",
    "LedgerGpu",
    "Need",
    "Owner",
    "default_ledger_dir",
    "ledger_name",
    "prepare_ledger_dir",
    "read_status",
    "waiting_lines",
]

#: A waiter retries at least this often even when no ledger changed (dead owners, aging).
FULL_CHECK_S = 0.5
#: While a request waits, fresh usable memory is asked for at most this often.
REFRESH_S = 2.0
BACKOFF_MIN_S = 0.001
BACKOFF_MAX_S = 0.025
#: An owner found alive is probed again after this long at the earliest. Probing every owner in
#: every access cost more than the rest of the access with many processes; a dead owner's memory
#: is reclaimed this much later at most (never handed out while it may be in use).
ALIVE_MAX_AGE_S = 0.2
CONTEXT_TEST_ID = "CUDA context"


@dataclass(frozen=True)
class Lease:
    """Granted memory: ``parts`` are ``(gpu uuid, bytes)`` in the order the holder should use them."""

    lease_id: str
    test_id: str
    owner: Owner
    parts: tuple[tuple[str, int], ...]
    taken_at: float
    waited_s: float
    exclusive: bool = False


@dataclass
class _Pass:
    acc: Access
    states: dict[str, GpuState]
    dirty: set[str] = field(default_factory=set)
    holdings_first: bool = False  # a grant: holdings are written before the ledgers
    holdings_after: bool = False  # a release: after them


class Ledger:
    """This process's handle on the shared ledgers of ``gpus``; see the module docstring.

    ``log`` receives one line per reclaim, repair or restore. ``refresh`` returns fresh usable
    bytes per GPU uuid; it is called at most every :data:`REFRESH_S` while a request waits
    (strangers may free memory). Thread-safe; a forked child must open its own ledger.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        gpus: Sequence[LedgerGpu],
        owner: Owner,
        *,
        context_bytes: int,
        policy: str = "spread",
        log: Callable[[str], None] | None = None,
        refresh: Callable[[], Mapping[str, int]] | None = None,
        fair_after: float = FAIR_AFTER_S,
        lock_timeout: float = LOCK_TIMEOUT_S,
    ) -> None:
        if policy not in ("spread", "pack"):
            raise ValueError(f"policy must be 'spread' or 'pack', not {policy!r}")
        if context_bytes < 0:
            raise ValueError(f"context_bytes cannot be negative: {context_bytes}")
        self._gpus = {g.uuid: g for g in gpus}
        if len(self._gpus) != len(gpus):
            raise ValueError("two GPUs share a uuid")
        self._folder = open_ledger_folder(folder)
        self.owner = owner
        self._usable = {g.uuid: max(0, g.usable_bytes) for g in gpus}
        self._context_bytes = context_bytes
        self._policy = policy
        self._log = log if log is not None else (lambda _line: None)
        self._refresh = refresh
        self._fair_after = fair_after
        self._lock_timeout = lock_timeout
        self._pid = os.getpid()
        self._joined_at = time.time()
        self._mutex = threading.RLock()
        self._held: dict[str, list[Booking]] = {}
        self._tickets: set[str] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._holdings_suspect = False
        self._live = Liveness(self._folder, owner, self._holdings())
        try:
            with self._pass(list(self._gpus)) as p:
                p.acc.sweep()
        except BaseException:
            self._live.close()
            raise

    @property
    def folder(self) -> Path:
        return self._folder.path

    @property
    def gpus(self) -> tuple[LedgerGpu, ...]:
        return tuple(self._gpus.values())

    def set_usable(self, usable: Mapping[str, int]) -> None:
        """Record fresh usable bytes per GPU uuid; ledgers see them at this process's next access."""
        with self._mutex:
            for uuid, value in usable.items():
                if uuid in self._usable:
                    self._usable[uuid] = max(0, int(value))

    # --- the public cycle ------------------------------------------------------------------

    def acquire(self, need: Need, test_id: str, timeout: float) -> Lease:
        """Lease ``need`` for ``test_id``, waiting up to ``timeout`` seconds (negative or
        infinite: no limit). Raises :class:`NeverFits` at once when no wait could help, and
        :class:`LeaseTimeout`, naming who holds the GPUs, when the wait runs out."""
        with self._mutex:
            self._check_usable()
        candidates = self._candidates(need)
        self._never_fits(need, candidates, test_id)
        ticket = f"{self.owner.key}-w{next(self._ids)}"
        since = time.time()
        start = time.monotonic()
        deadline = start + timeout if timeout >= 0 and math.isfinite(timeout) else math.inf
        self._tickets.add(ticket)
        registered = False
        lease: Lease | None = None
        try:
            if need.count == 1 and need.prefer in candidates and len(candidates) > 1:
                lease, _ = self._attempt(need, [need.prefer], test_id, ticket, since, start, register=False)
                if lease is not None:
                    return lease
            delay = BACKOFF_MIN_S
            refreshed = start
            while True:
                register = time.monotonic() < deadline
                lease, view = self._attempt(
                    need, candidates, test_id, ticket, since, start, register=register
                )
                if lease is not None:
                    return lease
                registered = registered or register
                checked = time.monotonic()
                seen = self._signature(candidates)
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        raise self._timed_out(need, test_id, now - start, view)
                    time.sleep(min(delay, deadline - now))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    now = time.monotonic()
                    if self._refresh is not None and now - refreshed >= REFRESH_S:
                        self._do_refresh()
                        refreshed = now
                        break
                    if (
                        now >= deadline
                        or now - checked >= FULL_CHECK_S
                        or self._signature(candidates) != seen
                    ):
                        break
        finally:
            self._tickets.discard(ticket)
            if registered and lease is None:
                # Reconciling drops waiters whose ticket is gone; a failure here leaves the record
                # to this process's next access, which drops it the same way.
                try:
                    with self._pass(candidates):
                        pass
                except LedgerError as exc:
                    self._log(f"gpushare: could not withdraw the wait of {test_id}: {exc}")

    def release(self, lease: Lease) -> None:
        """Give the lease back (idempotent). The process's CUDA context bookings stay."""
        if lease.owner.key != self.owner.key:
            raise ValueError(f"lease {lease.lease_id} belongs to another owner ({lease.owner.key})")
        with self._mutex:
            self._check_usable()
            uuids = [
                u for u, _ in lease.parts if any(b.lease_id == lease.lease_id for b in self._held.get(u, ()))
            ]
            if not uuids:
                return
            for uuid in uuids:
                self._held[uuid] = [b for b in self._held[uuid] if b.lease_id != lease.lease_id]
            with self._pass(uuids) as p:
                p.holdings_after = True

    def snapshot(self) -> dict[str, Any]:
        """The ledgers of this ledger's GPUs after reclaiming the dead: see :func:`read_status`."""
        with self._pass(list(self._gpus)) as p:
            index = {u: g.index for u, g in self._gpus.items()}
            return describe(self._folder, [p.states[u] for u in sorted(p.states)], p.acc, index)

    def close(self) -> None:
        """Drop this process's bookings, waiters and liveness (idempotent)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                return
            key = self.owner.key
            try:
                with locked(self._folder, [lock_name(u) for u in self._gpus], self._lock_timeout):
                    acc = self._access()
                    for uuid in sorted(self._gpus):
                        state, _ = acc.load(uuid)
                        acc.reclaim(state)
                        state.owners.pop(key, None)
                        state.bookings = [b for b in state.bookings if b.owner != key]
                        state.waiters = [w for w in state.waiters if w.owner != key]
                        acc.save(state)
            finally:
                self._held.clear()
                self._live.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one locked access ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise LedgerError(f"this ledger belongs to process {self._pid}; a forked child must open its own")
        if self._closed:
            raise LedgerError("this ledger is closed")

    def _label(self, state: GpuState) -> str:
        gpu = self._gpus.get(state.uuid)
        return f"GPU {state.uuid}" if gpu is None else gpu_label(gpu)

    def _access(self) -> Access:
        return Access(self._folder, self._log, self.owner.key, self._label, ALIVE_MAX_AGE_S)

    @contextlib.contextmanager
    def _pass(self, uuids: Sequence[str]) -> Iterator[_Pass]:
        """Lock ``uuids``' ledgers, load them, reclaim the dead, reconcile this process's own
        records; the body decides; then write what changed (holdings in the safe order)."""
        with self._mutex:
            self._check_usable()
            if self._live.ensure():
                self._log("gpushare: the liveness file of this process had been removed; recreated it")
            with locked(self._folder, [lock_name(u) for u in uuids], self._lock_timeout):
                acc = self._access()
                p = _Pass(acc, {})
                for uuid in sorted(set(uuids)):
                    state, changed = acc.load(uuid)
                    changed = acc.reclaim(state) or changed
                    changed = acc.resolve_unknown(state) or changed
                    changed = self._reconcile(state) or changed
                    p.states[uuid] = state
                    if changed:
                        p.dirty.add(uuid)
                yield p
                if p.holdings_first:
                    self._write_holdings()
                for uuid in sorted(p.dirty):
                    acc.save(p.states[uuid])
                if p.holdings_after or self._holdings_suspect:
                    self._holdings_suspect = False
                    try:
                        self._write_holdings()
                    except LedgerError as exc:
                        # Stale holdings only err on the safe side (they list more).
                        self._log(f"gpushare: could not update this process's holdings: {exc}")

    def _owner_record(self, uuid: str) -> OwnerRecord:
        o = self.owner
        usable = self._usable[uuid]
        return OwnerRecord(
            o.key, o.pid, o.host, o.start_time, o.session_id, o.worker_id, o.command, usable, self._joined_at
        )

    def _reconcile(self, state: GpuState) -> bool:
        """Make the ledger show exactly what this process holds and waits for; True if it changed."""
        changed = False
        gpu = self._gpus[state.uuid]
        key = self.owner.key
        if (state.name, state.total_bytes) != (gpu.name, gpu.total_bytes):
            state.name, state.total_bytes = gpu.name, gpu.total_bytes
            changed = True
        record = self._owner_record(state.uuid)
        if state.owners.get(key) != record:
            state.owners[key] = record
            changed = True
        mine = [b for b in state.bookings if b.owner == key]
        if any(b.kind == UNKNOWN for b in mine):
            # A rebuild could not read our holdings: write them again.
            self._holdings_suspect = True
        wanted = self._held.get(state.uuid, [])
        if set(mine) != set(wanted):
            missing = [b for b in wanted if b not in mine]
            if missing:
                text = (
                    f"gpushare: the ledger of {self._label(state)} lacked {len(missing)} booking(s) of this "
                    f"process ({', '.join(b.test_id for b in missing)}); restored them"
                )
                self._log(text)
                state.remember(time.time(), "restored", text)
            state.bookings = [b for b in state.bookings if b.owner != key] + list(wanted)
            changed = True
        stale = [w for w in state.waiters if w.owner == key and w.ticket not in self._tickets]
        if stale:
            state.waiters = [w for w in state.waiters if w not in stale]
            changed = True
        return changed

    def _holdings(self) -> bytes:
        o = self.owner
        record = OwnerRecord(
            o.key, o.pid, o.host, o.start_time, o.session_id, o.worker_id, o.command, None, self._joined_at
        )
        return dump_holdings(Holdings(owner=record, usable=dict(self._usable), bookings=self._held))

    def _write_holdings(self) -> None:
        self._live.write(self._holdings())

    # --- deciding ---------------------------------------------------------------------------

    def _candidates(self, need: Need) -> list[str]:
        if need.count < 1:
            raise ValueError(f"count must be at least 1, not {need.count}")
        if need.allowed is None:
            uuids = list(self._gpus)
        else:
            unknown = [u for u in need.allowed if u not in self._gpus]
            if unknown:
                raise ValueError(f"unknown GPU(s) in allowed: {', '.join(unknown)}")
            uuids = list(dict.fromkeys(need.allowed))
        if need.prefer is not None and need.prefer not in self._gpus:
            raise ValueError(f"unknown preferred GPU {need.prefer}")
        return sorted(uuids, key=lambda u: self._gpus[u].index)

    def _never_fits(self, need: Need, candidates: list[str], test_id: str) -> None:
        reason = never_fits(need, [self._gpus[u] for u in candidates], self._context_bytes, test_id)
        if reason is not None:
            raise NeverFits(reason)

    def _attempt(
        self,
        need: Need,
        candidates: list[str],
        test_id: str,
        ticket: str,
        since: float,
        start: float,
        *,
        register: bool,
    ) -> tuple[Lease | None, list[tuple[GpuState, Fit]]]:
        """One locked try; on failure, what the candidate GPUs looked like."""
        lease_id = None
        try:
            with self._pass(candidates) as p:
                now = time.time()
                fits = {
                    u: evaluate(
                        p.states[u],
                        self._gpus[u],
                        need,
                        owner=self.owner.key,
                        context_bytes=self._context_bytes,
                        ticket=ticket,
                        since=since,
                        now=now,
                        fair_after=self._fair_after,
                    )
                    for u in candidates
                }
                index = {u: g.index for u, g in self._gpus.items()}
                chosen = place(need, fits, candidates, self._policy, index)
                if chosen is None:
                    if register:
                        for uuid in candidates:
                            if self._upsert_waiter(p.states[uuid], need, test_id, ticket, since, fits[uuid]):
                                p.dirty.add(uuid)
                    return None, [(p.states[u], fits[u]) for u in candidates]
                lease_id = f"{self.owner.key}-{next(self._ids)}"
                parts = []
                for uuid in chosen:
                    fit = fits[uuid]
                    new = [Booking(lease_id, self.owner.key, test_id, fit.grant, TEST, now)]
                    if fit.context:
                        key = self.owner.key
                        new.insert(0, Booking(f"{key}-ctx", key, CONTEXT_TEST_ID, fit.context, CONTEXT, now))
                    self._held.setdefault(uuid, []).extend(new)
                    p.states[uuid].bookings.extend(new)
                    parts.append((uuid, fit.grant))
                for uuid in candidates:
                    state = p.states[uuid]
                    state.waiters = [w for w in state.waiters if w.ticket != ticket]
                    p.dirty.add(uuid)
                p.holdings_first = True
                waited = time.monotonic() - start
                return Lease(lease_id, test_id, self.owner, tuple(parts), now, waited, need.exclusive), []
        except BaseException:
            if lease_id is not None:
                # Nothing of it may count as held; the next access reconciles the ledgers.
                for uuid in self._held:
                    self._held[uuid] = [b for b in self._held[uuid] if b.lease_id != lease_id]
                with contextlib.suppress(LedgerError):
                    self._write_holdings()
            raise

    def _upsert_waiter(
        self, state: GpuState, need: Need, test_id: str, ticket: str, since: float, fit: Fit
    ) -> bool:
        want = need.mem.resolve(self._gpus[state.uuid].total_bytes)
        waiter = Waiter(ticket, self.owner.key, test_id, want, fit.context, need.count, need.exclusive, since)
        if waiter in state.waiters:
            return False
        state.waiters = [w for w in state.waiters if w.ticket != ticket] + [waiter]
        return True

    def _signature(self, uuids: Sequence[str]) -> tuple[bytes | None, ...]:
        """What tells the ledger files' versions apart: their header lines, whose generation and
        checksum change with every write (a rebuilt file starts over, with another checksum)."""
        return tuple(read_head(self._folder, ledger_name(uuid)) for uuid in uuids)

    def _do_refresh(self) -> None:
        assert self._refresh is not None
        try:
            fresh = self._refresh()
        except Exception as exc:  # the caller's probe (NVML, ...) must not break a wait
            self._log(f"gpushare: could not refresh usable memory: {exc}")
            return
        self.set_usable(fresh)

    def _timed_out(
        self, need: Need, test_id: str, waited: float, view: list[tuple[GpuState, Fit]]
    ) -> LeaseTimeout:
        reasons = [f"{self._label(state)}: {fit.why}" for state, fit in view if fit.why]
        holders = []
        for state, _ in view:
            for b in state.bookings:
                if b.kind == CONTEXT:
                    continue
                owner = state.owners.get(b.owner)
                who = (
                    f"session {owner.session_id}, worker {owner.worker_id}, pid {owner.pid}"
                    if owner
                    else b.owner
                )
                holders.append(f"{b.test_id} ({format_size(b.bytes)} on {self._label(state)}, {who})")
        message = f"{test_id}: no GPU memory for {need.describe()} after waiting {waited:.1f}s"
        if reasons:
            message += " (" + "; ".join(reasons) + ")"
        return LeaseTimeout(message, waited, tuple(holders))
