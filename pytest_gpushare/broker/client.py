"""A worker's side of the session's broker: :class:`BrokerClient` leases as a
:class:`pytest_gpushare.ledger.Ledger` does (``acquire(need, test_id, timeout) -> Lease``,
``release(lease)``), so the per-process runtime can use either, and it can hand a carriable lease
to the worker's next test without a round trip (:meth:`BrokerClient.may_carry`,
:meth:`BrokerClient.carry`), watching for the broker's recalls in a thread of its own
(:meth:`BrokerClient.watch_recalls`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable

from pytest_gpushare.broker.protocol import (
    VERSION,
    Acquire,
    BrokerError,
    BrokerInput,
    Carry,
    FrameReader,
    Granted,
    Hello,
    LeaseCancelled,
    Message,
    Recall,
    Refused,
    Rejected,
    Release,
    Slot,
    Welcome,
    Withdraw,
    decode,
    encode,
    kind_of,
    need_to_wire,
)
from pytest_gpushare.broker.slot import SLOT_BYTES, SlotWriter
from pytest_gpushare.errors import LeaseTimeout, NeverFits
from pytest_gpushare.ledger import Lease, Need, Owner
from pytest_gpushare.threads import daemon_thread

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
        self._lock = threading.Lock()  # the request ids, answers and whose turn it is to read
        self._turn = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._pending: set[int] = set()
        self._answers: dict[int, Granted | Refused] = {}
        self._carriable: set[str] = set()  # leases the broker granted carriable
        self._recalled: set[str] = set()  # ... and those it asked back since
        self._watching = False  # a thread reads the connection for good (watch_recalls)
        self._slot: SlotWriter | None = None
        self._on_recall: Callable[[str], None] | None = None
        self._reading = False
        self._ids = iter(range(1, 2**62))
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(info["address"])
            self._sock.sendall(encode(Hello(VERSION, info["token"], worker_id)))
            answer = self._welcome(time.monotonic() + connect_timeout)
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

    def _welcome(self, deadline: float) -> Message:
        """The broker's first answer (a welcome or a rejection)."""
        messages: list[Message] = []
        while not messages:
            messages = self._receive(deadline)
        return messages[0]

    def acquire(self, need: Need, test_id: str, timeout: float) -> Lease:
        """Lease ``need`` for ``test_id``, waiting up to ``timeout`` seconds (negative or infinite:
        no limit). Raises :class:`NeverFits`, :class:`LeaseTimeout` (also when the broker does
        not answer within ``grace_s``, default :data:`GRACE_S`, past the timeout), :class:`LeaseCancelled`, or
        :class:`BrokerError`.

        Threads of one worker may wait at once (a fixture's ``lease()`` threads): each request
        has its own id, one thread at a time reads the connection and hands the others their
        answers, and a release never waits for another thread's request."""
        self._check_usable()
        with self._lock:
            request = next(self._ids)
            self._pending.add(request)
        wire_timeout = timeout if timeout >= 0 and math.isfinite(timeout) else -1.0
        start = time.monotonic()
        deadline = math.inf if wire_timeout < 0 else start + wire_timeout + self._grace_s
        try:
            self._send(Acquire(request, test_id, need_to_wire(need), wire_timeout))
            answer = self._answer_to(request, deadline)
        except TimeoutError:
            self._withdraw(request)
            waited = time.monotonic() - start
            raise LeaseTimeout(
                f"{test_id}: the session broker did not answer within {waited:.1f}s", waited
            ) from None
        except BrokerError:
            self._forget(request)
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
        self._check_usable()
        with self._lock:
            self._carriable.discard(lease.lease_id)
            self._recalled.discard(lease.lease_id)
        self._send(Release(lease.lease_id))

    def may_carry(self, lease: Lease) -> bool:
        """Whether ``lease`` may go on to another test: the broker granted it carriable and has
        not asked for it back (as far as its messages were read: see :meth:`watch_recalls`)."""
        return lease.lease_id in self._carriable and lease.lease_id not in self._recalled

    def carry(self, lease: Lease, test_id: str) -> Lease | None:
        """Hand ``lease`` to the test ``test_id`` without a round trip (the broker learns the new
        test id, one-way): the same memory, taken now, waited for 0 s. None when the broker has
        asked for it back meanwhile: then it is released, and the test must :meth:`acquire`."""
        self._check_usable()
        if not self.may_carry(lease):
            self.release(lease)
            return None
        taken = time.time()
        if self._slot is None or not self._slot.write(lease.lease_id, test_id, taken):
            self._send(Carry(lease.lease_id, test_id))
        # Made whole, not with dataclasses.replace, which looks the fields up on every call.
        return Lease(lease.lease_id, test_id, lease.owner, lease.parts, taken, 0.0, lease.exclusive)

    def watch_recalls(self, on_recall: Callable[[str], None]) -> None:
        """From now on, read the connection in a thread of its own, so that a recall is seen at
        once, also while the worker waits between two tests (xdist's next test may be slow to
        come): ``on_recall`` is called there with each recalled lease id. Requests' answers are
        filed for their threads as before."""
        self._check_usable()
        with self._lock:
            self._on_recall = on_recall
            if self._watching:
                return
            self._watching = True
        self._open_slot()
        daemon_thread(self._read_on, "gpushare-broker-recalls").start()

    def _open_slot(self) -> None:
        """Pass the broker a slot to read carried leases' holders from (:mod:`.slot`); where
        none can be made, each carry is a message."""
        try:
            slot = SlotWriter()
        except (OSError, AttributeError):  # no memfd here
            return
        assert slot.fd is not None
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [encode(Slot(SLOT_BYTES))], [slot.fd])
        except OSError as exc:
            raise BrokerError(f"the session broker is gone: {exc}") from None
        finally:
            slot.close_fd()
        self._slot = slot

    def _read_on(self) -> None:
        """The watching thread: read and file everything until the connection ends."""
        with self._lock:
            while self._reading:  # a request's thread reads now: wait for its turn to end
                self._turn.wait()
            self._reading = True
        try:
            while True:
                self._file(self._receive(math.inf))
        except (BrokerError, TimeoutError):
            pass  # closed: a request that waits takes the turn and learns it itself
        finally:
            with self._lock:
                self._reading = False
                self._turn.notify_all()

    def close(self) -> None:
        """Disconnect: the broker returns whatever this worker still holds."""
        with self._send_lock:
            with contextlib.suppress(OSError):  # wakes the watching thread (close alone does not)
                self._sock.shutdown(socket.SHUT_RDWR)
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
        with self._send_lock:
            try:
                self._sock.sendall(encode(message))
            except OSError as exc:
                raise BrokerError(f"the session broker is gone: {exc}") from None

    def _forget(self, request: int) -> None:
        with self._lock:
            self._pending.discard(request)
            self._answers.pop(request, None)

    def _withdraw(self, request: int) -> None:
        """Give up on ``request``: the broker forgets the wait; a grant that was already on its
        way is given back when it arrives (or here, if it has)."""
        with self._lock:
            self._pending.discard(request)
            late = self._answers.pop(request, None)
        with contextlib.suppress(BrokerError):
            self._send(Withdraw(request))
            if isinstance(late, Granted):
                self._send(Release(late.lease_id))

    def _answer_to(self, request: int, deadline: float) -> Granted | Refused:
        """The broker's answer to ``request``: one waiting thread at a time reads the
        connection, files every answer under its request, and wakes the others."""
        while True:
            with self._lock:
                while request not in self._answers and self._reading:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self._turn.wait(None if math.isinf(left) else left)
                if request in self._answers:
                    self._pending.discard(request)
                    return self._answers.pop(request)
                self._reading = True
            try:
                messages = self._receive(deadline)
            finally:
                with self._lock:
                    self._reading = False
                    self._turn.notify_all()
            self._file(messages)

    def _file(self, messages: list[Message]) -> None:
        """File answers under their requests and recalls; a late grant of a request no thread
        waits for any more is given back."""
        stale: list[Granted] = []
        recalled: list[str] = []
        with self._lock:
            for message in messages:
                if isinstance(message, Recall):
                    if message.lease_id in self._carriable:
                        self._recalled.add(message.lease_id)
                        recalled.append(message.lease_id)
                    continue
                if not isinstance(message, (Granted, Refused)):
                    raise BrokerError(f"the session broker sent {kind_of(message)} out of turn")
                if message.request in self._pending:
                    self._answers[message.request] = message
                    if isinstance(message, Granted) and message.carry:
                        self._carriable.add(message.lease_id)  # before a recall that follows it
                elif isinstance(message, Granted):
                    stale.append(message)
            self._turn.notify_all()
            on_recall = self._on_recall
        for granted in stale:
            self._send(Release(granted.lease_id))
        if on_recall is not None:
            for lease_id in recalled:
                on_recall(lease_id)

    def _receive(self, deadline: float) -> list[Message]:
        """The messages of one read; raises TimeoutError at ``deadline`` and BrokerError when
        the connection ends."""
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
        return [decode(payload) for payload in self._reader.feed(data)]


_KEPT: list[int] = []


def _keep(fds: list[int]) -> None:
    """Keep liveness descriptors open until this process ends (never inherited by a program it
    runs: a child that outlives the worker is not the worker)."""
    for fd in fds:
        os.set_inheritable(fd, False)
        _KEPT.append(fd)
