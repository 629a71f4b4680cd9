"""The settings' value parsers: ``parse(raw value, source words) -> value``.

Each raises :class:`SettingError` whose one-line message starts with the source
(``--gpushare-safety``, ``GPUSHARE_SAFETY``, ``gpushare_safety in tox.ini``...). A raw value is
text from the command line, the environment or an ini file, or a native TOML value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.simulated import parse_simulate as _check_simulate
from pytest_gpushare.units import MemRequest, MiB, PerGpuSizes, parse_mem, parse_per_gpu_sizes, parse_size

__all__ = [
    "LEAST_MEM_BYTES",
    "bad_value",
    "parse_bool",
    "parse_count",
    "parse_default_mem",
    "parse_dispatch",
    "parse_fallback",
    "parse_float",
    "parse_ollama",
    "parse_on_off",
    "parse_path",
    "parse_policy",
    "parse_positive_float",
    "parse_seconds",
    "parse_setting_size",
    "parse_setting_sizes",
    "parse_simulate",
    "parse_worker_mem",
]

_N = TypeVar("_N", int, float)


def bad_value(value: object, source: str, why: str) -> SettingError:
    """The error for a bad ``value``: ``"<source>: <why>: <value>"``."""
    return SettingError(f"{source}: {why}: {value!r}")


#: The least worker mem or default mem a setting may give: less is a unit mistake (``9B``, a
#: config's bytes where GiB were meant), since a CUDA context alone takes hundreds of MiB.
LEAST_MEM_BYTES = MiB


def parse_setting_size(value: object, source: str) -> int:
    """A size from a setting: zero, or a number with a unit (:data:`~pytest_gpushare.units.NEEDS_A_UNIT`)."""
    return parse_size(value, source, need_unit=True)


def parse_setting_sizes(value: object, source: str) -> PerGpuSizes:
    """Sizes per GPU from a setting, each with a unit as :func:`parse_setting_size`."""
    return parse_per_gpu_sizes(value, source, need_unit=True)


def _at_least_a_mib(n_bytes: int, value: object, source: str) -> None:
    if n_bytes < LEAST_MEM_BYTES:
        raise bad_value(value, source, "less than 1MiB, surely a unit mistake (a CUDA context is larger)")


def parse_worker_mem(value: object, source: str) -> int:
    """A worker's VRAM budget: a size with a unit, at least :data:`LEAST_MEM_BYTES`."""
    size = parse_size(value, source, allow_zero=False, need_unit=True)
    _at_least_a_mib(size, value, source)
    return size


def parse_default_mem(value: object, source: str) -> MemRequest:
    """A marker's default ``mem``: ``N%``, or a size with a unit of at least :data:`LEAST_MEM_BYTES`."""
    mem = parse_mem(value, source, need_unit=True)
    if mem.bytes is not None:
        _at_least_a_mib(mem.bytes, value, source)
    return mem


def _number(value: object, source: str, kind: type[_N], why: str) -> _N:
    """``value`` as ``kind`` (int or float): a number of that kind, or its text; never a bool."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise bad_value(value, source, why) from None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad_value(value, source, why)
    return kind(value)


def parse_float(value: object, source: str) -> float:
    number = _number(value, source, float, "not a number")
    if not math.isfinite(number):
        raise bad_value(value, source, "must be a finite number")
    return number


def parse_positive_float(value: object, source: str) -> float:
    number = parse_float(value, source)
    if number <= 0:
        raise bad_value(value, source, "must be larger than zero")
    return number


def parse_seconds(value: object, source: str) -> float:
    number = parse_float(value, source)
    if number < 0:
        raise bad_value(value, source, "a number of seconds cannot be negative")
    return number


def parse_count(value: object, source: str) -> int:
    count = _number(value, source, int, "not a whole number")
    if count < 1:
        raise bad_value(value, source, "must be at least 1")
    return count


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(value: object, source: str) -> bool:
    """A flag: a bool, or one of ``1/0/true/false/yes/no/on/off`` in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise bad_value(value, source, "not a flag (use 1/0, true/false, yes/no or on/off)")


def parse_on_off(value: object, source: str) -> bool:
    """A switch that takes a value on the command line too (``--x=off``), unlike a flag."""
    return parse_bool(value, source)


def _choice(*choices: str) -> Callable[[object, str], str]:
    def parse(value: object, source: str) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise bad_value(value, source, f"use one of {', '.join(choices)}")

    return parse


parse_fallback = _choice("skip", "cpu", "fail")
parse_policy = _choice("spread", "pack")
parse_dispatch = _choice("memory", "xdist")

_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Words people write for "no Ollama" that would otherwise pass as a host name.
_OFF_LOOKALIKES = frozenset({"none", "no", "false", "0", "disable", "disabled"})


def parse_ollama(value: object, source: str) -> str:
    """``auto``, ``off``, an ``http(s)://`` URL, or ``host[:port]`` (returned as an http URL)."""
    if not isinstance(value, str):
        raise bad_value(value, source, "use auto, off, or a URL such as http://127.0.0.1:11434")
    text = value.strip()
    if text.lower() in ("auto", "off"):
        return text.lower()
    if text.lower() in _OFF_LOOKALIKES:
        raise bad_value(value, source, "use off to turn Ollama detection off")
    # OLLAMA_HOST itself may be a bare host[:port]; accept the same here.
    url = text if "://" in text else f"http://{text}"
    why = "not an http(s) URL or host[:port]"
    try:
        parts = urlsplit(url)
        _ = parts.port  # urlsplit checks the port only when asked for it
    except ValueError:
        raise bad_value(value, source, why) from None
    host = parts.hostname or ""
    if parts.scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in text):
        raise bad_value(value, source, why)
    if ":" not in host and not _HOST_RE.match(host):
        raise bad_value(value, source, why)
    return url


def parse_path(value: object, source: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise bad_value(value, source, "not a path")
    return os.path.expanduser(value.strip())


def parse_simulate(value: object, source: str) -> str:
    if not isinstance(value, str):
        raise bad_value(value, source, "not a GPU spec (for example 2x24GiB or none)")
    _check_simulate(value, source)
    return value.strip()
