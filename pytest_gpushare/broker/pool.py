"""The session's memory on each GPU, as the broker keeps it: pure, no I/O, no clock.

The pool of a GPU is made of *chunks*: leases that the controller's owner holds in the box
ledger. What they add up to is the pool's limit; the tests' leases are booked inside it. Whether
a request may take memory, and where, is decided by the box ledger's own rules
(:func:`pytest_gpushare.ledger.choose`, fairness among waiters included), run over the pool's
state instead of a ledger file's. Workers' CUDA contexts are not
in the pool: each worker's contexts are booked in the box ledger under that worker's own owner
(:mod:`.box`), so an exclusive request of any session subtracts them as it does everywhere.

Only the serving thread touches a :class:`Pool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from pytest_gpushare.ledger import TEST, Booking, GpuState, Lease, LedgerGpu, Need, choose, waiter_of
from pytest_gpushare.units import format_size

__all__ = ["POOL_OWNER", "Ask", "Pool"]

#: The owner key under which the rules see the pool; contexts are never booked in the pool, so
#: it only has to differ from every worker's key.
POOL_OWNER = "pool"


@dataclass
class _PoolState(GpuState):
    """A GPU's pool as the rules see a ledger: its limit is what the session's chunks hold.
    What is booked is counted as bookings come and go (a pool may hold a lease per worker)."""

    held: int = 0
    used: int = 0
    peak: int = 0  # the most booked at once in the current window
    peak_before: int = 0  # ... and in the window before it

    def limit(self) -> int | None:
        return self.held

    def booked(self) -> int:
        return self.used

    def add(self, booking: Booking) -> None:
        self.bookings.append(booking)
        self.used += booking.bytes
        self.peak = max(self.peak, self.used)

    def remove(self, booking: Booking) -> None:
        # By identity: comparing bookings field by field costs more than the rest of a release.
        index = next(i for i, b in enumerate(self.bookings) if b is booking)
        del self.bookings[index]
        self.used -= booking.bytes


@dataclass(frozen=True)
class Ask:
    """A request as the pool sees it: ``worker`` books it, ``ticket`` names its wait."""

    ticket: str
    worker: str
    test_id: str
    need: Need
    since: float


class Pool:
    """The pools of the session's GPUs; ``policy`` and ``fair_after`` as the box ledger's."""

    def __init__(self, gpus: Sequence[LedgerGpu], *, policy: str, fair_after: float) -> None:
        self.policy = policy
        self.fair_after = fair_after
        self._gpus = {g.uuid: g for g in gpus}
        self._index = {g.uuid: g.index for g in gpus}
        self._states = {g.uuid: _PoolState(uuid=g.uuid, name=g.name, total_bytes=g.total_bytes) for g in gpus}
        self._chunks: dict[str, list[Lease]] = {g.uuid: [] for g in gpus}
        self._leases: dict[str, list[tuple[str, Booking]]] = {}
        self._changed: set[str] = set()

    # --- what the pool holds --------------------------------------------------------------------

    def held(self, uuid: str) -> int:
        """Bytes of the session's chunks on the GPU."""
        return self._states[uuid].held

    @property
    def gpus(self) -> tuple[str, ...]:
        """The uuids of the pool's GPUs."""
        return tuple(self._gpus)

    def holds_any(self) -> bool:
        return any(state.held for state in self._states.values())

    def used(self, uuid: str) -> int:
        """Bytes of the tests' leases in the GPU's pool."""
        return self._states[uuid].booked()

    def changed(self) -> set[str]:
        """The GPUs whose pools changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def chunks(self, uuid: str) -> tuple[Lease, ...]:
        return tuple(self._chunks[uuid])

    def add_chunk(self, chunk: Lease) -> None:
        """A lease the box granted to the session joins the pool of its GPU."""
        for uuid, size in chunk.parts:
            self._chunks[uuid].append(chunk)
            self._states[uuid].held += size
            self._changed.add(uuid)

    def new_window(self) -> None:
        """Start a new window of use: :meth:`take_spare` with ``idle`` then keeps what the
        leases needed at their peak in this window and the one before."""
        for state in self._states.values():
            state.peak_before, state.peak = state.peak, state.used

    def take_spare(self, uuid: str, *, idle: bool = False) -> list[Lease]:
        """Remove and return the chunks of the GPU that no lease needs now (with ``idle``: that
        no lease needed in this window or the one before), the largest first, each only if what
        stays still covers the leases."""
        state = self._states[uuid]
        return self._take(uuid, self._pick(uuid, self._free(state, idle)))

    def take_unneeded(self, uuid: str, most: int) -> list[Lease]:
        """Remove and return chunks of the GPU that no lease needs now and that add up to at
        most ``most`` bytes, the largest first; where no such chunk is that small, the smallest
        one that no lease needs (growths under way asked for ``most`` bytes more than the pool
        lacks: a chunk kept idle here could be what the box lacks to grant them)."""
        state = self._states[uuid]
        free = state.held - state.used
        chosen = self._pick(uuid, min(free, most))
        if not chosen and most > 0:
            spare = [c for c in self._chunks[uuid] if c.parts[0][1] <= free]
            chosen = [min(spare, key=lambda c: c.parts[0][1])] if spare else []
        return self._take(uuid, chosen)

    def _pick(self, uuid: str, free: int) -> list[Lease]:
        """Chunks of the GPU adding up to at most ``free`` bytes, the largest first."""
        picked = []
        for chunk in sorted(self._chunks[uuid], key=lambda c: -c.parts[0][1]):
            size = chunk.parts[0][1]
            if size <= free:
                picked.append(chunk)
                free -= size
        return picked

    def _take(self, uuid: str, chunks: list[Lease]) -> list[Lease]:
        state = self._states[uuid]
        for chunk in chunks:
            self._chunks[uuid].remove(chunk)
            state.held -= chunk.parts[0][1]
        if chunks:
            self._changed.add(uuid)
        return chunks

    def has_spare(self, uuid: str, *, idle: bool = False) -> bool:
        state = self._states[uuid]
        free = self._free(state, idle)
        return any(c.parts[0][1] <= free for c in self._chunks[uuid])

    @staticmethod
    def _free(state: _PoolState, idle: bool) -> int:
        return state.held - (max(state.used, state.peak, state.peak_before) if idle else state.used)

    # --- leases ------------------------------------------------------------------------------------

    def choose(self, ask: Ask, uuids: Sequence[str], now: float) -> list[tuple[str, int]] | None:
        """Where the pools of ``uuids`` can serve ``ask`` now, by the ledger's rules: the
        ``(uuid, bytes)`` parts, or None."""
        fits, chosen = choose(
            self._states,
            self._gpus,
            ask.need,
            list(uuids),
            self.policy,
            self._index,
            owner=POOL_OWNER,
            context_bytes=0,
            ticket=ask.ticket,
            since=ask.since,
            now=now,
            fair_after=self.fair_after,
        )
        return None if chosen is None else [(u, fits[u].grant) for u in chosen]

    def book(self, lease_id: str, ask: Ask, parts: Sequence[tuple[str, int]], now: float) -> None:
        entries = []
        for uuid, size in parts:
            booking = Booking(lease_id, ask.worker, ask.test_id, size, TEST, now)
            self._states[uuid].add(booking)
            entries.append((uuid, booking))
            self._changed.add(uuid)
        self._leases[lease_id] = entries

    def rename(self, lease_id: str, test_id: str, now: float) -> None:
        """The lease now belongs to test ``test_id`` (taken over at ``now``): what a timeout's
        message names as its holder."""
        entries = self._leases.get(lease_id)
        if entries is None:
            return
        renamed = []
        for uuid, booking in entries:
            new = replace(booking, test_id=test_id, taken_at=now)
            state = self._states[uuid]
            state.bookings[next(i for i, b in enumerate(state.bookings) if b is booking)] = new
            renamed.append((uuid, new))
        self._leases[lease_id] = renamed

    def free(self, lease_id: str) -> bool:
        """Return a lease to the pool; False if the pool did not hold it."""
        entries = self._leases.pop(lease_id, None)
        if entries is None:
            return False
        for uuid, booking in entries:
            self._states[uuid].remove(booking)
            self._changed.add(uuid)
        return True

    def want(self, ask: Ask, uuid: str) -> int:
        """The bytes ``ask`` needs on the GPU."""
        return ask.need.mem.resolve(self._gpus[uuid].total_bytes)

    def shortfall(self, ask: Ask, uuid: str) -> int:
        """What the GPU's pool lacks to serve ``ask`` by size (0 when only fairness holds it back)."""
        state = self._states[uuid]
        return max(0, state.booked() + self.want(ask, uuid) - state.held)

    # --- waiting -----------------------------------------------------------------------------------

    def wait(self, ask: Ask, uuids: Sequence[str], *, context_bytes: int = 0) -> None:
        """Register ``ask`` as waiting on ``uuids``, so that once it has waited ``fair_after``
        younger requests may not take what it needs there (the ledger's fairness)."""
        for uuid in uuids:
            gpu = self._gpus[uuid]
            waiter = waiter_of(ask.need, gpu, ask.ticket, ask.worker, ask.test_id, context_bytes, ask.since)
            self._states[uuid].add_waiter(waiter)

    def unwait(self, ticket: str) -> None:
        for state in self._states.values():
            if any(w.ticket == ticket for w in state.waiters):
                state.waiters = [w for w in state.waiters if w.ticket != ticket]

    def holders(self, uuids: Sequence[str]) -> list[str]:
        """One line per lease in the pools of ``uuids`` (for a timeout's message)."""
        lines = []
        for uuid in uuids:
            gpu = self._gpus[uuid]
            for b in self._states[uuid].bookings:
                lines.append(f"{b.test_id} ({format_size(b.bytes)} on GPU {gpu.index}, worker {b.owner})")
        return lines

    def describe(self, uuid: str) -> str:
        state = self._states[uuid]
        gpu = self._gpus[uuid]
        return (
            f"GPU {gpu.index}: the session holds {format_size(state.held)}, "
            f"{format_size(state.booked())} of it leased"
        )
