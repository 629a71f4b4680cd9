"""The :class:`Ledger` a process opens on the ledger folder: :meth:`Ledger.acquire`, :meth:`Ledger.release`.

Every access is one locked pass over the ledgers of the GPUs it touches (:mod:`.passes`), which
makes a multi-GPU lease all-or-nothing. A dead owner is reclaimed at any access (a process that
found an owner alive within :data:`~pytest_gpushare.ledger.passes.ALIVE_MAX_AGE_S` trusts that
verdict), every ledger is held to its live owners' holdings, and each process re-checks its own
records in every ledger it touches (:mod:`.holder`). The rules of who may take what are in
:mod:`.admission` (fairness and its bound included).

Every wait ends at its caller's deadline, whoever holds a lock: a request's lock waits end with
the request (:class:`~pytest_gpushare.errors.LeaseTimeout`, naming a lock holder that looks
frozen), a release's and a close's after :data:`~.passes.RELEASE_LOCK_S`. A release that cannot
reach the ledger (the folder takes no writes, its lock stays taken) raises
:class:`~pytest_gpushare.errors.ReleaseDeferred`: the lease stays booked, on the safe side, until
this process's next access succeeds or the process ends.

Waiting: a request that cannot be served registers as a waiter on each candidate GPU (seen by
``gpushare status`` and :meth:`Ledger.others_waiting`) and sleeps until a candidate ledger is
written (:class:`~.signals.Sleeper`), and at least every :data:`FULL_CHECK_S`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_gpushare.errors import LeaseTimeout, LedgerError, LockTimeout, NeverFits
from pytest_gpushare.ledger.access import GRACE_S, LOCK_TIMEOUT_S, UNVERIFIED_TRUST_S, ledger_name
from pytest_gpushare.ledger.admission import (
    FAIR_AFTER_S,
    Fit,
    LedgerGpu,
    Need,
    candidates,
    choose,
    gpu_label,
    never_fits,
    waiter_of,
)
from pytest_gpushare.ledger.passes import OPEN_LOCK_S, RELEASE_LOCK_S, WITHDRAW_LOCK_S, Pass, Passes
from pytest_gpushare.ledger.records import CONTEXT, TEST, Booking, GpuState, Lease, Owner
from pytest_gpushare.ledger.signals import Sleeper, read_states
from pytest_gpushare.ledger.status import STATUS_LOCK_TIMEOUT_S, read_status
from pytest_gpushare.ledger.views import describe, lease_timeout, release_deferred

# ledger_name and read_status are re-exported for the callers that still reach them here
# (bench/schedule.py) rather than through the facade, :mod:`pytest_gpushare.ledger`.
__all__ = ["Ledger", "ledger_name", "read_status"]

#: A waiter retries at least this often even when no ledger changed (dead owners, aging).
FULL_CHECK_S = 0.5
#: While a request waits, fresh usable memory is asked for at most this often.
REFRESH_S = 2.0
CONTEXT_TEST_ID = "CUDA context"

#: What the candidate GPUs looked like when a try failed: each one's ledger and verdict.
View = list[tuple[GpuState, Fit]]


@dataclass
class _Request:
    """One call of :meth:`Ledger.acquire`. ``since`` (wall clock) orders requests for fairness;
    ``start`` and ``deadline`` are monotonic (``deadline`` is infinite without a limit)."""

    need: Need
    test_id: str
    ticket: str
    since: float
    start: float
    deadline: float
    registered: bool = False  # a waiter was written for it
    refreshed: float = 0.0  # when fresh usable memory was last asked for
    sleeper: Sleeper | None = None  # how it sleeps between tries, once it waited


class Ledger:
    """This process's handle on the shared ledgers of ``gpus``; see the module docstring.

    ``log`` receives one line per reclaim, repair or restore. ``refresh`` returns fresh usable
    bytes per GPU uuid; it is called at most every :data:`REFRESH_S` while a request waits
    (strangers may free memory). ``lock_timeout`` caps every wait for a lock; ``trust_s``: how
    long an owner whose liveness cannot be verified is trusted; ``grace_s``: how long a ledger
    made anew admits only restores, at most (:mod:`.access`). Thread-safe; a forked child must
    open its own ledger.
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
        trust_s: float = UNVERIFIED_TRUST_S,
        grace_s: float = GRACE_S,
    ) -> None:
        if policy not in ("spread", "pack"):
            raise ValueError(f"policy must be 'spread' or 'pack', not {policy!r}")
        if context_bytes < 0:
            raise ValueError(f"context_bytes cannot be negative: {context_bytes}")
        self._gpus = {g.uuid: g for g in gpus}
        if len(self._gpus) != len(gpus):
            raise ValueError("two GPUs share a uuid")
        self._index = {g.uuid: g.index for g in gpus}
        self.owner = owner
        self._context_bytes = context_bytes
        self._policy = policy
        self._log = log if log is not None else (lambda _line: None)
        self._refresh = refresh
        self._fair_after = fair_after
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._closed = False
        self._closing = threading.Lock()
        self._passes = Passes(
            folder,
            self._gpus,
            owner,
            self._log,
            self._label,
            lock_timeout=lock_timeout,
            trust_s=trust_s,
            grace_s=grace_s,
        )
        self._holder = self._passes.holder
        try:
            self._first_look()
        except BaseException:
            self._passes.close()
            raise

    def _first_look(self) -> None:
        """Make the ledgers of this ledger's GPUs and sweep the dead owners' files; left to the
        first lease when a lock stays taken (that lease's own deadline then holds)."""
        try:
            with self._pass(list(self._gpus), OPEN_LOCK_S) as p:
                p.acc.sweep()
        except LockTimeout as exc:
            self._log(f"gpushare: {exc}; the first lease of this process will look again")

    @property
    def folder(self) -> Path:
        return self._passes.folder.path

    @property
    def gpus(self) -> tuple[LedgerGpu, ...]:
        return tuple(self._gpus.values())

    def liveness_fd(self) -> int:
        """The descriptor that holds this owner's liveness lock: a process that keeps a copy
        (passed over a socket) keeps the owner alive for as long as it does."""
        return self._holder.liveness_fd

    def set_usable(self, usable: Mapping[str, int]) -> None:
        """Record fresh usable bytes per GPU uuid; ledgers see them at this process's next access."""
        with self._passes.exclusive(RELEASE_LOCK_S):
            self._holder.set_usable(usable)

    # --- the public cycle ------------------------------------------------------------------

    def acquire(self, need: Need, test_id: str, timeout: float) -> Lease:
        """Lease ``need`` for ``test_id``, waiting up to ``timeout`` seconds (negative or
        infinite: no limit). Raises :class:`NeverFits` at once when no wait could help, and
        :class:`LeaseTimeout`, naming who holds the GPUs (or a ledger's lock), when the wait
        runs out."""
        self._check_usable()
        uuids = candidates(need, self._gpus)
        reason = never_fits(need, [self._gpus[u] for u in uuids], self._context_bytes, test_id)
        if reason is not None:
            raise NeverFits(reason)
        ticket = f"{self.owner.key}-w{next(self._ids)}"
        since, start = time.time(), time.monotonic()
        deadline = start + timeout if timeout >= 0 and math.isfinite(timeout) else math.inf
        req = _Request(need, test_id, ticket, since, start, deadline, refreshed=start)
        self._holder.tickets.add(ticket)
        lease: Lease | None = None
        try:
            lease = self._at_home(req, uuids) or self._wait_for(req, uuids)
            return lease
        finally:
            self._holder.tickets.discard(ticket)
            if req.sleeper is not None:
                req.sleeper.close()
            if req.registered and lease is None:
                self._withdraw(req, uuids)

    def release(self, lease: Lease) -> None:
        """Give the lease back (idempotent). The process's CUDA context bookings stay.

        Raises :class:`ReleaseDeferred` when the ledger cannot be reached (see the module
        docstring); the lease is then this process's no more, and leaves the ledger at its next
        access that succeeds, or when it ends.
        """
        if lease.owner.key != self.owner.key:
            raise ValueError(f"lease {lease.lease_id} belongs to another owner ({lease.owner.key})")
        self._check_usable()
        with self._passes.exclusive(RELEASE_LOCK_S):
            held = self._holder.held
            uuids = [u for u, _ in lease.parts if any(b.lease_id == lease.lease_id for b in held.get(u, ()))]
            if not uuids:
                return
            self._holder.unhold(lease.lease_id)
            try:
                with self._pass(uuids, RELEASE_LOCK_S) as p:
                    p.holdings_after = True
            except LedgerError as exc:
                labels = [(self._label(GpuState(uuid)), size) for uuid, size in lease.parts]
                error = release_deferred(lease, labels, exc)
                self._log(error.message)
                raise error from None

    def others_waiting(self, uuids: Sequence[str]) -> set[str]:
        """Which of ``uuids`` another session waits on, read without the lock (:mod:`.signals`)."""
        self._check_usable()
        return {u for u in uuids if self._passes.waiting.others_wait(self._passes.folder, u)}

    def snapshot(self) -> dict[str, Any]:
        """The ledgers of this ledger's GPUs after reclaiming the dead: see :func:`read_status`."""
        self._check_usable()
        with self._pass(list(self._gpus), STATUS_LOCK_TIMEOUT_S) as p:
            return describe(
                self._passes.folder.dir,
                [p.states[u] for u in sorted(p.states)],
                taken_at=time.time(),
                reclaimed=p.acc.reclaimed,
                repaired=p.acc.repaired,
                unverifiable=list(p.acc.unverifiable.values()),
                index=self._index,
            )

    def close(self) -> None:
        """Drop this process's bookings, waiters and liveness (idempotent). A ledger that cannot
        be written to is logged, not raised: the liveness lock goes all the same, and with it,
        at the next access of any process, what this process still held."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            return
        try:
            self._passes.leave(RELEASE_LOCK_S)
        except LedgerError as exc:
            self._log(
                f"gpushare: could not take this process's bookings out of the ledgers ({exc}); "
                "they are reclaimed once it is gone"
            )
        finally:
            self._passes.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- waiting ------------------------------------------------------------------------------

    def _at_home(self, req: _Request, uuids: list[str]) -> Lease | None:
        """The preferred GPU of a one-GPU need that others could serve too, tried alone first
        (without registering a wait), so that a test stays on its home GPU whenever it can."""
        need = req.need
        if need.count == 1 and need.prefer in uuids and len(uuids) > 1:
            return self._attempt(req, [need.prefer], register=False)[0]
        return None

    def _wait_for(self, req: _Request, uuids: list[str]) -> Lease:
        """Try, and back off between tries; registered as a waiter until the deadline."""
        while True:
            register = time.monotonic() < req.deadline
            lease, view = self._attempt(req, uuids, register=register)
            if lease is not None:
                return lease
            req.registered = req.registered or register
            if req.sleeper is None:
                req.sleeper = Sleeper(uuids, lambda: self._passes.folder, self._passes.watches)
                if req.sleeper.watched:
                    continue  # once more: a write before the watch began woke nobody
            self._back_off(req, uuids, req.sleeper, view)

    def _back_off(self, req: _Request, uuids: list[str], sleeper: Sleeper, view: View) -> None:
        """Sleep until a candidate ledger was written so that it could serve ``req``, :data:`FULL_CHECK_S`
        passed or fresh usable memory was asked for; raise :class:`LeaseTimeout` at the deadline."""
        checked = time.monotonic()
        sleeper.mark()
        while True:
            now = time.monotonic()
            if now >= req.deadline:
                raise self._timed_out(req, now - req.start, view)
            written = sleeper.sleep(min(checked + FULL_CHECK_S, req.deadline) - now)
            now = time.monotonic()
            if self._refresh is not None and now - req.refreshed >= REFRESH_S:
                self._do_refresh()
                req.refreshed = now
                return
            if now >= req.deadline or now - checked >= FULL_CHECK_S:
                return
            if written and self._worth_a_try(req, uuids):
                return

    def _worth_a_try(self, req: _Request, uuids: list[str]) -> bool:
        """Whether the ledgers, read without their locks, could serve ``req`` now (:mod:`.signals`);
        the dead are reclaimed by the next locked pass, :data:`FULL_CHECK_S` later at the latest."""
        states = read_states(self._passes.folder, uuids)
        if states is None:
            return True  # the locked pass repairs what cannot be read
        return self._choose(states, req, uuids, time.time())[1] is not None

    def _withdraw(self, req: _Request, uuids: list[str]) -> None:
        # Reconciling drops waiters whose ticket is gone; a failure here leaves the record
        # to this process's next access, which drops it the same way.
        try:
            with self._pass(uuids, WITHDRAW_LOCK_S):
                pass
        except LedgerError as exc:
            self._log(f"gpushare: could not withdraw the wait of {req.test_id}: {exc}")

    def _do_refresh(self) -> None:
        assert self._refresh is not None
        try:
            fresh = self._refresh()
        except Exception as exc:  # the caller's probe (NVML, ...) must not break a wait
            self._log(f"gpushare: could not refresh usable memory: {exc}")
            return
        self.set_usable(fresh)

    def _timed_out(self, req: _Request, waited: float, view: View, locked_by: str = "") -> LeaseTimeout:
        reasons = [f"{self._label(state)}: {fit.why}" for state, fit in view if fit.why]
        usable, states = self._holder.usable, [s for s, _ in view]
        what = f"{req.test_id}: no GPU memory for {req.need.describe()}"
        return lease_timeout(what, waited, states, reasons, self._label, self.owner, usable, locked_by)

    # --- one try ------------------------------------------------------------------------------

    def _attempt(self, req: _Request, uuids: list[str], *, register: bool) -> tuple[Lease | None, View]:
        """One locked try, its lock waits ending with the request; on failure, what the
        candidate GPUs looked like."""
        p: Pass | None = None
        try:
            with self._pass(uuids, req.deadline - time.monotonic()) as p:
                return self._decide(p, req, uuids, register=register)
        except LockTimeout as exc:
            self._forget_grant(p)
            now = time.monotonic()
            if now < req.deadline:
                raise  # the cap on every lock wait, before the request's own deadline
            locked_by = f"a ledger lock is held by {exc.holder}"
            raise self._timed_out(req, now - req.start, [], locked_by) from None
        except BaseException:
            self._forget_grant(p)
            raise

    def _forget_grant(self, p: Pass | None) -> None:
        if p is not None and p.lease_id is not None:
            # Nothing of it may count as held; the next access reconciles the ledgers.
            self._holder.unhold(p.lease_id)
            with contextlib.suppress(LedgerError):
                self._holder.write()

    def _decide(
        self, p: Pass, req: _Request, uuids: list[str], *, register: bool
    ) -> tuple[Lease | None, View]:
        now = time.time()
        fits, chosen = self._choose(p.states, req, uuids, now)
        if chosen is None:
            if register:
                self._register(p, req, fits)
            return None, [(p.states[u], fits[u]) for u in uuids]
        return self._grant(p, req, chosen, fits, now), []

    def _choose(
        self, states: Mapping[str, GpuState], req: _Request, uuids: list[str], now: float
    ) -> tuple[dict[str, Fit], list[str] | None]:
        """The verdict of each candidate GPU on ``req``, and the GPUs that would serve it."""
        return choose(
            states,
            self._gpus,
            req.need,
            uuids,
            self._policy,
            self._index,
            owner=self.owner.key,
            context_bytes=self._context_bytes,
            ticket=req.ticket,
            since=req.since,
            now=now,
            fair_after=self._fair_after,
        )

    def _register(self, p: Pass, req: _Request, fits: Mapping[str, Fit]) -> None:
        """Record the request as a waiter in each candidate's ledger (once; again if it changed)."""
        key, gpus = self.owner.key, self._gpus
        for uuid, fit in fits.items():
            waiter = waiter_of(req.need, gpus[uuid], req.ticket, key, req.test_id, fit.context, req.since)
            if p.states[uuid].add_waiter(waiter):
                p.dirty.add(uuid)

    def _grant(self, p: Pass, req: _Request, chosen: list[str], fits: Mapping[str, Fit], now: float) -> Lease:
        """Book the lease on the ``chosen`` GPUs, in this process's records and in the ledgers,
        and drop the request's waiters; holdings are written first (:mod:`.passes`)."""
        key = self.owner.key
        p.lease_id = lease_id = f"{key}-{next(self._ids)}"
        parts = []
        for uuid in chosen:
            fit = fits[uuid]
            new = [Booking(lease_id, key, req.test_id, fit.grant, TEST, now)]
            if fit.context:
                new.insert(0, Booking(f"{key}-ctx", key, CONTEXT_TEST_ID, fit.context, CONTEXT, now))
            self._holder.hold(uuid, new)
            p.states[uuid].bookings.extend(new)
            parts.append((uuid, fit.grant))
        for uuid in fits:
            state = p.states[uuid]
            state.waiters = [w for w in state.waiters if w.ticket != req.ticket]
            p.dirty.add(uuid)
        p.holdings_first = True
        waited = time.monotonic() - req.start
        return Lease(lease_id, req.test_id, self.owner, tuple(parts), now, waited, req.need.exclusive)

    # --- one locked access ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise LedgerError(f"this ledger belongs to process {self._pid}; a forked child must open its own")
        if self._closed:
            raise LedgerError("this ledger is closed")

    def _label(self, state: GpuState) -> str:
        gpu = self._gpus.get(state.uuid)
        return f"GPU {state.uuid}" if gpu is None else gpu_label(gpu)

    @contextlib.contextmanager
    def _pass(self, uuids: Sequence[str], timeout: float | None = None) -> Iterator[Pass]:
        """One locked pass (:mod:`.passes`) of this open ledger, its waits ending after ``timeout``."""
        self._check_usable()
        with self._passes.run(uuids, timeout) as p:
            yield p
