"""STOPGAP until the ledger's facade offers ``Ledger.liveness_fd()`` (requested in issue 13):
the broker's tests reach the liveness descriptor through the ledger's private attributes.
Delete this module, and the ``descriptor_of=`` arguments that use it, once the facade has it."""

from __future__ import annotations

from pytest_gpushare.ledger import Ledger


def liveness_descriptor(ledger: Ledger) -> int | None:
    """The descriptor that holds ``ledger``'s liveness lock (private: ``_holder._live._fd``)."""
    method = getattr(ledger, "liveness_fd", None)
    if method is not None:
        return int(method())
    live = getattr(getattr(ledger, "_holder", None), "_live", None)
    fd = getattr(live, "_fd", None)
    return fd if isinstance(fd, int) else None
