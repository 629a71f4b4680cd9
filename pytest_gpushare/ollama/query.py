"""Asking Ollama what it holds: one ``GET /api/ps``, bounded in time, its answer distrusted.

One ``GET {address}/api/ps`` (Ollama's "List Running Models": ``size`` and ``size_vram`` in
bytes per loaded model). A dead or hanging server costs at most about one
second in total: connecting gets 0.3 s, the whole exchange one deadline (``timeout``), and the
caller waits for the exchange in a helper thread no longer than that deadline, which also
bounds what socket timeouts cannot (a slow DNS answer, a server trickling bytes). Loopback
requests ignore the proxy variables (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``), as Go's
``http.ProxyFromEnvironment`` behind Ollama's own client does; other addresses honour them and
``NO_PROXY`` as ``requests`` normally does. Redirects are not followed. The answer may be at
most 1 MiB and must not be compressed.

**Trust.** Everything Ollama says is untrusted. Any doubt about the answer (an HTTP error, not
JSON, a missing field, a size that is not a whole number, negative, above 16 TiB, ``size_vram``
above ``size``, ...) makes the whole answer unused: :class:`OllamaStatus` says
``answered=False`` with a one-line ``problem``, and nothing Ollama holds is credited, so the
full configured Ollama reserve is held back (the safe side). Dropping only the bad model would
credit the rest of an answer already shown to be wrong. A missing ``size_vram`` counts as 0
(older Ollama left it out when a model ran on the CPU only); ``"models": null`` is a Go nil
slice, nothing loaded. Model names are made one printable line. Nothing here raises.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from pytest_gpushare.errors import SettingError
from pytest_gpushare.ollama.address import is_loopback, resolve_address
from pytest_gpushare.ollama.attribution import find_ollama_pids
from pytest_gpushare.ollama.model import OllamaModel, OllamaStatus
from pytest_gpushare.threads import daemon_thread
from pytest_gpushare.units import MiB, TiB, format_size

__all__ = ["DEFAULT_TIMEOUT", "query_ollama"]

#: Seconds the whole question may take, connection included.
DEFAULT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.3
MAX_BODY_BYTES = 1 * MiB
#: No single model is larger than this; a bigger number is a broken or hostile answer.
MAX_MODEL_BYTES = 16 * TiB
_CHUNK = 64 * 1024


def _one_line(text: object, limit: int = 160) -> str:
    """Untrusted text made safe for one header line: printable, single-spaced, short."""
    cleaned = "".join(c if c.isprintable() else " " for c in str(text))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: requests wraps urllib3's errors, which wrap the socket's."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        link = todo.pop()
        if any(link is s for s in seen):
            continue
        seen.append(link)
        todo += [a for a in link.args if isinstance(a, BaseException)]
        todo += [
            c
            for c in (link.__cause__, link.__context__, getattr(link, "reason", None))
            if isinstance(c, BaseException)
        ]
    return seen


def _exception_problem(exc: BaseException, timeout: float, *, body: bool) -> str:
    import requests
    from urllib3.exceptions import ReadTimeoutError

    causes = _causes(exc)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    if any(isinstance(c, socket.gaierror) for c in causes):
        return "cannot resolve the host name"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {CONNECT_TIMEOUT:g}s"
    if any(isinstance(c, (TimeoutError, ReadTimeoutError)) for c in causes):
        # requests reports a timeout while streaming the body as a ConnectionError
        return f"no {'complete ' if body else ''}answer within {timeout:g}s"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error: {_one_line(exc)}"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect: {_one_line(exc)}"
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _fetch(url: str, timeout: float, deadline: float) -> bytes | str:
    """The body of a 200 answer to ``GET url``, or a one-line problem. Never raises."""
    # Imported here: requests is a third of the plugin's import time, and --help, --markers,
    # --gpushare-ollama=off and gpushare status never ask Ollama.
    import requests

    session = requests.Session()
    # trust_env=False drops every proxy variable (and .netrc): loopback never goes through a
    # proxy, as with Ollama's Go client. Other hosts keep requests' usual environment rules.
    session.trust_env = not is_loopback(url)
    in_body = False
    try:
        remaining = max(0.01, deadline - time.monotonic())
        with session.get(
            url,
            timeout=(min(CONNECT_TIMEOUT, remaining), remaining),
            stream=True,
            allow_redirects=False,
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        ) as resp:
            if resp.is_redirect or 300 <= resp.status_code < 400:
                where = _one_line(resp.headers.get("Location", "nowhere"), 100)
                return f"redirected to {where} (HTTP {resp.status_code}; not followed)"
            if resp.status_code != 200:
                return _one_line(f"HTTP {resp.status_code} {resp.reason or ''}".strip())
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                return f"compressed answer refused (Content-Encoding: {_one_line(encoding, 40)})"
            length = resp.headers.get("Content-Length", "").strip()
            if length.isdigit() and (len(length) > 15 or int(length) > MAX_BODY_BYTES):
                declared = format_size(int(length)) if len(length) <= 15 else "absurd length"
                return f"answer too large ({declared}, limit {format_size(MAX_BODY_BYTES)})"
            body = bytearray()
            in_body = True
            # decode_content only undoes transfer encodings here: compressed bodies were refused.
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return f"answer too large (more than {format_size(MAX_BODY_BYTES)})"
                if time.monotonic() > deadline:
                    return f"no complete answer within {timeout:g}s"
            return bytes(body)
    except Exception as exc:  # anything the network or requests throws is a problem line
        return _exception_problem(exc, timeout, body=in_body)
    finally:
        session.close()


def _fetch_within(url: str, timeout: float) -> bytes | str:
    """:func:`_fetch` with a hard bound on the caller's wait.

    Socket timeouts bound each connect and each read, not a DNS lookup nor a server that
    trickles a byte at a time; the helper thread is a daemon and ends with its own timeouts.
    """
    deadline = time.monotonic() + timeout
    box: list[bytes | str] = []
    thread = daemon_thread(lambda: box.append(_fetch(url, timeout, deadline)), "gpushare-ollama")
    thread.start()
    # A short grace lets the exchange report its own, more precise problem at the deadline.
    thread.join(timeout + 0.1)
    return box[0] if box else f"no complete answer within {timeout:g}s"


def _whole_bytes(model: Mapping[str, Any], key: str, name: str, default: int | None = None) -> int | str:
    value = model.get(key, default)
    what = f"field {key!r} of model {name!r}"
    if value is None:
        return f"{what} is missing"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} is not a whole number: {_one_line(json.dumps(value), 40)}"
    if value < 0:
        return f"{what} is negative: {value}"
    if value > MAX_MODEL_BYTES:
        return f"{what} is absurd (more than {format_size(MAX_MODEL_BYTES)})"
    return value


def _parse_ps(body: bytes) -> tuple[OllamaModel, ...] | str:
    """Ollama's ``/api/ps`` answer as models, or a one-line problem. Never raises."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "the answer is not JSON"
    if not isinstance(data, dict):
        return "the answer is not a JSON object"
    raw_models = data.get("models", ...)
    if raw_models is ...:
        return "the answer has no 'models' field"
    if raw_models is None:  # a Go nil slice: nothing loaded
        return ()
    if not isinstance(raw_models, list):
        return "field 'models' is not a list"
    models: list[OllamaModel] = []
    for position, item in enumerate(raw_models):
        if not isinstance(item, dict):
            return f"model #{position + 1} is not a JSON object"
        name = item.get("name", item.get("model"))
        if not isinstance(name, str) or not name.strip():
            return f"model #{position + 1} has no name"
        name = _one_line(name, 80)
        size = _whole_bytes(item, "size", name)
        if isinstance(size, str):
            return size
        # Older Ollama left size_vram out when it was 0 (ollama/ollama#4840): all on the CPU.
        vram = _whole_bytes(item, "size_vram", name, default=0)
        if isinstance(vram, str):
            return vram
        if vram > size:
            return (
                f"model {name!r} claims more VRAM ({format_size(vram)}) than its size ({format_size(size)})"
            )
        models.append(OllamaModel(name, size, vram))
    if sum(m.vram_bytes for m in models) > MAX_MODEL_BYTES:
        return f"the models claim more than {format_size(MAX_MODEL_BYTES)} of VRAM in all"
    return tuple(models)


