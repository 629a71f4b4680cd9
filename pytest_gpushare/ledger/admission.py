"""Who may take memory on a GPU now: the ledger's rules, as pure functions over a ledger's state.

No I/O, and no import of a module that does any: :mod:`pytest_gpushare.ledger.handle` loads the
ledgers under their locks, asks these functions, and writes the outcome.

* **Admission.** A grant keeps a GPU's bookings (test leases + CUDA contexts) within its
  *limit*: the least usable memory that any live owner recorded for that GPU, so the most
  conservative live session's reservations hold for everyone. Each GPU of a multi-GPU request is
  checked on its own; the sum over GPUs never stands in for one GPU.
* **Context.** The first lease of a process on a GPU also books the process's CUDA context there.
* **Exclusive.** An exclusive lease needs no other test on the GPU and takes the limit less every
  live process's CUDA context booking, so an idle sibling's context does not block it.
* **Placement.** ``prefer`` (the home GPU) when it can serve now; otherwise ``spread`` (most
  memory left after the lease) or ``pack`` (least left: best fit).
* **Grace.** A ledger made anew while a live owner may have lost its liveness file (the folder
  or the file was removed) admits no grant until ``grace_until``: its live owners restore their
  bookings first, as NFS clients reclaim their locks after a server restart
  (:mod:`pytest_gpushare.ledger.access`).
* **Never.** A need above what a GPU could give with nothing else running (its capacity less
  this process's CUDA context) on too many candidate GPUs can never be served: the caller says so
  at once instead of waiting.

Fairness
--------
A request that cannot be served registers as a waiter on each of its candidate GPUs. Once a
waiter has waited ``fair_after`` seconds (default :data:`FAIR_AFTER_S`) it is *aged*: a younger
request may no longer take memory on that waiter's GPUs if what would be left there is less than
the aged waiter's need, context included (for an exclusive waiter: at all). Requests compare by
the time they started, so the oldest aged waiter is never held back by anyone, while small
requests keep flowing around a large one until it has aged and wherever it does not need room.

Bound: with ``H`` the longest time one lease is held, ``P`` the longest pause between a waiter's
retries (:data:`pytest_gpushare.ledger.handle.FULL_CHECK_S`) and ``n`` the number of requests older than
a waiter ``W`` that wait on GPUs it also waits on, ``W`` is granted within
``fair_after + (n + 1) * (H + P)`` of starting to wait, however many younger requests arrive,
provided that the GPUs' limits less the CUDA contexts of live processes can hold its need and do
not shrink meanwhile (memory that strangers take outside the ledger is beyond its control).
Once ``W`` is the oldest aged waiter, no grant cuts below its need on its GPUs, so it is served
at its first retry after the leases present at that moment end; each older waiter ahead of it
takes at most as long.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_gpushare.ledger.records import CONTEXT, GpuState, Waiter
from pytest_gpushare.units import MemRequest, format_size

if TYPE_CHECKING:
    from pytest_gpushare.planner import Plan

__all__ = [
    "FAIR_AFTER_S",
    "Fit",
    "LedgerGpu",
    "Need",
    "candidates",
    "choose",
    "evaluate",
    "gpu_label",
    "never_fits",
    "place",
    "waiter_of",
]

#: After this long a waiter is protected from younger requests.
FAIR_AFTER_S = 2.0


@dataclass(frozen=True)
class LedgerGpu:
    """A GPU as the ledger needs it.

    ``capacity_bytes``: what it could give with nothing else of ours running (total less
    reservations, Ollama's reserve and the safety buffer); needs above it (less this process's
    context) never fit. ``usable_bytes``: this session's admission limit now (free memory less
    the same), recorded in the ledger so other sessions respect it too.
    """

    uuid: str
    index: int
    name: str
    total_bytes: int
    capacity_bytes: int
    usable_bytes: int


def ledger_gpus(plan: Plan) -> list[LedgerGpu]:
    """A session's planned GPUs as the ledger needs them."""
    return [
        LedgerGpu(
            uuid=g.gpu.uuid,
            index=g.gpu.index,
            name=g.gpu.name,
            total_bytes=g.gpu.total_bytes,
            capacity_bytes=g.capacity_bytes,
            usable_bytes=g.usable_bytes,
        )
        for g in plan.gpus
    ]


