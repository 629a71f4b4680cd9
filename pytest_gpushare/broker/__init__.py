"""The session's memory broker: under xdist, workers lease from the controller's memory.

Every GPU test of every worker used to rewrite the shared box ledger twice (grant and release)
under a file lock. Under xdist the controller now runs a :class:`Broker`: workers ask it for
leases over a Unix socket (:class:`BrokerClient`, same shapes as
:class:`pytest_gpushare.ledger.Ledger`) and get answers from memory. The box ledger holds the
session's bookings under the controller's owner as *chunks*, grown when the session needs more
and given back when no test needs them (within ``2 * LINGER_S`` of their last use, at once when
another session waits). Each running test stays visible to ``gpushare status`` through a per-session file
(:func:`read_running`).

Inside, from the bottom up: :mod:`.protocol` (messages, frames, who may connect),
:mod:`.pool` (the session's memory per GPU, decided by the box ledger's own rules),
:mod:`.status` (the running file), :mod:`.box` (the box ledger's owners and the threads that wait
on it), :mod:`.giveback` (when memory goes back), :mod:`.engine` (the decisions),
:mod:`.server` (the serving thread), :mod:`.client`.

Crash semantics: a worker that dies returns its leases at once (its connection closes); a
controller that dies does not free what its still-running workers hold (they keep the owners'
liveness descriptors, passed to them over the socket); a stopped controller makes no other
session wait past its own timeout (its workers give up :data:`GRACE_S` past theirs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpushare.lazy import lazy_exports

if TYPE_CHECKING:
    from pytest_gpushare.broker.client import GRACE_S, BrokerClient
    from pytest_gpushare.broker.giveback import LINGER_S
    from pytest_gpushare.broker.protocol import BrokerInput
    from pytest_gpushare.broker.server import Broker, Listener
    from pytest_gpushare.broker.status import RunningDoc, live_owner_keys, read_running
    from pytest_gpushare.errors import BrokerError, LeaseCancelled

#: public name -> the module that defines it. Imported on first use (PEP 562): a worker needs the
#: client alone, the controller the server, ``gpushare status`` the running file.
_HOMES = {
    "GRACE_S": "pytest_gpushare.broker.client",
    "LINGER_S": "pytest_gpushare.broker.giveback",
    "Broker": "pytest_gpushare.broker.server",
    "BrokerClient": "pytest_gpushare.broker.client",
    "BrokerError": "pytest_gpushare.errors",
    "BrokerInput": "pytest_gpushare.broker.protocol",
    "LeaseCancelled": "pytest_gpushare.errors",
    "Listener": "pytest_gpushare.broker.server",
    "RunningDoc": "pytest_gpushare.broker.status",
    "live_owner_keys": "pytest_gpushare.broker.status",
    "read_running": "pytest_gpushare.broker.status",
}

__all__ = [
    "GRACE_S",
    "LINGER_S",
    "Broker",
    "BrokerClient",
    "BrokerError",
    "BrokerInput",
    "LeaseCancelled",
    "Listener",
    "RunningDoc",
    "live_owner_keys",
    "read_running",
]

__getattr__, __dir__ = lazy_exports(globals(), _HOMES)
