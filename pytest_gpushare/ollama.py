"""Asking an Ollama server what it holds on the GPU, and on which GPU it holds it.

**Where to ask.** ``--gpushare-ollama`` is ``auto``, ``off`` or a URL. ``auto`` reads
``OLLAMA_HOST`` with the rules of Ollama's own ``envconfig.Host()``: surrounding spaces and
quotes are dropped; the scheme is optional (``http`` then, default port 11434), an explicit
``http://`` defaults to port 80 and ``https://`` to 443; a bare IP may be written with or
without brackets; an invalid port falls back to the default; a path after the host is kept;
plain ``ollama.com`` means ``https://ollama.com:443``; empty means ``http://127.0.0.1:11434``.
A client cannot talk to a wildcard address, so ``0.0.0.0`` and ``::`` (what a server binds to)
and an empty host (``:11434``) mean this box's loopback, as a connection to them does on Linux.

**How to ask.** One ``GET {address}/api/ps`` (Ollama's "List Running Models": ``size`` and
``size_vram`` in bytes per loaded model). A dead or hanging server costs at most about one
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

**Which GPU holds it** (:func:`attribute_held`). Ollama says how much VRAM its models hold, not
where. Where NVML's per-process list is trustworthy and Ollama's processes are visible in this
box's ``/proc`` (found by name when models are loaded), each GPU is credited what those
processes really use there, scaled down so that the total never exceeds what Ollama says it
holds; a single GPU whose trustworthy list shows no Ollama process gets nothing. Without that
evidence (no process figures, as under WSL2, or Ollama's processes out of sight in another
container or on a WSL2 VM's host), a session that sees one GPU credits it with all of it (at
most what that GPU has in use: memory that is not in use cannot be Ollama's); with several
GPUs nothing is credited, because crediting the wrong GPU would take the protection away from
the right one. Simulated GPUs never count as evidence. The returned note says why, for the
header.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.model import Gpu
from pytest_gpushare.units import MiB, TiB, format_size

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "HeldAttribution",
    "OllamaModel",
    "OllamaStatus",
    "attribute_held",
    "find_ollama_pids",
    "query_ollama",
    "resolve_address",
    "spilling_models",
]

DEFAULT_ADDRESS = "http://127.0.0.1:11434"
#: Seconds the whole question may take, connection included.
DEFAULT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.3
MAX_BODY_BYTES = 1 * MiB
#: No single model is larger than this; a bigger number is a broken or hostile answer.
MAX_MODEL_BYTES = 16 * TiB
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class OllamaModel:
    """One model Ollama has loaded: its whole size and the part of it in GPU memory."""

    name: str
    size_bytes: int
    vram_bytes: int

    @property
    def cpu_bytes(self) -> int:
        """What does not fit on the GPU and runs from system memory (slowly)."""
        return max(0, self.size_bytes - self.vram_bytes)


@dataclass(frozen=True)
class OllamaStatus:
    """What asking Ollama gave: where we asked, whether a usable answer came, what it said.

    ``address`` is the URL asked (``"off"`` when not asked). ``answered`` is True only for a
    complete, valid ``/api/ps`` answer; then ``models`` lists the loaded models (empty when
    none is loaded). Otherwise ``problem`` says in one line why nothing was used. ``pids`` are
    the local PIDs of Ollama processes seen in ``/proc`` when models were loaded (for
    :func:`attribute_held`). The status travels to xdist workers as :meth:`to_dict`.
    """

    address: str
    asked: bool
    answered: bool
    models: tuple[OllamaModel, ...]
    problem: str | None
    pids: tuple[int, ...] = ()

    def held_bytes(self) -> int:
        """VRAM that Ollama's models hold, all GPUs together (0 without a valid answer)."""
        if not self.answered:
            return 0
        return sum(m.vram_bytes for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "asked": self.asked,
            "answered": self.answered,
            "models": [[m.name, m.size_bytes, m.vram_bytes] for m in self.models],
            "problem": self.problem,
            "pids": list(self.pids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OllamaStatus:
        problem = data.get("problem")
        return cls(
            address=str(data["address"]),
            asked=bool(data["asked"]),
            answered=bool(data["answered"]),
            models=tuple(OllamaModel(str(n), int(s), int(v)) for n, s, v in data["models"]),
            problem=None if problem is None else str(problem),
            pids=tuple(int(p) for p in data.get("pids", ())),
        )


def spilling_models(status: OllamaStatus) -> tuple[OllamaModel, ...]:
    """Loaded models that do not fit on the GPU: part of them already runs on the CPU."""
    if not status.answered:
        return ()
    return tuple(m for m in status.models if m.vram_bytes < m.size_bytes)


# --- where to ask --------------------------------------------------------------------------

_PORT_RE = re.compile(r"^[+-]?[0-9]+$")


def _go_split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's ``net.SplitHostPort``: ``host:port`` or ``[v6]:port``; None where Go errs."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 : end + 2] != ":":
            return None
        host, port = hostport[1:end], hostport[end + 2 :]
        if "[" in host or "]" in port or "[" in port:
            return None
        return host, port
    host, sep, port = hostport.rpartition(":")
    if not sep or ":" in host or "[" in host or "]" in host:
        return None
    return host, port


def _parse_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _ollama_host(value: str) -> tuple[str, str, int, str]:
    """``OLLAMA_HOST`` read as Ollama's ``envconfig.Host()`` reads it: scheme, host, port, path."""
    text = value.strip().strip("\"'").strip()
    default_port = "11434"
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
        if text == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    split = _go_split_host_port(hostport)
    if split is None:
        host, port = "127.0.0.1", default_port
        ip = _parse_ip(hostport.strip("[]"))
        if ip is not None:
            host = ip
        elif hostport:
            host = hostport
    else:
        host, port = split
    if not _PORT_RE.match(port) or not 0 <= int(port) <= 65535:
        port = default_port
    return scheme, host, int(port), path


def _client_host(host: str) -> str:
    """Where a client connects for a host a server may have bound to (wildcards, empty)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if _parse_ip(host) == "::":
        return "::1"
    return host


def _join(scheme: str, host: str, port: int, path: str) -> str:
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = path.strip("/")
    return f"{scheme}://{netloc}/{path}" if path else f"{scheme}://{netloc}"


def resolve_address(setting: str, env: Mapping[str, str], *, source: str = "--gpushare-ollama") -> str | None:
    """The base URL to ask, or None for ``off``.

    ``auto`` follows ``OLLAMA_HOST`` in ``env`` (module docstring); a URL is used as given
    (``http://`` or ``https://``, a host, an optional port and path; wildcard hosts mean
    loopback). A bad URL raises :class:`SettingError` naming ``source``; ``OLLAMA_HOST`` is
    Ollama's setting, not ours, so what Ollama would accept is never an error here.
    """
    value = setting.strip()
    lowered = value.lower()
    if lowered == "off":
        return None
    if lowered == "auto":
        raw = env.get("OLLAMA_HOST", "")
        scheme, host, ollama_port, path = _ollama_host(raw)
        return _join(scheme, _client_host(host), ollama_port, path)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise SettingError(f"{source}: not a URL: {setting!r} ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise SettingError(
            f"{source}: expected auto, off or an http:// or https:// URL such as "
            f"{DEFAULT_ADDRESS}, got {setting!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SettingError(f"{source}: the URL may name a host, a port and a path only: {setting!r}")
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if port is None:  # a URL's own default, as Ollama does for an explicit scheme
        port = 443 if scheme == "https" else 80
    return _join(scheme, _client_host(host), port, parts.path)


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- asking --------------------------------------------------------------------------------


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
    session.trust_env = not _is_loopback(url)
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
    thread = threading.Thread(
        target=lambda: box.append(_fetch(url, timeout, deadline)), name="gpushare-ollama", daemon=True
    )
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


# --- which GPU -----------------------------------------------------------------------------


def find_ollama_pids(proc: Path = Path("/proc")) -> tuple[int, ...]:
    """PIDs of this box's Ollama processes (server and model runners), as far as we can see.

    A process counts when its ``comm`` (the executable's name, cut at 15 characters:
    ``ollama``, ``ollama_llama_se``) or the file name of its ``argv[0]`` contains ``ollama``;
    arguments are ignored, so ``pytest test_ollama.py`` is not Ollama. Processes in another
    PID namespace (another container, a WSL2 host) are not visible at all.
    """
    try:
        entries = os.listdir(proc)
    except OSError:
        return ()
    found: list[int] = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            comm = (proc / entry / "comm").read_bytes()
            if b"ollama" in comm.lower():
                found.append(int(entry))
                continue
            argv0 = (proc / entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"ollama" in argv0.rsplit(b"/", 1)[-1].lower():
            found.append(int(entry))
    return tuple(sorted(found))


class HeldAttribution(NamedTuple):
    """What Ollama holds per GPU index (bytes), and a line for the header when it matters."""

    by_gpu: dict[int, int]
    note: str | None


def attribute_held(status: OllamaStatus, gpus: Sequence[Gpu]) -> HeldAttribution:
    """Which GPU holds how much of Ollama's memory (module docstring); pure, never raises.

    The sum never exceeds ``status.held_bytes()``, and a GPU is never credited more than
    it has in use. Where this cannot be told, nothing is credited and ``note`` says why.
    """
    held = status.held_bytes()
    if held <= 0 or not gpus:
        return HeldAttribution({}, None)
    amount = format_size(held)
    pids = set(status.pids)
    # Simulated GPUs have an empty but "trustworthy" process list; a real Ollama on the
    # developer's box must not count as evidence against them.
    known = [g for g in gpus if g.processes is not None and not g.simulated]
    if pids and known:
        seen = {
            g.index: min(g.used_bytes, sum(p.used_bytes for p in g.processes or () if p.pid in pids))
            for g in known
        }
        seen = {i: b for i, b in seen.items() if b > 0}
        total_seen = sum(seen.values())
        if total_seen > 0:
            if total_seen <= held:
                return HeldAttribution(seen, None)
            scaled = {i: b * held // total_seen for i, b in seen.items()}
            where = ", ".join(f"GPU {i} {format_size(b)}" for i, b in sorted(scaled.items()))
            return HeldAttribution(
                scaled, f"Ollama's processes use more than the {amount} it reports; credited {where}"
            )
        if len(gpus) == 1:
            return HeldAttribution(
                {},
                f"NVML shows no Ollama process on GPU {gpus[0].index}; "
                f"Ollama's {amount} is not credited there (the full Ollama reserve is held back)",
            )
    if len(gpus) == 1:
        gpu = gpus[0]
        credit = min(held, max(0, gpu.used_bytes))
        if credit < held:
            return HeldAttribution(
                {gpu.index: credit} if credit else {},
                f"Ollama reports {amount} but GPU {gpu.index} has only {format_size(gpu.used_bytes)} "
                f"in use; credited {format_size(credit)}",
            )
        return HeldAttribution({gpu.index: credit}, None)
    why = (
        "NVML's per-process figures are unavailable"
        if not known
        else "no Ollama process of this box shows up in NVML's process lists"
    )
    return HeldAttribution(
        {},
        f"cannot tell which GPU holds Ollama's {amount} ({why}); "
        "nothing credited, the full Ollama reserve is held back",
    )