@dataclass(frozen=True)
class Need:
    """What a test asks for: ``mem`` on each of ``count`` distinct GPUs.

    ``prefer`` (a GPU uuid, the worker's home GPU) is used whenever it can serve now;
    ``allowed`` restricts the candidate GPUs (None: all of the ledger's GPUs).
    """

    mem: MemRequest
    count: int = 1
    exclusive: bool = False
    prefer: str | None = None
    allowed: tuple[str, ...] | None = None

    def describe(self) -> str:
        text = self.mem.describe() + (" exclusive" if self.exclusive else "")
        return text if self.count == 1 else f"{text} on each of {self.count} GPUs"


@dataclass(frozen=True)
class Fit:
    """Whether one GPU can serve a request now, and on what terms."""

    ok: bool
    grant: int  # bytes of the test booking
    context: int  # bytes of the CUDA context booked with it (0 when already booked)
    left: int  # limit left after the grant
    why: str = ""


def gpu_label(gpu: LedgerGpu) -> str:
    return f"GPU {gpu.index} ({gpu.name}, {gpu.uuid})"


def candidates(need: Need, gpus: Mapping[str, LedgerGpu]) -> list[str]:
    """The uuids of the GPUs (of ``gpus``, by uuid) that may serve ``need``, in index order.
    Raises ``ValueError`` for a count below 1 or a GPU that ``gpus`` does not know."""
    if need.count < 1:
        raise ValueError(f"count must be at least 1, not {need.count}")
    if need.allowed is None:
        uuids = list(gpus)
    else:
        unknown = [u for u in need.allowed if u not in gpus]
        if unknown:
            raise ValueError(f"unknown GPU(s) in allowed: {', '.join(unknown)}")
        uuids = list(dict.fromkeys(need.allowed))
    if need.prefer is not None and need.prefer not in gpus:
        raise ValueError(f"unknown preferred GPU {need.prefer}")
    return sorted(uuids, key=lambda u: gpus[u].index)


def evaluate(
    state: GpuState,
    gpu: LedgerGpu,
    need: Need,
    *,
    owner: str,
    context_bytes: int,
    ticket: str,
    since: float,
    now: float,
    fair_after: float,
) -> Fit:
    """Can ``owner``'s request (``ticket``, started at ``since``) take ``need`` on this GPU now?

    ``state`` must already hold ``owner``'s record (its usable memory counts in the limit).
    """
    want = need.mem.resolve(gpu.total_bytes)
    if state.grace_until > now:
        left_s = state.grace_until - now
        return Fit(
            False,
            want,
            context_bytes,
            0,
            f"made anew, it admits only live owners' restores for {left_s:.1f}s more",
        )
    limit = state.limit()
    if limit is None:
        return Fit(False, want, context_bytes, 0, "no usable memory recorded")
    used = state.booked()
    context = 0 if state.has_context(owner) else context_bytes
    if need.exclusive:
        contexts = sum(b.bytes for b in state.bookings if b.kind == CONTEXT)
        grant = limit - contexts - context
        others = [b for b in state.bookings if b.kind != CONTEXT]
        if others:
            return Fit(False, grant, context, 0, f"exclusive use waits for {len(others)} lease(s) to end")
        if grant < want or grant <= 0:
            free = format_size(max(grant, 0))
            return Fit(
                False, grant, context, 0, f"{free} free besides CUDA contexts, {format_size(want)} needed"
            )
    else:
        grant = want
        if used + grant + context > limit:
            free = f"{format_size(max(limit - used, 0))} of {format_size(limit)} free"
            return Fit(False, grant, context, 0, f"{free}, {format_size(grant + context)} needed")
    left = limit - used - grant - context
    kept = _kept_for(state, left, ticket=ticket, since=since, now=now, fair_after=fair_after)
    if kept is not None:
        return Fit(False, grant, context, left, f"kept for {kept.test_id}, waiting {now - kept.since:.1f}s")
    return Fit(True, grant, context, left)


