"""A worker's side of the session's broker: :class:`BrokerClient` leases as a
:class:`pytest_gpushare.ledger.Ledger` does (``acquire(need, test_id, timeout) -> Lease``,
``release(lease)``), so the per-process runtime can use either.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time

from pytest_gpushare.broker.protocol import (
    VERSION,
    Acquire,
    BrokerError,
    BrokerInput,
    FrameReader,
    Granted,
    Hello,
    LeaseCancelled,
    Message,
    Refused,
    Rejected,
    Release,
    Welcome,
    Withdraw,
    decode,
    encode,
    kind_of,
    need_to_wire,
)
from pytest_gpushare.errors import LeaseTimeout, NeverFits
from pytest_gpushare.ledger import Lease, Need, Owner

__all__ = ["GRACE_S", "BrokerClient"]

#: A worker waits this long past its own timeout for the broker's answer before it gives up on
#: it: a stopped controller must not hold a test past its timeout for long.
GRACE_S = 5.0
_MAX_FDS = 8


class BrokerClient:
    """One worker's connection to its session's broker.

    The liveness descriptors the broker passes along are kept open for the life of this process,
    even after :meth:`close`: they keep the session's memory booked while this worker may still
    use it, should the controller die first.
    """

    def __init__(
        self, info: BrokerInput, worker_id: str, *, connect_timeout: float = 30.0, grace_s: float = GRACE_S
    ) -> None:
        if info["version"] != VERSION:
            raise BrokerError(f"the session broker speaks protocol {info['version']}; this worker {VERSION}")
        self.owner = Owner.current(info["session_id"], worker_id)
        self._grace_s = grace_s
        self._reader = FrameReader()
        self._inbox: list[Message] = []
        self._lock = threading.Lock()
        self._ids = iter(range(1, 2**62))
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(info["address"])
            self._sock.sendall(encode(Hello(VERSION, info["token"], worker_id)))
            answer = self._receive(time.monotonic() + connect_timeout)
        except OSError as exc:
            self._sock.close()
            raise BrokerError(f"cannot reach the session broker at {info['address']}: {exc}") from None
        except BaseException:
            self._sock.close()
            raise
        if not isinstance(answer, Welcome):
            self._sock.close()
            reason = answer.reason if isinstance(answer, Rejected) else f"it answered {kind_of(answer)}"
            raise BrokerError(f"the session broker refused this worker: {reason}")

    def acquire(self, need: Need, test_id: str, timeout: float) -> Lease:
        """Lease ``need`` for ``test_id``, waiting up to ``timeout`` seconds (negative or infinite:
        no limit). Raises :class:`NeverFits`, :class:`LeaseTimeout` (also when the broker does
        not answer within ``grace_s``, default :data:`GRACE_S`, past the timeout), :class:`LeaseCancelled`, or
        :class:`BrokerError`."""
        with self._lock:
            self._check_usable()
            request = next(self._ids)
            wire_timeout = timeout if timeout >= 0 and math.isfinite(timeout) else -1.0
            start = time.monotonic()
            deadline = math.inf if wire_timeout < 0 else start + wire_timeout + self._grace_s
            self._send(Acquire(request, test_id, need_to_wire(need), wire_timeout))
            try:
                answer = self._answer_to(request, deadline)
            except TimeoutError:
                self._withdraw(request)
                waited = time.monotonic() - start
                raise LeaseTimeout(
                    f"{test_id}: the session broker did not answer within {waited:.1f}s", waited
                ) from None
            except BrokerError:
                raise
            except BaseException:
                self._withdraw(request)  # interrupted (Ctrl-C): the broker forgets the wait
                raise
        if isinstance(answer, Granted):
            parts = tuple((str(u), int(n)) for u, n in answer.parts)
            return Lease(
                answer.lease_id,
                test_id,
                self.owner,
                parts,
                answer.taken_at,
                answer.waited_s,
                answer.exclusive,
            )
        if answer.reason == "never":
            raise NeverFits(answer.message)
        if answer.reason == "timeout":
            raise LeaseTimeout(answer.message, answer.waited_s, tuple(answer.holders))
        if answer.reason == "cancelled":
            raise LeaseCancelled(test_id)
        raise BrokerError(answer.message)

    def release(self, lease: Lease) -> None:
        """Give the lease back. No answer is awaited: the broker reads this connection in order,
        so the memory is free for this worker's next request."""
        with self._lock:
            self._check_usable()
            self._send(Release(lease.lease_id))

    def close(self) -> None:
        """Disconnect: the broker returns whatever this worker still holds."""
        with self._lock:
            self._sock.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the connection -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise BrokerError(
                "this broker connection belongs to another process; a forked child needs its own"
            )
        if self._sock.fileno() < 0:
            raise BrokerError("this broker connection is closed")

    def _send(self, message: Message) -> None:
        try:
            self._sock.sendall(encode(message))
        except OSError as exc:
            raise BrokerError(f"the session broker is gone: {exc}") from None

    def _withdraw(self, request: int) -> None:
        with contextlib.suppress(BrokerError):
            self._send(Withdraw(request))

    def _answer_to(self, request: int, deadline: float) -> Granted | Refused:
        """The broker's answer to ``request``. A late answer to an earlier request that this
        worker gave up on is dropped, its lease given back."""
        while True:
            message = self._receive(deadline)
            if not isinstance(message, (Granted, Refused)):
                raise BrokerError(f"the session broker sent {kind_of(message)} out of turn")
            if message.request == request:
                return message
            if isinstance(message, Granted):
                self._send(Release(message.lease_id))

    def _receive(self, deadline: float) -> Message:
        """The next message; raises TimeoutError at ``deadline`` and BrokerError when the
        connection ends."""
        while not self._inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(None if math.isinf(left) else left)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, 65536, _MAX_FDS)
            except (TimeoutError, BlockingIOError):
                raise TimeoutError from None
            except OSError as exc:
                raise BrokerError(f"the session broker is gone: {exc}") from None
            _keep(fds)
            if not data:
                raise BrokerError("the session broker is gone: it closed the connection")
            for payload in self._reader.feed(data):
                self._inbox.append(decode(payload))
        return self._inbox.pop(0)


_KEPT: list[int] = []


def _keep(fds: list[int]) -> None:
    """Keep liveness descriptors open until this process ends (never inherited by a program it
    runs: a child that outlives the worker is not the worker)."""
    for fd in fds:
        os.set_inheritable(fd, False)
        _KEPT.append(fd)
