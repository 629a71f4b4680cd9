"""A ledger held up to the source of truth, its live owners' holdings: rebuilt from them, or
made to agree with them.

Every owner writes what it holds into its liveness file before a grant reaches a ledger and
after a release has left one (:mod:`.holder`), so a live owner's holdings list at least what the
ledgers do, and exactly that between its accesses. A ledger is only a shared summary of them:

* :func:`rebuild` makes a ledger for a GPU from the holdings of the owners still alive (a
  missing or damaged ledger); an owner alive but with unreadable holdings gets a placeholder
  booking of the whole GPU, never a guess;
* :func:`reconcile` makes a ledger that was read list, for every live owner, the bookings its
  holdings list on that GPU and the usable memory it recorded there (issue 15: a well-formed
  ledger that left a live holder's booking out, or raised the limit, was believed until that
  holder's next access). Holdings are parsed once per version of the file
  (:func:`pytest_gpushare.ledger.probe.holdings_of`), so this costs a ``pread`` of each owner's
  header line per access.

Only owners verified alive are compared: a dead one is reclaimed, and an unverifiable one has no
holdings to compare with (its ledger entries stand while it is trusted). This process's own
owner is left to :mod:`.holder`, which knows better than its file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpushare.ledger.codec import Damaged
from pytest_gpushare.ledger.probe import ALIVE
from pytest_gpushare.ledger.records import UNKNOWN, Booking, GpuState, Holdings, Owner
from pytest_gpushare.units import format_size

if TYPE_CHECKING:
    from pytest_gpushare.ledger.access import Access

__all__ = ["PLACEHOLDER_BYTES", "rebuild", "reconcile"]

#: What a live owner with unreadable holdings is assumed to hold on a rebuilt GPU: all of it.
PLACEHOLDER_BYTES = 2**50


def rebuild(acc: Access, uuid: str) -> GpuState:
    """A ledger for ``uuid`` from the holdings of the owners still alive."""
    state = GpuState(uuid=uuid)
    for key in acc.owner_keys():
        if not acc.alive(key):
            continue
        try:
            holdings = acc.holdings(key)
        except Damaged as exc:
            _assume_all(acc, state, key, str(exc))
            continue
        if holdings is not None:
            _agree(acc, state, key, holdings, quiet=True)
    return state


def reconcile(acc: Access, state: GpuState) -> bool:
    """Make ``state`` agree with the holdings of its live owners (and of live owners it lacks);
    True if it changed."""
    keys = set(acc.owner_keys()) | set(state.owners) | {b.owner for b in state.bookings}
    if acc.me is not None:
        keys.discard(acc.me)
    changed = False
    for key in sorted(keys):
        if acc.verdict(key).state != ALIVE:
            continue
        try:
            holdings = acc.holdings(key)
        except Damaged as exc:
            if key not in state.owners:  # a live owner the ledger never heard of: assume the worst
                _assume_all(acc, state, key, str(exc))
                changed = True
            continue
        if holdings is not None and not _agrees(state, key, holdings):
            changed = _agree(acc, state, key, holdings, quiet=False) or changed
    return changed


def _agrees(state: GpuState, key: str, holdings: Holdings) -> bool:
    """Whether ``state`` already shows what ``holdings`` say (the common case, checked cheaply:
    the record itself, then the bookings in the order the owner wrote them)."""
    uuid = state.uuid
    record = holdings.record_on(uuid)
    want = holdings.bookings.get(uuid, [])
    if record.usable_bytes is None and not want:
        return key not in state.owners  # no business here (the waiters of an owner are its own)
    return state.owners.get(key) == record and [b for b in state.bookings if b.owner == key] == want


def _agree(acc: Access, state: GpuState, key: str, holdings: Holdings, *, quiet: bool) -> bool:
    """Make ``state`` show what ``holdings`` (owner ``key``'s) say about its GPU; True if it changed."""
    uuid = state.uuid
    want = holdings.bookings.get(uuid, [])
    record = holdings.record_on(uuid)
    usable = record.usable_bytes
    have = [b for b in state.bookings if b.owner == key]
    waits = any(w.owner == key for w in state.waiters)
    if not want and usable is None and not waits:
        # The owner does not use this GPU: nothing of it belongs in this ledger.
        if key not in state.owners and not have:
            return False
        _drop_extra(acc, state, key, have, [], quiet)
        state.owners.pop(key, None)
        state.bookings = [b for b in state.bookings if b.owner != key]
        return True
    changed = False
    if set(have) != set(want):
        _drop_extra(acc, state, key, have, want, quiet)
        _restore_missing(acc, state, key, have, want, quiet)
        state.bookings = [b for b in state.bookings if b.owner != key] + list(want)
        changed = True
    old = state.owners.get(key)
    if old != record:
        if not quiet and old is not None and _above(old.usable_bytes, usable):
            _say(
                acc,
                state,
                f"recorded {format_size(old.usable_bytes or 0)} usable for {record.describe()}, whose "
                f"holdings say {_size(usable)}; corrected it",
            )
        state.owners[key] = record
        changed = True
    return changed


def _above(ledger: int | None, holdings: int | None) -> bool:
    """Whether the ledger's figure would let more be granted than the owner's own."""
    return ledger is not None and (holdings is None or ledger > holdings)


def _size(value: int | None) -> str:
    return "none" if value is None else format_size(value)


def _drop_extra(
    acc: Access, state: GpuState, key: str, have: list[Booking], want: list[Booking], quiet: bool
) -> None:
    extra = [b for b in have if b not in want and b.kind != UNKNOWN]
    if extra and not quiet:
        _say(
            acc,
            state,
            f"listed {len(extra)} booking(s) of {_who(state, key)} that its holdings do not "
            f"({', '.join(b.test_id for b in extra)}); dropped them",
        )


def _restore_missing(
    acc: Access, state: GpuState, key: str, have: list[Booking], want: list[Booking], quiet: bool
) -> None:
    missing = [b for b in want if b not in have]
    if missing and not quiet and not any(b.kind == UNKNOWN for b in have):
        _say(
            acc,
            state,
            f"lacked {len(missing)} booking(s) of {_who(state, key)} that its holdings list "
            f"({', '.join(b.test_id for b in missing)}); restored them",
        )


def _say(acc: Access, state: GpuState, what: str) -> None:
    text = f"gpushare: the ledger of {acc.label(state)} {what}"
    acc.log(text)
    state.remember(acc.now, "restored", text)


def _who(state: GpuState, key: str) -> str:
    owner = state.owners.get(key)
    return owner.describe() if owner else f"owner {key}"


def _assume_all(acc: Access, state: GpuState, key: str, why: str) -> None:
    """Unknown holdings of a live owner: never guess low, book the whole GPU for it."""
    state.owners[key] = Owner(key, int(key.partition("-")[0]), "?", "?", "?", "?", None, None, acc.now)
    text = f"(unreadable holdings: {why})"[:200]
    state.bookings = [b for b in state.bookings if b.owner != key]
    state.bookings.append(Booking(f"{key}-unknown", key, text, PLACEHOLDER_BYTES, UNKNOWN, acc.now))
