"""The session's broker and its workers: typed messages in length-prefixed frames over a Unix
stream socket, and who may speak at all.

A frame is a 4-byte big-endian length and that many bytes of a JSON array: the message's kind,
then its fields in order (arrays, not objects: they are quicker to write and to read). A worker
opens with :class:`Hello` (protocol version, the session's token, its worker id); the broker
answers :class:`Welcome`, passing its liveness descriptor along with it (``SCM_RIGHTS``), or
:class:`Rejected`. Then the worker sends :class:`Acquire`, :class:`Release` (no answer: the
connection keeps order, so memory a worker released is free for its next request) and
:class:`Withdraw` (it gave up waiting); the broker answers each :class:`Acquire` with one
:class:`Granted` or :class:`Refused`, which may also carry descriptors.

A lease the broker marks carriable (:attr:`Granted.carry`) may go on to the worker's next test
of the same need without a round trip: the worker says so with :class:`Carry` (one-way: the
running test's id, for ``gpushare status``). The broker asks for such a lease back with
:class:`Recall` (one-way, any time) when a request waits on its GPU; the worker reads recalls
as they come, and releases a recalled lease instead of carrying it. Rather than a
:class:`Carry` per test, a worker may pass a shared memory slot once (:class:`Slot`, its
descriptor along with it) and write each new holder there (:mod:`.slot`).

Peers are trusted only when three things hold: the socket lives in a folder of mode 0700, the
kernel says the peer runs under our uid (``SO_PEERCRED``), and the peer knows the token that the
controller handed its workers.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any, ForwardRef, NamedTuple, TypedDict

from pytest_gpushare.errors import BrokerError, LeaseCancelled
from pytest_gpushare.ledger import Need
from pytest_gpushare.units import MemRequest

__all__ = [
    "MAX_FRAME",
    "VERSION",
    "Acquire",
    "BrokerError",
    "BrokerInput",
    "Carry",
    "FrameReader",
    "Granted",
    "Hello",
    "LeaseCancelled",
    "Message",
    "ProtocolError",
    "Recall",
    "Refused",
    "Rejected",
    "Release",
    "Slot",
    "Welcome",
    "Withdraw",
    "decode",
    "encode",
    "kind_of",
    "need_from_wire",
    "need_to_wire",
    "peer_credentials",
]

VERSION = 2
#: No message comes near this; a larger length means a confused or hostile peer.
MAX_FRAME = 1 << 20
_LENGTH = struct.Struct("!I")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ProtocolError(BrokerError):
    """A frame or message that does not follow this module."""


class BrokerInput(TypedDict):
    """What a worker needs to reach its session's broker (carried in xdist's ``workerinput``)."""

    version: int
    address: str
    token: str
    session_id: str


class Hello(NamedTuple):
    version: int
    token: str
    worker_id: str


class Welcome(NamedTuple):
    """The broker took the worker in; its liveness descriptor travels with this message."""

    version: int
    session_id: str


class Rejected(NamedTuple):
    reason: str


class Acquire(NamedTuple):
    """``need`` as :func:`need_to_wire` writes it; ``timeout`` < 0: wait without limit."""

    request: int
    test_id: str
    need: list[Any]
    timeout: float


class Release(NamedTuple):
    lease_id: str


class Withdraw(NamedTuple):
    """The worker stopped waiting for ``request`` (its own deadline passed, or it was interrupted)."""

    request: int


class Granted(NamedTuple):
    """``parts``: ``[uuid, bytes]`` in the order the test should use its GPUs; ``carry``: the
    lease may go on to the worker's next test of the same need (:class:`Carry`)."""

    request: int
    lease_id: str
    parts: list[list[Any]]
    taken_at: float
    waited_s: float
    exclusive: bool
    carry: bool


class Carry(NamedTuple):
    """The worker's carriable lease ``lease_id`` now belongs to its test ``test_id``."""

    lease_id: str
    test_id: str


class Slot(NamedTuple):
    """The worker's slot (:mod:`.slot`) of ``size`` bytes travels with this message."""

    size: int


class Recall(NamedTuple):
    """The broker wants lease ``lease_id`` back: the worker must not carry it to another test."""

    lease_id: str


