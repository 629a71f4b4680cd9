"""Sizes: parsed once at the edge, bytes inside, formatted once for people.

Every unit is binary, as nvidia-smi counts: ``1GB == 1GiB == 2**30`` bytes.
Nothing here does I/O or imports pytest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pytest_gpushare.errors import SettingError

__all__ = [
    "NEEDS_A_UNIT",
    "GiB",
    "KiB",
    "MemRequest",
    "MiB",
    "PerGpuSizes",
    "TiB",
    "format_size",
    "parse_mem",
    "parse_per_gpu_sizes",
    "parse_size",
]

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

_UNITS = {
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _bad(value: object, source: str, why: str) -> SettingError:
    return SettingError(f"{source}: {why}: {value!r}")


#: Why a settings size without a unit is refused (``need_unit``).
NEEDS_A_UNIT = "a size needs a unit such as GiB or MiB (a bare number would mean bytes)"


def parse_size(value: object, source: str, *, allow_zero: bool = True, need_unit: bool = False) -> int:
    """Return ``value`` in bytes.

    ``value`` is an int (bytes), a float (bytes), or a string such as ``"9GiB"``, ``"1.5 gb"``,
    ``"512M"``, ``"4096"``. ``source`` names where the value came from and starts the error
    message. With ``need_unit`` (a setting, where ``9`` meant as 9GiB would silently be 9 bytes),
    only zero may come without a unit: ints, floats and unitless text are refused.
    """
    if isinstance(value, bool):
        raise _bad(value, source, "not a size")
    if isinstance(value, int):
        # Exact: a float would lose bytes above 2**53 and overflow on huge ints.
        if value < 0:
            raise _bad(value, source, "a size cannot be negative")
        if value == 0 and not allow_zero:
            raise _bad(value, source, "must be larger than zero")
        if value and need_unit:
            raise _bad(value, source, NEEDS_A_UNIT)
        return value
    if isinstance(value, float):
        number, unit, unit_given = value, 1, False
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            if value.strip().startswith("-"):
                raise _bad(value, source, "a size cannot be negative")
            raise _bad(value, source, "not a size (use a number and B, KiB, MiB, GiB or TiB)")
        number = float(match.group(1))
        suffix = match.group(2).lower()
        if suffix and suffix not in _UNITS:
            raise _bad(value, source, f"unknown unit {match.group(2)!r} (use B, KiB, MiB, GiB or TiB)")
        unit, unit_given = _UNITS[suffix] if suffix else 1, bool(suffix)
    else:
        raise _bad(value, source, "not a size")
    if math.isnan(number) or math.isinf(number):
        raise _bad(value, source, "a size must be finite")
    if number < 0:
        raise _bad(value, source, "a size cannot be negative")
    if math.isinf(number * unit):
        raise _bad(value, source, "too large")
    if need_unit and not unit_given and number:
        raise _bad(value, source, NEEDS_A_UNIT)
    result = round(number * unit)
    if result == 0 and not allow_zero:
        raise _bad(value, source, "must be larger than zero")
    return result


def format_size(n_bytes: float) -> str:
    """``9663676416 -> "9.0GiB"``: one decimal, the largest binary unit below the value."""
    sign = "-" if n_bytes < 0 else ""
    value = abs(float(n_bytes))
    for name, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        # Compare after rounding, so one byte short of 1GiB prints 1.0GiB, not 1024.0MiB.
        if round(value / unit, 1) >= 1:
            return f"{sign}{value / unit:.1f}{name}"
    return f"{sign}{value:.0f}B"


@dataclass(frozen=True)
class MemRequest:
    """A marker's ``mem``: a fixed number of bytes, or a percentage of the device's total."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total_bytes: int) -> int:
        """Bytes this request means on a device of ``total_bytes``."""
        if self.percent is not None:
            return max(1, int(total_bytes * self.percent / 100.0))
        assert self.bytes is not None
        return self.bytes

    def describe(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        assert self.bytes is not None
        return format_size(self.bytes)


def parse_mem(value: object, source: str, *, need_unit: bool = False) -> MemRequest:
    """A memory need: a size larger than zero, or ``"N%"`` with 0 < N <= 100.

    ``need_unit`` as for :func:`parse_size`.
    """
    if isinstance(value, str) and value.strip().endswith("%"):
        text = value.strip()[:-1].strip()
        try:
            percent = float(text)
        except ValueError:
            raise _bad(value, source, "not a percentage") from None
        if math.isnan(percent) or not 0 < percent <= 100:
            raise _bad(value, source, "a percentage must lie in (0, 100]")
        return MemRequest(percent=percent)
    return MemRequest(bytes=parse_size(value, source, allow_zero=False, need_unit=need_unit))


@dataclass(frozen=True)
class PerGpuSizes:
    """One size for every GPU, with optional overrides per GPU index."""

    default: int = 0
    per_index: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))

    def for_index(self, index: int) -> int:
        return self.per_index.get(index, self.default)

    def describe(self) -> str:
        parts = [format_size(self.default)] if self.default or not self.per_index else []
        parts += [f"{i}:{format_size(b)}" for i, b in sorted(self.per_index.items())]
        return ",".join(parts)


def parse_per_gpu_sizes(value: object, source: str, *, need_unit: bool = False) -> PerGpuSizes:
    """``"12GiB"`` (every GPU), ``"0:12GiB,1:2GiB"`` (per index) or ``"2GiB,0:12GiB"`` (both).

    ``need_unit`` as for :func:`parse_size`.
    """
    if not isinstance(value, str):
        return PerGpuSizes(default=parse_size(value, source, need_unit=need_unit))
    default = 0
    per_index: dict[int, int] = {}
    seen_default = False
    for raw_part in value.split(","):
        part = raw_part.strip()
        if not part:
            raise _bad(value, source, "empty entry in the list")
        if ":" in part:
            idx_text, size_text = part.split(":", 1)
            try:
                idx = int(idx_text.strip())
            except ValueError:
                raise _bad(value, source, f"GPU index {idx_text.strip()!r} is not a number") from None
            if idx < 0:
                raise _bad(value, source, f"GPU index {idx} is negative")
            if idx in per_index:
                raise _bad(value, source, f"GPU index {idx} is given twice")
            per_index[idx] = parse_size(size_text.strip(), source, need_unit=need_unit)
        else:
            if seen_default:
                raise _bad(value, source, "more than one size for every GPU")
            default = parse_size(part, source, need_unit=need_unit)
            seen_default = True
    return PerGpuSizes(default=default, per_index=MappingProxyType(per_index))
