"""A fake Ollama server for tests: real HTTP on 127.0.0.1, programmable answers and failures.

It answers as Ollama's documented API does (docs/api.md: ``GET /api/ps`` "List Running
Models", ``GET /api/version``, ``GET /api/tags``, ``GET /`` "Ollama is running"), and can
misbehave on ``/api/ps`` in every way the plugin must survive. Use::

    with FakeOllama(models=[ps_model("llama3:8b", 5 * GiB)]) as server:
        query_ollama(server.url)
        server.mode = "hang"          # change behaviour between requests
        assert server.connections == 2

Modes for ``/api/ps`` (attribute ``mode``):

``ok``               ``{"models": [...]}`` from ``models`` (raw dicts, so tests can break them)
``status``           HTTP ``status`` with Ollama's ``{"error": ...}`` body
``body``             HTTP 200 with ``body`` (bytes) as is, ``Content-Type: application/json``
``gzip``             ``ok``'s answer gzip-compressed, with ``Content-Encoding: gzip``
``redirect``         HTTP 307 to ``redirect_to``
``hang``             accept, read the request, never answer
``stall_body``       headers and the first bytes of a declared longer body, then nothing
``huge``             ``huge_bytes`` of a JSON-looking body, fast or ``chunk_delay`` apart;
                     with or without ``Content-Length`` (``declare_length``)
``trickle_headers``  a status line, then one header line every 0.1 s, forever

:func:`refused_port` gives a port where connecting is refused; :func:`silent_listener` a port
that accepts connections in the kernel and never reads or answers.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FakeOllama", "ps_model", "refused_port", "silent_listener"]

# Long enough for any test, short enough that a forgotten handler ends on its own.
_MAX_HANG = 30.0


def ps_model(name: str, size: int, vram: int | None = None, **extra: Any) -> dict[str, Any]:
    """One ``/api/ps`` entry shaped as Ollama documents it (``vram`` defaults to ``size``)."""
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        "size": size,
        "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "7.2B",
            "quantization_level": "Q4_0",
        },
        "expires_at": "2024-06-04T14:38:31.83753-07:00",
        "size_vram": size if vram is None else vram,
        "context_length": 4096,
    }
    entry.update(extra)
    return entry


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOllama

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.fake.lock:
            self.fake.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up mid-answer (which is the point of most modes) is no error.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(self.path)
        path = urlsplit(self.path).path  # a proxy request carries an absolute URL
        if path == "/api/ps":
            self._ps(fake)
        elif path == "/api/version":
            self._json(200, {"version": fake.version})
        elif path == "/api/tags":
            tags = [
                {k: v for k, v in m.items() if k not in ("expires_at", "size_vram", "context_length")}
                | {"modified_at": "2024-05-01T10:00:00.000000-07:00"}
                for m in fake.models
                if isinstance(m, dict)
            ]
            self._json(200, {"models": tags})
        elif path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        else:
            self._send(404, b"404 page not found", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _ps(self, fake: FakeOllama) -> None:
        mode = fake.mode
        if mode == "ok":
            self._json(200, {"models": fake.models})
        elif mode == "status":
            self._json(fake.status, {"error": "something went wrong"})
        elif mode == "body":
            self._send(200, fake.body, "application/json; charset=utf-8")
        elif mode == "gzip":
            packed = gzip.compress(json.dumps({"models": fake.models}).encode())
            self._send(200, packed, "application/json", Content_Encoding="gzip")
        elif mode == "redirect":
            self.send_response(307)
            self.send_header("Location", fake.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "hang":
            fake.stopping.wait(_MAX_HANG)
        elif mode == "stall_body":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.write(b'{"models": [')
            self.wfile.flush()
            fake.stopping.wait(_MAX_HANG)
        elif mode == "huge":
            self._huge(fake)
        elif mode == "trickle_headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self.wfile.flush()
            n = 0
            while not fake.stopping.wait(0.1) and n < _MAX_HANG * 10:
                self.wfile.write(b"X-Slow-%d: x\r\n" % n)
                self.wfile.flush()
                n += 1
        else:
            raise AssertionError(f"unknown mode {mode!r}")

    def _huge(self, fake: FakeOllama) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if fake.declare_length:
            self.send_header("Content-Length", str(fake.huge_bytes))
        self.end_headers()
        chunk = b'{"models": [' + b" " * (64 * 1024 - 12)
        sent = 0
        while sent < fake.huge_bytes and not fake.stopping.is_set():
            piece = chunk[: fake.huge_bytes - sent]
            self.wfile.write(piece)
            sent += len(piece)
            with fake.lock:
                fake.huge_sent = sent
            chunk = b" " * len(chunk)
            if fake.chunk_delay:
                fake.stopping.wait(fake.chunk_delay)


class FakeOllama:
    """A threaded HTTP server on 127.0.0.1 (port 0) that plays Ollama; a context manager."""

    def __init__(self, models: list[Any] | None = None, *, mode: str = "ok") -> None:
        self.models: list[Any] = list(models or [])
        self.mode = mode
        self.status = 500
        self.body = b""
        self.redirect_to = "http://192.0.2.1:11434/api/ps"
        self.huge_bytes = 64 * 1024 * 1024
        self.declare_length = False
        self.chunk_delay = 0.0
        self.huge_sent = 0
        self.version = "0.12.6"
        self.connections = 0
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not running"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOllama:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases handlers that hang on purpose
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _local_port(*, listen: bool) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        if listen:
            sock.listen(16)
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def refused_port() -> contextlib.AbstractContextManager[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it), not listening."""
    return _local_port(listen=False)


def silent_listener() -> contextlib.AbstractContextManager[int]:
    """A port whose connections the kernel accepts and nobody ever reads from or answers."""
    return _local_port(listen=True)