class Refused(NamedTuple):
    """``reason``: ``"never"`` (NeverFits), ``"timeout"`` (LeaseTimeout), ``"cancelled"``
    (LeaseCancelled) or ``"error"`` (a bad request or a broken ledger: BrokerError)."""

    request: int
    reason: str
    message: str
    waited_s: float
    holders: list[str]


Message = (
    Hello | Welcome | Rejected | Acquire | Release | Withdraw | Granted | Refused | Carry | Slot | Recall
)
_KIND: dict[type[Message], str] = {
    Hello: "hello",
    Welcome: "welcome",
    Rejected: "rejected",
    Acquire: "acquire",
    Release: "release",
    Withdraw: "withdraw",
    Granted: "granted",
    Refused: "refused",
    Carry: "carry",
    Slot: "slot",
    Recall: "recall",
}
#: What each annotation (a string, under ``from __future__ import annotations``) accepts on the
#: wire, by exact type (so that JSON's true is no number).
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "str": (str,),
    "float": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
    "list[Any]": (list,),
    "list[list[Any]]": (list,),
}


def _note(annotation: object) -> str:
    """An annotation as written (NamedTuple keeps string annotations as forward references)."""
    return annotation.__forward_arg__ if isinstance(annotation, ForwardRef) else str(annotation)


_SHAPE: dict[str, tuple[type[Message], tuple[tuple[str, str, tuple[type, ...]], ...]]] = {
    kind: (cls, tuple((name, _note(ann), _ACCEPTS[_note(ann)]) for name, ann in cls.__annotations__.items()))
    for cls, kind in _KIND.items()
}


def kind_of(message: Message) -> str:
    return _KIND[type(message)]


def encode(message: Message) -> bytes:
    """One frame holding ``message``: a JSON array of its kind and its fields in order."""
    data = _ENCODER.encode([_KIND[type(message)], *message]).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"a {kind_of(message)} message of {len(data)} bytes is over the frame limit")
    return _LENGTH.pack(len(data)) + data


def decode(payload: bytes) -> Message:
    """The message in one frame's payload; raises :class:`ProtocolError` on anything else."""
    try:
        body = _DECODER.decode(payload.decode())
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"a frame is not JSON: {exc}") from None
    if type(body) is not list or not body or body[0] not in _SHAPE:
        raise ProtocolError("a frame names no known message")
    cls, fields = _SHAPE[body[0]]
    if len(body) != len(fields) + 1:
        raise ProtocolError(f"{body[0]}: {len(body) - 1} fields, not {len(fields)}")
    for value, (name, note, accepts) in zip(body[1:], fields, strict=True):
        if type(value) not in accepts:
            raise ProtocolError(f"{body[0]}: {name} is not a {note}")
    return cls._make(body[1:])


class FrameReader:
    """Cuts a byte stream into frame payloads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The payloads that ``data`` completes, in order."""
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ProtocolError(f"a frame of {size} bytes is over the limit")
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            yield payload


def need_to_wire(need: Need) -> list[Any]:
    allowed = None if need.allowed is None else list(need.allowed)
    return [need.mem.bytes, need.mem.percent, need.count, need.exclusive, need.prefer, allowed]


def need_from_wire(data: list[Any]) -> Need:
    """The :class:`Need` that :func:`need_to_wire` wrote; raises :class:`ProtocolError`."""
    if len(data) != 6:
        raise ProtocolError(f"not a memory need: {str(data)[:200]}")
    size, percent, count, exclusive, prefer, allowed = data
    mem = _mem_from_wire(size, percent)
    if (
        mem is None
        or type(count) is not int
        or count < 1
        or type(exclusive) is not bool
        or not (prefer is None or type(prefer) is str)
        or not (allowed is None or (type(allowed) is list and all(type(u) is str for u in allowed)))
    ):
        raise ProtocolError(f"not a memory need: {str(data)[:200]}")
    return Need(mem, count, exclusive, prefer, None if allowed is None else tuple(allowed))


def _mem_from_wire(size: object, percent: object) -> MemRequest | None:
    if percent is None and isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return MemRequest(bytes=size)
    if (
        size is None
        and isinstance(percent, (int, float))
        and not isinstance(percent, bool)
        and 0 < percent <= 100
    ):
        return MemRequest(percent=float(percent))
    return None


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, _gid = _CRED.unpack(raw)
    return pid, uid
