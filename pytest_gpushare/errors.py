"""The plugin's exceptions: small, picklable, with their data in attributes.

They cross process boundaries (an xdist worker's failure is pickled into its report),
so every class keeps the arguments it was built with in ``args``.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "GpuShareError",
    "LeaseCancelled",
    "LeaseTimeout",
    "LedgerError",
    "LockTimeout",
    "NeverFits",
    "ReleaseDeferred",
    "SettingError",
]


class GpuShareError(Exception):
    """Base of every error raised by pytest-gpushare."""


class SettingError(GpuShareError, ValueError):
    """A setting, marker argument or size that cannot be used.

    The message is one line that quotes the bad value and names where it came from;
    the pytest edge turns it into a usage error (exit code 4) or a failed test.
    """


class LedgerError(GpuShareError):
    """The ledger folder or a ledger file cannot be used safely (never a silent fallback)."""


class LockTimeout(LedgerError, TimeoutError):
    """A lock of the ledger folder stayed taken until the caller's deadline.

    ``holder`` describes who holds it as the kernel says (its pid, command and whether it is
    stopped), or says that it cannot be seen from here; the message includes it.
    """

    def __init__(self, message: str, path: str, holder: str) -> None:
        super().__init__(message, path, holder)
        self.message = message
        self.path = path
        self.holder = holder

    def __str__(self) -> str:
        return self.message


class ReleaseDeferred(LedgerError):
    """A lease could not be taken out of the ledger (the folder takes no writes, or its lock
    stayed taken): it stays booked, on the safe side, until this process's next access to the
    ledger succeeds or the process ends. The message is one line that says so and why."""

    def __init__(self, message: str, lease_id: str, test_id: str) -> None:
        super().__init__(message, lease_id, test_id)
        self.message = message
        self.lease_id = lease_id
        self.test_id = test_id

    def __str__(self) -> str:
        return self.message


class NeverFits(GpuShareError):
    """A need that no GPU of this box could ever serve; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LeaseTimeout(GpuShareError, TimeoutError):
    """A lease was not granted within its timeout.

    ``message`` is the whole text, who held the GPU(s) included; ``holders`` lists the same
    holders as data, one line each.
    """

    def __init__(self, message: str, waited: float, holders: tuple[str, ...] = ()) -> None:
        super().__init__(message, waited, holders)
        self.message = message
        self.waited = waited
        self.holders = holders

    def __str__(self) -> str:
        return self.message


class BrokerError(GpuShareError):
    """The session's broker cannot be reached, refused this worker, or broke the protocol."""


class LeaseCancelled(GpuShareError):
    """The session is stopping (``-x``, ``--maxfail``, Ctrl-C): a waiting request was answered
    at once instead of being served. ``test_id`` is the request's test."""

    def __init__(self, test_id: str) -> None:
        super().__init__(test_id)
        self.test_id = test_id

    def __str__(self) -> str:
        return f"{self.test_id}: the session is stopping; its wait for GPU memory was cancelled"
