"""When the session's memory goes back to the box ledger (on the serving thread, no I/O here).

Time runs in windows of ``linger_s`` (default :data:`LINGER_S`). At each window's end, the
chunks that no lease needed in that window nor in the one before go back to the box
(:meth:`Pool.take_spare` with ``idle``), except on GPUs where requests of the session wait for
the pool: memory that no test holds returns within ``2 * linger_s`` of its last use, while a
pool whose use goes up and down keeps what its busiest moments need instead of giving it back
and growing again (each is a box-ledger write).

Sooner, at once, go the chunks that no lease needs *now* on a GPU where another session waits,
or where a request of ours passed through to the box waits (our own pool must not block it).
On a GPU where the pool grows and the oldest growth under way has waited in the box for
``patience_s`` (default :data:`PATIENCE_S`), the pool keeps of its spare chunks what that
growth's request lacks besides it, and the rest goes at once (:func:`over_asked`,
:meth:`Pool.take_unneeded`); all of them while that growth's request is gone (it was served
meanwhile: the box cannot take a growth back). The box grants that growth first, and a growth's
size is fixed when it is asked for: once tests end meanwhile (or when only the fairness among
waiters held its request back) it asks for more than the pool lacks, and the box, full of the
pool's idle chunks, would never grant it nor any younger one. Where no spare chunk is small
enough, the smallest goes, and a request still short once its growth comes asks again. A growth
younger than ``patience_s`` is most likely being granted (the box had the memory): giving a
chunk back for it then only made the pool grow again a moment later, two box-ledger writes for
nothing (issue 13, row 3: with 8 workers, most of the session's writes).
Whether another session waits is read from the heads of the box's ledgers, without their locks
(:meth:`Box.others_waiting`, a few microseconds): at once when a GPU's pool comes to have spare
memory (a test ended), and every ``watch_s`` (default :data:`WATCH_S`) while it has, so that a
session that starts to wait later gets the memory within that long (issue 13, row 4).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pytest_gpushare.broker.box import Box
from pytest_gpushare.broker.pool import Pool
from pytest_gpushare.broker.state import Growth, Pending

__all__ = ["LINGER_S", "PATIENCE_S", "WATCH_S", "GiveBack", "growths_bring", "over_asked"]

#: The window: memory that no test of the session used for a window of this long and the next
#: goes back to the box (within ``2 * LINGER_S`` of its last use when no other session waits).
LINGER_S = 1.0
#: A growth under way this long waits in the box: only then do the chunks it does not need go
#: back for it (a free box grants one in about a millisecond, a loaded one in tens).
PATIENCE_S = 0.1
#: While spare memory lingers, the box's ledgers are read this often for another session's waiters.
WATCH_S = 0.01


class GiveBack:
    """The give-back policy over ``pool``; releases go through ``box`` (queued, never waited for)."""

    def __init__(self, pool: Pool, box: Box, *, linger_s: float, watch_s: float, patience_s: float) -> None:
        self._pool = pool
        self._box = box
        self._linger_s = linger_s
        self._watch_s = watch_s
        self._patience_s = patience_s
        self._window_start = 0.0
        self._spare: set[str] = set()  # GPUs with spare memory now
        self._next_look = 0.0  # when to read the box's ledgers for other sessions' waiters again

    def tick(
        self, now: float, wake: list[float], queue: Collection[Pending], growths: Iterable[Growth]
    ) -> bool:
        """Give back what is due, with the session's waiting requests (``queue``) and its
        growths under way in the box. Appends to ``wake`` when to tick again; True if anything
        was given back."""
        urgent = {u for p in queue if p.direct for u in p.candidates}  # a pass-through waits there
        waited_on = {u for p in queue if not p.direct for u in p.candidates}
        over = over_asked(self._pool, growths, now, self._patience_s, wake)
        gave = False
        for uuid, most in over.items():
            if most > 0 and uuid not in urgent:
                chunks = self._pool.take_unneeded(uuid, most)
                self._box.release_chunks(chunks)
                gave = gave or bool(chunks)
        if now >= self._window_start + self._linger_s:
            self._pool.new_window()
            self._window_start = now
            idle = [u for u in self._pool.gpus if u not in waited_on and self._pool.has_spare(u, idle=True)]
            gave = self._give_back(idle, idle=True) or gave
        look = self._spare_now()
        if self._spare:
            if now >= self._next_look:
                look, self._next_look = set(self._spare), now + self._watch_s
            wanted = self._spare.intersection(urgent)
            wanted |= self._box.others_waiting(sorted(look - wanted)) if look - wanted else set()
            gave = self._give_back(sorted(wanted), idle=False) or gave
        if self._spare:
            wake.append(self._next_look)
        if self._pool.holds_any():
            wake.append(self._window_start + self._linger_s)
        return gave

    def _spare_now(self) -> set[str]:
        """Track which GPUs' pools have spare memory; those that have come to have it."""
        new = set()
        for uuid in self._pool.changed():
            if not self._pool.has_spare(uuid):
                self._spare.discard(uuid)
            elif uuid not in self._spare:
                self._spare.add(uuid)
                new.add(uuid)
        return new

    def _give_back(self, uuids: list[str], *, idle: bool) -> bool:
        for uuid in uuids:
            self._box.release_chunks(self._pool.take_spare(uuid, idle=idle))
            self._spare.discard(uuid)
        return bool(uuids)


def over_asked(
    pool: Pool, growths: Iterable[Growth], now: float, patience_s: float, wake: list[float]
) -> dict[str, int]:
    """For each GPU where the oldest growth under way has waited ``patience_s`` or more, the
    bytes of the pool's spare memory that it does not need: how much it asked for beyond what
    its request's pool lacks now (all of it for an orphan, whose request is gone). Tests that
    ended since it was asked for, or a request that only the fairness among waiters held back,
    make it ask for more than the pool lacks, and the box grants the oldest growth first
    (younger ones wait for it once it has waited ``FAIR_AFTER_S``): this much may go back
    without leaving it short. Appends to ``wake`` when a younger oldest growth comes of age."""
    oldest: dict[str, Growth] = {}
    for g in growths:
        for u in g.uuids:
            if u not in oldest or g.asked_at < oldest[u].asked_at:
                oldest[u] = g
    over = {}
    for u, g in oldest.items():
        if now - g.asked_at < patience_s:
            wake.append(g.asked_at + patience_s)
        else:
            over[u] = pool.held(u) if g.ask is None else g.size - pool.shortfall(g.ask, u)
    return over


def growths_bring(pool: Pool, growths: Iterable[Growth], queue: Iterable[Pending], uuid: str) -> bool:
    """Whether the growths under way on the GPU bring what the requests of ``queue`` that wait
    for its pool lack: a request then waits for them rather than grow the pool itself. With several workers
    asking at once (a session's start, a recall), one growth per request grew the pool by a
    chunk for each while the chunks of the others served them, each chunk a box-ledger write to
    take and one to give back (issue 13, row 3). A growth that the box places on another of its
    GPUs only makes a request ask later: each growth ends in the engine's ``done``, which
    examines the waiting requests again."""
    coming = sum(g.size for g in growths if uuid in g.uuids)
    if not coming:
        return False
    wanted = sum(pool.want(p.ask, uuid) for p in queue if not p.direct and uuid in p.candidates)
    return pool.held(uuid) + coming >= pool.used(uuid) + wanted