def _kept_for(
    state: GpuState, left: int, *, ticket: str, since: float, now: float, fair_after: float
) -> Waiter | None:
    """The first aged waiter older than the request (``ticket``, started at ``since``) that
    ``left`` bytes would not serve (an exclusive one: whatever is left), or None."""
    for w in state.waiters:
        older = (w.since, w.ticket) < (since, ticket)
        if w.ticket == ticket or not older or now - w.since < fair_after:
            continue
        if w.exclusive or left < w.bytes + w.context_bytes:
            return w
    return None


def choose(
    states: Mapping[str, GpuState],
    gpus: Mapping[str, LedgerGpu],
    need: Need,
    uuids: Sequence[str],
    policy: str,
    index: Mapping[str, int],
    *,
    owner: str,
    context_bytes: int,
    ticket: str,
    since: float,
    now: float,
    fair_after: float,
) -> tuple[dict[str, Fit], list[str] | None]:
    """The verdict of each GPU of ``uuids`` on a request (:func:`evaluate`), and the GPUs that
    would serve it (:func:`place`), or None."""
    fits = {
        u: evaluate(
            states[u],
            gpus[u],
            need,
            owner=owner,
            context_bytes=context_bytes,
            ticket=ticket,
            since=since,
            now=now,
            fair_after=fair_after,
        )
        for u in uuids
    }
    return fits, place(need, fits, uuids, policy, index)


def waiter_of(
    need: Need, gpu: LedgerGpu, ticket: str, owner: str, test_id: str, context_bytes: int, since: float
) -> Waiter:
    """The waiter record of request ``ticket`` of ``owner`` for ``need`` on ``gpu``."""
    size = need.mem.resolve(gpu.total_bytes)
    return Waiter(ticket, owner, test_id, size, context_bytes, need.count, need.exclusive, since)


def place(
    need: Need, fits: Mapping[str, Fit], candidates: Sequence[str], policy: str, index: Mapping[str, int]
) -> list[str] | None:
    """The GPUs to lease on, in the order the holder should use them, or None if too few fit."""
    ok = [u for u in candidates if fits[u].ok]
    if len(ok) < need.count:
        return None
    first = [need.prefer] if need.prefer in ok else []
    rest = [u for u in ok if u not in first]
    sign = -1 if policy == "spread" else 1
    rest.sort(key=lambda u: (sign * fits[u].left, index[u]))
    return (first + rest)[: need.count]


def never_fits(need: Need, gpus: Sequence[LedgerGpu], context_bytes: int, test_id: str) -> str | None:
    """Why ``need`` can never be served on ``gpus`` (its candidates), or None if it could be.

    Judged against what each GPU could give with no other test running: its capacity less this
    process's CUDA context (``context_bytes``), which is there, booked or about to be, whenever
    this process holds a lease on the GPU.
    """
    if need.count > len(gpus):
        names = ", ".join(gpu_label(g) for g in gpus)
        available = f"only {len(gpus)} can serve it ({names})" if gpus else "no GPU can serve it"
        return f"{test_id} needs {need.count} GPUs, but {available}"
    fitting = 0
    reasons = []
    for gpu in gpus:
        want = need.mem.resolve(gpu.total_bytes)
        room = gpu.capacity_bytes - context_bytes
        if 0 < want <= room:
            fitting += 1
            continue
        text = f"{gpu_label(gpu)} can give at most {format_size(max(room, 0))}"
        if context_bytes:
            capacity = format_size(gpu.capacity_bytes)
            text += f" (capacity {capacity} less this process's {format_size(context_bytes)} CUDA context)"
        reasons.append(text)
    if fitting >= need.count:
        return None
    return f"{test_id} needs {need.describe()}, which this box can never give: " + "; ".join(reasons)
