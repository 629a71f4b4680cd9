"""The session's broker in the controller: one thread serving every worker's connection.

The thread waits in a ``selectors`` loop on the listening socket, the workers' connections and a
wake-up pipe that the box's threads (:mod:`.box`) and the controller's own calls write to. It
never waits on anything else: what may wait (the box ledger) runs in other threads and comes
back as events. Decisions are the :class:`~pytest_gpushare.broker.engine.Engine`'s.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import os
import queue
import secrets
import selectors
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_gpushare.broker import protocol as proto
from pytest_gpushare.broker.box import Box, DescriptorOf, Done, OpenLedger, facade_descriptor
from pytest_gpushare.broker.engine import PUBLISH_S, Engine
from pytest_gpushare.broker.giveback import LINGER_S, WATCH_S
from pytest_gpushare.broker.slot import SlotReader
from pytest_gpushare.ledger import FAIR_AFTER_S
from pytest_gpushare.threads import daemon_thread

__all__ = ["Broker", "Listener"]

#: Unix socket paths must fit in ``sun_path`` (108 bytes on Linux, with its terminating zero).
_MAX_SOCKET_PATH = 100
_SOCKET_NAME = "s"
#: The serving thread sleeps at most this long at once (epoll refuses longer timeouts).
_LONGEST_WAIT_S = 3600.0


@dataclass
class _Conn:
    sock: socket.socket
    pid: int
    reader: proto.FrameReader = field(default_factory=proto.FrameReader)
    out: deque[tuple[memoryview, list[int]]] = field(default_factory=deque)
    worker_id: str | None = None  # set by its hello
    writing: bool = False
    fds: list[int] = field(default_factory=list)  # received, for the message they came with


@dataclass(frozen=True)
class Listener:
    """The broker's listening socket, its private folder and the token workers must show: made
    before the broker itself where workers must learn the address before the session knows it
    needs a broker (the xdist controller hands it out when it starts its workers)."""

    folder: Path
    address: str
    sock: socket.socket
    token: str

    @classmethod
    def open(cls, socket_dir: str | os.PathLike[str] | None = None) -> Listener:
        folder = _socket_dir(socket_dir)
        address = str(folder / _SOCKET_NAME)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            sock.listen(512)
        except OSError:
            sock.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, address, sock, secrets.token_hex(16))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class _Call:
    """A call of the controller's thread, run on the serving thread: ``result`` is set after."""

    action: Callable[[], int]
    finished: threading.Event = field(default_factory=threading.Event)
    result: list[int] = field(default_factory=list)