def query_ollama(
    setting: str,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    find_pids: Callable[[], tuple[int, ...]] | None = None,
) -> OllamaStatus:
    """Ask Ollama what it holds (``GET /api/ps``); never raises, never takes much over ``timeout``.

    ``setting`` is ``--gpushare-ollama``'s value; ``env`` holds ``OLLAMA_HOST`` (default:
    ``os.environ``). ``off`` makes no connection at all. ``find_pids`` finds the local Ollama
    processes when models are loaded (default :func:`find_ollama_pids`).
    """
    env = os.environ if env is None else env
    try:
        address = resolve_address(setting, env)
    except SettingError as exc:
        return OllamaStatus(_one_line(setting), False, False, (), _one_line(exc))
    if address is None:
        return OllamaStatus("off", False, False, (), None)
    scheme = urlsplit(address).scheme
    if scheme not in ("http", "https"):
        return OllamaStatus(address, True, False, (), f"unsupported scheme {scheme!r} in OLLAMA_HOST")
    got = _fetch_within(address.rstrip("/") + "/api/ps", timeout)
    if isinstance(got, str):
        return OllamaStatus(address, True, False, (), got)
    models = _parse_ps(got)
    if isinstance(models, str):
        return OllamaStatus(address, True, False, (), models)
    pids: tuple[int, ...] = ()
    if any(m.vram_bytes for m in models):
        try:
            pids = tuple((find_pids or find_ollama_pids)())
        except Exception:  # not knowing the PIDs only means crediting less (attribute_held)
            pids = ()
    return OllamaStatus(address, True, True, models, None, pids)
