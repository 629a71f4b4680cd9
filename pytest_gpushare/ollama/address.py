"""Where to ask Ollama: ``--gpushare-ollama`` and ``OLLAMA_HOST`` made one base URL.

``--gpushare-ollama`` is ``auto``, ``off`` or a URL. ``auto`` reads ``OLLAMA_HOST`` with the
rules of Ollama's own ``envconfig.Host()``: surrounding spaces and quotes are dropped; the
scheme is optional (``http`` then, default port 11434), an explicit ``http://`` defaults to
port 80 and ``https://`` to 443; a bare IP may be written with or without brackets; an invalid
port falls back to the default; a path after the host is kept; plain ``ollama.com`` means
``https://ollama.com:443``; empty means ``http://127.0.0.1:11434``. A client cannot talk to a
wildcard address, so ``0.0.0.0`` and ``::`` (what a server binds to) and an empty host
(``:11434``) mean this box's loopback, as a connection to them does on Linux.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from pytest_gpushare.errors import SettingError

__all__ = ["DEFAULT_ADDRESS", "is_loopback", "resolve_address"]

DEFAULT_ADDRESS = "http://127.0.0.1:11434"

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

    ``auto`` follows ``OLLAMA_HOST`` in ``env`` (see the module docstring); a URL is used as given
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


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