class Broker:
    """The session's memory broker, started by the xdist controller (see the package docstring).

    ``open_ledger`` opens the session's box ledger for an owner (folder, GPUs, policy, log and
    refresh are the caller's); the controller's owner is opened here at once, so a broken ledger
    folder raises from the constructor. ``descriptor_of`` gives a ledger's liveness descriptor,
    which workers keep so that a dead controller does not free what they hold. ``listener``: a
    :class:`Listener` opened beforehand (whose address workers already have), else one is opened.
    """

    def __init__(
        self,
        open_ledger: OpenLedger,
        *,
        session_id: str,
        context_bytes: int,
        policy: str = "spread",
        fair_after: float = FAIR_AFTER_S,
        linger_s: float = LINGER_S,
        watch_s: float = WATCH_S,
        publish_s: float = PUBLISH_S,
        socket_dir: str | os.PathLike[str] | None = None,
        listener: Listener | None = None,
        descriptor_of: DescriptorOf = facade_descriptor,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._log = log if log is not None else (lambda _line: None)
        self._events: queue.SimpleQueue[Done | _Call] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.box = Box(
            open_ledger,
            session_id=session_id,
            context_bytes=context_bytes,
            report=self._post,
            descriptor_of=descriptor_of,
            log=self._log,
        )
        self._engine = Engine(
            self.box,
            self._send,
            context_bytes=context_bytes,
            policy=policy,
            fair_after=fair_after,
            linger_s=linger_s,
            watch_s=watch_s,
            publish_s=publish_s,
        )
        self._listening = listener if listener is not None else Listener.open(socket_dir)
        self.token = self._listening.token
        self.address = self._listening.address
        self._listener = self._listening.sock
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._closed = False
        self._thread = daemon_thread(self._serve, "gpushare-broker")
        self._thread.start()

    def worker_input(self) -> proto.BrokerInput:
        """What each worker needs to connect: put it into xdist's ``workerinput``."""
        return proto.BrokerInput(
            version=proto.VERSION, address=self.address, token=self.token, session_id=self.box.session_id
        )

    def waiting(self) -> dict[str, float]:
        """Each worker with a request that waits now, and when (``time.monotonic()``) its oldest
        one began; read-only, for the xdist scheduler on the controller's main thread (a copy of
        the engine's list is one step under the GIL, and a request's fields never change)."""
        found: dict[str, float] = {}
        for p in list(self._engine._queue):
            found.setdefault(p.worker.worker_id, p.start)
        return found

    def cancel(self, timeout: float = 1.0) -> int:
        """Answer every waiting request "cancelled" now, and every later one at once (``-x``,
        ``--maxfail``, Ctrl-C); how many were waiting. Returns within ``timeout``."""
        call = _Call(self._engine.cancel)
        self._post(call)
        call.finished.wait(timeout)
        return call.result[0] if call.result else 0

    def close(self) -> None:
        """Stop serving and give everything the session holds back to the box (idempotent).
        Call it once the workers are gone: what a still-running worker holds is freed too."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake()
        self._thread.join()
        for conn in self._conns.values():
            conn.sock.close()
        self._conns.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.box.close()
        self._listening.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the serving thread -------------------------------------------------------------------------

    def _post(self, event: Done | _Call) -> None:
        """Hand an event to the serving thread (any thread may call this)."""
        self._events.put(event)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception:  # a bug here must not leave every worker waiting in silence
                self._log("gpushare: the session broker failed:\n" + traceback.format_exc())

    def _turn(self) -> None:
        wake = self._engine.tick(time.monotonic())
        timeout = None if wake is None else min(max(0.0, wake - time.monotonic()), _LONGEST_WAIT_S)
        woken = False
        for key, mask in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                woken = True
            else:
                self._ready(key.data, mask)
        while woken and not self._events.empty():
            event = self._events.get()
            if isinstance(event, _Call):
                event.result.append(event.action())
                event.finished.set()
            else:
                self._engine.done(event)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            pid, uid = proto.peer_credentials(sock)
            if uid != os.getuid():
                self._log(f"gpushare: the session broker refused process {pid} of uid {uid}")
                sock.close()
                continue
            sock.setblocking(False)
            cid = next(self._ids)
            self._conns[cid] = _Conn(sock, pid)
            self._selector.register(sock, selectors.EVENT_READ, cid)

    def _ready(self, cid: int, mask: int) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(cid, conn)
        if mask & selectors.EVENT_READ and cid in self._conns:
            self._read(cid, conn)

    def _read(self, cid: int, conn: _Conn) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn.sock, 65536, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        conn.fds += fds
        if not data:
            self._drop(cid)
            return
        try:
            for payload in conn.reader.feed(data):
                self._handle(cid, conn, proto.decode(payload))
                if cid not in self._conns:
                    return
        except proto.ProtocolError as exc:
            self._log(f"gpushare: the session broker dropped process {conn.pid}: {exc}")
            self._drop(cid)

    def _handle(self, cid: int, conn: _Conn, msg: proto.Message) -> None:
        if conn.worker_id is None:
            self._hello(cid, conn, msg)
        elif isinstance(msg, proto.Acquire):
            self._engine.acquire(cid, msg, time.monotonic())
        elif isinstance(msg, proto.Release):
            self._engine.release(cid, msg.lease_id)
        elif isinstance(msg, proto.Carry):
            self._engine.carry(cid, msg.lease_id, msg.test_id)
        elif isinstance(msg, proto.Slot) and conn.fds:
            fd = conn.fds.pop(0)
            try:
                self._engine.attach_slot(cid, SlotReader(fd))
            except (OSError, ValueError) as exc:
                raise proto.ProtocolError(f"an unusable slot: {exc}") from None
        elif isinstance(msg, proto.Withdraw):
            self._engine.withdraw(cid, msg.request)
        else:
            raise proto.ProtocolError(f"a worker may not send {proto.kind_of(msg)}")

    def _hello(self, cid: int, conn: _Conn, msg: proto.Message) -> None:
        if not isinstance(msg, proto.Hello):
            raise proto.ProtocolError(f"{proto.kind_of(msg)} before hello")
        if not hmac.compare_digest(msg.token.encode(), self.token.encode()):
            reason = "wrong session token"
        elif msg.version != proto.VERSION:
            reason = f"protocol version {msg.version}; this broker speaks {proto.VERSION}"
        else:
            conn.worker_id = msg.worker_id
            self._engine.connect(cid, msg.worker_id)
            self._send(cid, proto.Welcome(proto.VERSION, self.box.session_id), self.box.controller_fds())
            return
        self._log(f"gpushare: the session broker refused process {conn.pid}: {reason}")
        self._send(cid, proto.Rejected(reason), [])
        self._drop(cid)

    def _send(self, cid: int, message: proto.Message, fds: list[int]) -> None:
        conn = self._conns.get(cid)
        if conn is not None:
            conn.out.append((memoryview(proto.encode(message)), fds))
            self._flush(cid, conn)

    def _flush(self, cid: int, conn: _Conn) -> None:
        while conn.out:
            view, fds = conn.out[0]
            try:
                sent = socket.send_fds(conn.sock, [view], fds) if fds else conn.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(cid)
                return
            if sent < len(view):
                conn.out[0] = (view[sent:], [])  # the descriptors went with the first byte
            else:
                conn.out.popleft()
        writing = bool(conn.out)
        if writing != conn.writing:
            conn.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(conn.sock, events, cid)

    def _drop(self, cid: int) -> None:
        conn = self._conns.pop(cid, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        for fd in conn.fds:
            os.close(fd)
        if conn.worker_id is not None:
            self._engine.disconnect(cid)


def _socket_dir(parent: str | os.PathLike[str] | None) -> Path:
    """A fresh private folder (mode 0700) for the socket, with a path short enough for one."""
    bases = (
        [parent] if parent is not None else [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"]
    )
    for base in bases:
        if not base or not os.path.isdir(base):
            continue
        if len(os.fsencode(os.path.join(base, "gpushare-broker-xxxxxxxx", _SOCKET_NAME))) > _MAX_SOCKET_PATH:
            continue
        try:
            path = tempfile.mkdtemp(prefix="gpushare-broker-", dir=base)
        except OSError:
            continue
        os.chmod(path, 0o700)  # mkdtemp makes it so; say it where the guarantee is needed
        return Path(path)
    raise OSError(f"no folder for the session broker's socket among {bases}")
