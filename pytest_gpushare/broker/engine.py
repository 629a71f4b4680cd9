"""The broker's decisions, on the serving thread: which request is served from the pool, which
grows the pool or passes through to the box ledger, when memory goes back, what times out.

Routes of a request (worker ``w``, candidate GPUs ``C``):

* **pool**: ``count == 1``, not exclusive, and ``w`` has its CUDA context booked on a GPU of
  ``C`` (on its home GPU, when the home is in ``C``). Served at once when the pool of such a GPU
  can, by the ledger's rules (:mod:`.pool`); else it waits in the pool and the pool *grows*: a
  thread asks the box ledger for the shortfall (on a single candidate exactly; across several,
  the largest shortfall among them, so whichever GPU the box picks suffices) under the
  controller's owner, with the request's deadline, so the box's fairness, waiter lines and
  timeout messages hold for it. The granted chunk joins the pool, and every waiting request is
  examined again, as on every release. A request served meanwhile leaves its chunk to the pool.
  A request still short once its growth came asks again (spare chunks: :func:`.giveback.over_asked`).
* **direct**: anything else (exclusive, multi-GPU, or ``w``'s first lease on a GPU) is passed
  through to the box ledger under ``w``'s own owner, which books ``w``'s context with it. While
  it waits, spare chunks on its GPUs go back to the box at once (our own pool must not block
  it), and it waits in the pool too, so that once it has waited ``fair_after`` younger requests
  of the session cannot take what it needs there.

When memory goes back to the box: :mod:`.giveback`.

Carried leases: a pool lease granted while no request waits on its GPUs is carriable: its worker
may hand it to its next test of the same need (one-way ``Carry``; the running file shows the new
test from the next publish). When a request starts to wait (in the pool or passed through), the
pool leases on its GPUs are recalled (one-way ``Recall``), which workers read before they carry:
the memory comes free at its holder's next test boundary, as it would without carrying, and the
pool's fairness (``fair_after``) and the give-back to the box decide as before.

Deadlines: a request is refused with "timeout" at its deadline; one whose box job is under way
gets :data:`BOX_GRACE_S` more for the box's own answer, which names the holders of other sessions.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from pytest_gpushare.broker.box import Box, Done
from pytest_gpushare.broker.giveback import LINGER_S, PATIENCE_S, WATCH_S, GiveBack, growths_bring
from pytest_gpushare.broker.pool import Ask, Pool
from pytest_gpushare.broker.protocol import (
    Acquire,
    Granted,
    Message,
    ProtocolError,
    Recall,
    Refused,
    need_from_wire,
)
from pytest_gpushare.broker.slot import SlotReader
from pytest_gpushare.broker.state import Growth, Pending, Worker
from pytest_gpushare.broker.status import RunningDoc, RunningWait, running_doc, running_lease
from pytest_gpushare.errors import LeaseTimeout, NeverFits
from pytest_gpushare.ledger import Lease, Need, candidates, never_fits
from pytest_gpushare.units import MemRequest

__all__ = ["BOX_GRACE_S", "PUBLISH_S", "Engine"]

#: The session's running file is rewritten at most this often.
PUBLISH_S = 0.1
#: How long past its deadline a request with a box job under way waits for the box's answer.
BOX_GRACE_S = 0.5

Send = Callable[[int, Message, list[int]], None]
_NEEDS_KEPT = 1024


class Engine:
    """The broker's state and decisions; every method runs on the serving thread. ``send``
    delivers a message (with descriptors) to a connection."""

    def __init__(
        self,
        box: Box,
        send: Send,
        *,
        context_bytes: int,
        policy: str,
        fair_after: float,
        linger_s: float = LINGER_S,
        watch_s: float = WATCH_S,
        patience_s: float = PATIENCE_S,
        publish_s: float = PUBLISH_S,
    ) -> None:
        self._box = box
        self._send = send
        self._context_bytes = context_bytes
        self._gpus = {g.uuid: g for g in box.gpus}
        self._pool = Pool(box.gpus, policy=policy, fair_after=fair_after)
        self._giveback = GiveBack(self._pool, box, linger_s=linger_s, watch_s=watch_s, patience_s=patience_s)
        self._publish_s = publish_s
        self._workers: dict[int, Worker] = {}
        self._queue: list[Pending] = []  # waiting requests, oldest first
        self._tickets: dict[str, Pending] = {}
        self._growths: dict[str, Growth] = {}  # under way in the box, by ticket
        self._ids = itertools.count(1)
        self._cancelled = False
        self._changed = False
        self._published = -math.inf
        self._slots_read = -math.inf
        self._needs: dict[tuple[Any, ...], tuple[Need, list[str], bool]] = {}

    @property
    def pool(self) -> Pool:
        return self._pool

    # --- connections --------------------------------------------------------------------------------

    def connect(self, conn: int, worker_id: str) -> None:
        self._workers[conn] = Worker(conn, worker_id)

    def disconnect(self, conn: int) -> None:
        """The worker is gone: its pool leases return now, its box owner is closed."""
        w = self._workers.pop(conn, None)
        if w is None:
            return
        for lease_id in w.pool_leases:
            self._pool.free(lease_id)
        if w.slot is not None:
            w.slot.close()
        for p in list(w.requests.values()):
            self._drop(p)
        self._box.close_worker(conn)
        self._changed = True
        self._examine()

    # --- requests -----------------------------------------------------------------------------------

    def acquire(self, conn: int, msg: Acquire, now: float) -> None:
        w = self._workers[conn]
        try:
            need, uuids, ever = self._understand(msg.need)
        except (ProtocolError, ValueError) as exc:
            self._refuse_new(w, msg, "error", f"{msg.test_id}: {exc}")
            return
        if not ever:
            reason = never_fits(need, [self._gpus[u] for u in uuids], self._context_bytes, msg.test_id)
            self._refuse_new(w, msg, "never", reason or msg.test_id)
            return
        if self._cancelled:
            self._refuse_new(w, msg, "cancelled", msg.test_id)
            return
        deadline = now + msg.timeout if msg.timeout >= 0 and math.isfinite(msg.timeout) else math.inf
        ask = Ask(f"c{conn}r{msg.request}", w.worker_id, msg.test_id, need, time.time())
        p = Pending(w, msg.request, ask, uuids, now, deadline, self._goes_direct(w, need, uuids))
        if not p.direct and self._serve(p, now):
            return
        w.requests[msg.request] = p
        self._tickets[ask.ticket] = p
        self._queue.append(p)
        self._pool.wait(ask, uuids)
        self._changed = True
        self._recall(uuids)
        self._start_job(p, now)

    def _understand(self, wire: list[Any]) -> tuple[Need, list[str], bool]:
        """The need, its candidate GPUs and whether it could ever fit; workers ask for the same
        few needs over and over, so the answers are kept."""
        key = tuple(tuple(v) if type(v) is list else v for v in wire)
        try:
            known = self._needs.get(key)
        except TypeError:  # something unhashable inside: no need of ours
            raise ProtocolError(f"not a memory need: {str(wire)[:200]}") from None
        if known is None:
            need = need_from_wire(wire)
            uuids = candidates(need, self._gpus)
            ever = never_fits(need, [self._gpus[u] for u in uuids], self._context_bytes, "") is None
            if len(self._needs) >= _NEEDS_KEPT:
                self._needs.clear()
            known = self._needs[key] = (need, uuids, ever)
        return known

    def release(self, conn: int, lease_id: str) -> None:
        w = self._workers[conn]
        w.recalled.discard(lease_id)
        if w.pool_leases.pop(lease_id, None) is not None:
            self._pool.free(lease_id)
            self._changed = True
            self._examine()
        elif lease_id in w.direct_leases:
            lease, _ = w.direct_leases.pop(lease_id)
            self._box.release_direct(conn, lease)
            self._changed = True

    def attach_slot(self, conn: int, slot: SlotReader) -> None:
        """The worker writes its carried lease's holders in ``slot``, read before each publish."""
        w = self._workers[conn]
        if w.slot is not None:
            w.slot.close()
        w.slot = slot

    def _read_slots(self, now: float, wake: list[float]) -> None:
        """Every ``publish_s`` while a worker with a slot holds a lease: who holds it now."""
        watched = [w for w in self._workers.values() if w.slot is not None and w.pool_leases]
        if not watched:
            return
        if now >= self._slots_read + self._publish_s:
            self._slots_read = now
            for w in watched:
                found = w.slot.read() if w.slot is not None else None
                if found is not None:
                    self.carry(w.conn, *found)
                    self._published = -math.inf  # shown now: a rename is seen within publish_s
        wake.append(self._slots_read + self._publish_s)

    def carry(self, conn: int, lease_id: str, test_id: str, taken: float | None = None) -> None:
        """The worker handed its pool lease to its next test (no answer is sent). A lease whose
        GPU a request waits on is recalled, should it not have been yet."""
        w = self._workers[conn]
        running = w.pool_leases.get(lease_id)
        if running is None:
            return  # not a carriable lease of this worker: nothing to rename
        taken = time.time() if taken is None else taken
        running["test_id"] = test_id
        running["taken_at"] = taken
        self._pool.rename(lease_id, test_id, taken)
        self._changed = True
        if lease_id not in w.recalled and self._waited_on(u for u, _ in running["parts"]):
            w.recalled.add(lease_id)
            self._reply(w, Recall(lease_id))

    def _waited_on(self, uuids: Iterable[str]) -> bool:
        """Whether a request of the session waits on one of ``uuids``."""
        wanted = set(uuids)
        return any(wanted.intersection(p.candidates) for p in self._queue)

    def _recall(self, uuids: Iterable[str]) -> None:
        """Ask for every pool lease on ``uuids`` back, once each: their workers release them at
        their next test boundary instead of carrying them."""
        wanted = set(uuids)
        for w in self._workers.values():
            for lease_id, running in w.pool_leases.items():
                if lease_id not in w.recalled and any(u in wanted for u, _ in running["parts"]):
                    w.recalled.add(lease_id)
                    self._reply(w, Recall(lease_id))

    def withdraw(self, conn: int, request: int) -> None:
        """The worker stopped waiting (no answer is sent)."""
        p = self._workers[conn].requests.get(request)
        if p is not None:
            self._drop(p)
            self._examine()

    def cancel(self) -> int:
        """Answer every waiting request "cancelled", and every later one too; how many waited."""
        self._cancelled = True
        waiting = list(self._queue)
        for p in waiting:
            self._refuse(p, "cancelled", p.ask.test_id)
        return len(waiting)

    # --- what the box answered ----------------------------------------------------------------------

    def done(self, event: Done) -> None:
        p = self._tickets.get(event.ticket)
        w = self._workers.get(event.conn)
        if w is not None:
            w.fds.extend(event.fds)
            if event.kind == "direct" and event.lease is not None:
                w.contexts.update(u for u, _ in event.lease.parts)  # booked with the lease, kept after
        if p is not None:
            p.job = False
        self._growths.pop(event.ticket, None)
        if event.kind == "grow":
            if event.lease is not None:
                self._pool.add_chunk(event.lease)  # even for a request gone meanwhile: others may use it
                self._changed = True
        elif event.lease is not None and p is not None:
            self._grant_direct(p, event.lease)
        elif event.lease is not None and w is not None:
            self._box.release_direct(event.conn, event.lease)
        if event.error is not None and p is not None:
            self._refuse_error(p, event.error)
        self._examine()

    # --- time ---------------------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Time out requests, give spare memory back, watch, publish; when to tick again."""
        wake: list[float] = []
        self._expire(now, wake)
        if self._giveback.tick(now, wake, self._queue, self._growths.values()):
            self._changed = True
        self._read_slots(now, wake)
        if self._changed:
            if now >= self._published + self._publish_s:
                self._box.publish(self.running())
                self._published = now
                self._changed = False
            else:
                wake.append(self._published + self._publish_s)
        return min(wake) if wake else None

    def _expire(self, now: float, wake: list[float]) -> None:
        for p in list(self._queue):
            end = p.deadline + (BOX_GRACE_S if p.job else 0.0)
            if now < end:
                wake.append(end)
                continue
            lines = [self._pool.describe(u) for u in p.candidates]
            waited = now - p.start
            message = (
                f"{p.ask.test_id}: no GPU memory for {p.ask.need.describe()} after waiting {waited:.1f}s"
                f" ({'; '.join(lines)})"
            )
            self._refuse(p, "timeout", message, waited, self._pool.holders(p.candidates))

    # --- routes -------------------------------------------------------------------------------------

    @staticmethod
    def _goes_direct(w: Worker, need: Need, uuids: list[str]) -> bool:
        if need.exclusive or need.count > 1:
            return True
        if need.prefer in uuids and need.prefer not in w.contexts:
            return True  # its home GPU comes first, and it has no context there yet
        return not w.contexts.intersection(uuids)

    def _serve(self, p: Pending, now: float) -> bool:
        """Serve ``p`` from the pool if it can be now."""
        uuids = [u for u in p.candidates if u in p.worker.contexts]
        taken = time.time()
        parts = self._pool.choose(p.ask, uuids, taken)
        if parts is None:
            return False
        lease_id = f"{p.worker.conn}-{next(self._ids)}"
        self._pool.book(lease_id, p.ask, parts, taken)
        p.worker.pool_leases[lease_id] = running_lease(
            lease_id, p.ask.test_id, p.worker.worker_id, parts, taken, "pool"
        )
        if p.ask.ticket in self._tickets:
            self._drop(p)  # it waited: no longer in the queue when the others are looked at
        carry = not self._waited_on(u for u, _ in parts)
        self._grant(p, lease_id, parts, taken, now, carry=carry)
        return True

    def _grant_direct(self, p: Pending, lease: Lease) -> None:
        parts = list(lease.parts)
        running = running_lease(
            lease.lease_id, p.ask.test_id, p.worker.worker_id, parts, lease.taken_at, "direct"
        )
        p.worker.direct_leases[lease.lease_id] = (lease, running)
        self._grant(p, lease.lease_id, parts, lease.taken_at, time.monotonic(), carry=False)

    def _grant(
        self,
        p: Pending,
        lease_id: str,
        parts: list[tuple[str, int]],
        taken: float,
        now: float,
        *,
        carry: bool,
    ) -> None:
        if p.ask.ticket in self._tickets:
            self._drop(p)
        self._changed = True
        wire = [[u, n] for u, n in parts]
        exclusive = p.ask.need.exclusive
        self._reply(p.worker, Granted(p.request, lease_id, wire, taken, now - p.start, exclusive, carry))

    def _start_job(self, p: Pending, now: float) -> None:
        timeout = -1.0 if math.isinf(p.deadline) else p.deadline - now
        if timeout < 0 and not math.isinf(p.deadline):
            return  # its deadline has passed: the next tick refuses it
        w = p.worker
        if p.direct:
            p.job = True
            self._box.direct(p.ask.ticket, w.conn, w.worker_id, p.ask.need, p.ask.test_id, timeout)
            return
        uuids = [u for u in p.candidates if u in w.contexts]
        if any(growths_bring(self._pool, self._growths.values(), self._queue, u) for u in uuids):
            return  # it waits for them: each ends in done(), which examines the queue again
        p.job = True
        size = max(self._pool.shortfall(p.ask, u) for u in uuids)
        if size == 0:  # only fairness holds it back: grow by what it needs, so both can run
            size = max(p.ask.need.mem.resolve(self._gpus[u].total_bytes) for u in uuids)
        prefer = p.ask.need.prefer if p.ask.need.prefer in uuids else None
        need = Need(MemRequest(bytes=size), 1, False, prefer, tuple(uuids))
        label = f"session pool of {w.worker_id}: {p.ask.test_id}"
        self._growths[p.ask.ticket] = Growth(p.ask.ticket, uuids, size, now, p.ask)
        self._box.grow(p.ask.ticket, w.conn, need, label, timeout)

    def _examine(self) -> None:
        """Serve what the pool can serve now, oldest first; grow for the rest."""
        now = time.monotonic()
        for p in list(self._queue):
            if p.direct or self._serve(p, now) or p.job:
                continue
            self._start_job(p, now)

    # --- answers ------------------------------------------------------------------------------------

    def _refuse_error(self, p: Pending, error: Exception) -> None:
        if isinstance(error, NeverFits):
            self._refuse(p, "never", error.reason)
        elif isinstance(error, LeaseTimeout):
            self._refuse(p, "timeout", error.message, error.waited, list(error.holders))
        else:
            self._refuse(p, "error", f"{p.ask.test_id}: {error}")

    def _refuse(
        self, p: Pending, reason: str, message: str, waited: float | None = None, holders: Iterable[str] = ()
    ) -> None:
        self._drop(p)
        spent = time.monotonic() - p.start if waited is None else waited
        self._reply(p.worker, Refused(p.request, reason, message, spent, list(holders)))

    def _refuse_new(self, w: Worker, msg: Acquire, reason: str, message: str) -> None:
        self._reply(w, Refused(msg.request, reason, message, 0.0, []))

    def _drop(self, p: Pending) -> None:
        """Forget a waiting request; a box job under way for it becomes an orphan."""
        growth = self._growths.get(p.ask.ticket)
        if growth is not None:
            growth.ask = None
        self._queue.remove(p)
        del self._tickets[p.ask.ticket]
        del p.worker.requests[p.request]
        self._pool.unwait(p.ask.ticket)
        self._changed = True

    def _reply(self, w: Worker, message: Message) -> None:
        fds, w.fds = w.fds, []
        self._send(w.conn, message, fds)

    # --- the running file ---------------------------------------------------------------------------

    def running(self) -> RunningDoc:
        """The session's running tests and waiting requests, as :mod:`.status` writes them."""
        leases = [r for w in self._workers.values() for r in w.pool_leases.values()]
        leases += [r for w in self._workers.values() for _, r in w.direct_leases.values()]
        waiting = [
            RunningWait(
                test_id=p.ask.test_id,
                worker_id=p.worker.worker_id,
                need=p.ask.need.describe(),
                since=p.ask.since,
            )
            for p in self._queue
        ]
        return running_doc(self._box.session_id, self._box.key, leases, waiting)
