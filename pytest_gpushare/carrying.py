"""A lease kept at the end of one test for the worker's next test of the same need.

Under a session broker a worker's test need not give its lease back when its next test asks for
exactly the same (the same need, placement and role): the lease goes on to that test without a
round trip, as long as the broker granted it carriable and has not asked for it back
(:mod:`pytest_gpushare.broker.client`). :class:`CarriedLease` holds such a lease between the two
tests; :class:`~pytest_gpushare.runtime.Runtime` asks it at each release and acquire.

Between two tests a worker may wait for xdist to send it more work; a recall that comes then is
answered at once: the carrier's reading thread hands it here, and the kept lease goes back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pytest_gpushare.errors import GpuShareError

if TYPE_CHECKING:
    from pytest_gpushare.ledger import Lease, Need

__all__ = ["CarriedLease", "Carrier"]


class Carrier(Protocol):
    """A lessor that lets a lease go on to another test (the broker's client; the box ledger
    would have to rewrite the shared file to name the new test)."""

    def may_carry(self, lease: Lease) -> bool: ...
    def carry(self, lease: Lease, test_id: str) -> Lease | None: ...
    def watch_recalls(self, on_recall: Callable[[str], None]) -> None: ...


class CarriedLease:
    """At most one lease kept for the next test; ``give_back`` releases one that is not taken.
    Threads may lease at once (``lease()`` blocks) and recalls come in a thread of their own:
    the kept lease is taken out under a lock, by one of them only."""

    def __init__(self, carrier: Carrier, give_back: Callable[[Lease], None]) -> None:
        self._carrier = carrier
        self._give_back = give_back
        self._lock = threading.Lock()
        self._kept: tuple[Need, Lease] | None = None

    def keep(self, lease: Lease, need: Need | None, then: Need | None) -> bool:
        """Keep ``lease`` (granted for ``need``) for a next test that asks for ``then``, if it
        may be carried: the same need, a carriable lease the broker has not asked back."""
        # ``is`` first: the runtime asks with the same Need object for the same need.
        if then is None or (then is not need and then != need) or not self._carrier.may_carry(lease):
            return False
        try:
            self._carrier.watch_recalls(self._recalled)
        except (GpuShareError, OSError):
            return False
        with self._lock:
            if self._kept is not None:
                return False
            self._kept = (then, lease)
        return True

    def take(self, need: Need, test_id: str) -> Lease | None:
        """The kept lease, now ``test_id``'s, if it was kept for ``need`` and the broker has not
        asked for it back; a kept lease of another need is given back."""
        kept = self._pop()
        if kept is None:
            return None
        kept_for, lease = kept
        if kept_for is not need and kept_for != need:
            self._give_back(lease)
            return None
        try:
            return self._carrier.carry(lease, test_id)
        except (GpuShareError, OSError):
            return None  # the broker is gone: the acquire that follows says so

    def drop(self, unless: Need | None = None) -> None:
        """Give back a kept lease that its test did not take (it did not run, or did not lease),
        unless it was kept for ``unless``, what the test after asks for, and may still be
        carried."""
        kept = self._pop()
        if kept is None:
            return
        if unless is not None and unless == kept[0] and self._carrier.may_carry(kept[1]):
            with self._lock:
                if self._kept is None:
                    self._kept = kept
                    return
        self._give_back(kept[1])

    def forget(self) -> None:
        """Forget a kept lease without giving it back (the connection that holds it closes)."""
        self._pop()

    def _recalled(self, lease_id: str) -> None:
        """The broker asked for ``lease_id`` back (the carrier's reading thread): if it is the
        kept lease, no test holds it now: it goes back at once."""
        with self._lock:
            if self._kept is None or self._kept[1].lease_id != lease_id:
                return
            kept, self._kept = self._kept, None
        self._give_back(kept[1])

    def _pop(self) -> tuple[Need, Lease] | None:
        with self._lock:
            kept, self._kept = self._kept, None
        return kept
