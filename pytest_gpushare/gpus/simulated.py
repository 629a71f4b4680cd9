"""Simulated GPUs (``--gpushare-simulate``): ``[Nx]TOTAL[:used=SIZE][:name=TEXT]``, comma-separated."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.model import Gpu, GpuInventory
from pytest_gpushare.units import parse_size

__all__ = ["MAX_SIMULATED_GPUS", "SimulatedGpuSpec", "SimulatedProbe", "parse_simulate", "simulated_uuid"]

_COUNT_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(.+)$")

#: The most GPUs a spec may simulate: more devices than a real box shows (8 GPUs in MIG mode
#: give at most 56), and few enough that a typo (``100000000x24GiB``) is an error, not minutes
#: and gigabytes spent building GPUs.
MAX_SIMULATED_GPUS = 128


@dataclass(frozen=True)
class SimulatedGpuSpec:
    total_bytes: int
    used_bytes: int
    name: str


def parse_simulate(spec: str, source: str) -> tuple[SimulatedGpuSpec, ...]:
    """Parse ``[Nx]TOTAL[:used=SIZE][:name=TEXT]`` entries separated by commas.

    ``none`` means no GPU at all. Sizes need a unit, as every size of a setting does.
    """
    if spec.strip().lower() == "none":
        return ()
    gpus: list[SimulatedGpuSpec] = []
    for raw_entry in spec.split(","):
        entry = raw_entry.strip()
        if not entry:
            raise SettingError(f"{source}: empty GPU in the list: {spec!r}")
        match = _COUNT_RE.match(entry)
        count = _count(match.group(1) if match else "1", len(gpus), spec, source)
        head, *options = (match.group(2) if match else entry).split(":")
        total = parse_size(head.strip(), source, allow_zero=False, need_unit=True)
        used = 0
        name = "Simulated GPU"
        for option in options:
            key, sep, value = option.partition("=")
            key = key.strip().lower()
            if not sep:
                raise SettingError(f"{source}: expected key=value after ':', got {option!r} in {spec!r}")
            if key == "used":
                used = parse_size(value.strip(), source, need_unit=True)
            elif key == "name":
                name = value.strip() or name
            else:
                raise SettingError(f"{source}: unknown GPU option {key!r} (use used= or name=) in {spec!r}")
        if used > total:
            raise SettingError(f"{source}: used= is larger than the GPU's total in {spec!r}")
        gpus.extend(SimulatedGpuSpec(total, used, name) for _ in range(count))
    return tuple(gpus)


def _count(digits: str, before: int, spec: str, source: str) -> int:
    """The ``N`` of ``Nx``: at least 1, and no more than :data:`MAX_SIMULATED_GPUS` with the
    ``before`` GPUs of the spec's earlier entries."""
    digits = digits.lstrip("0") or "0"
    # int() refuses more than 4300 digits, and no count that long is meant.
    count = int(digits) if len(digits) <= 9 else None
    if count is not None and count < 1:
        raise SettingError(f"{source}: a GPU count must be at least 1: {spec!r}")
    if count is None or before + count > MAX_SIMULATED_GPUS:
        said = f"more than {MAX_SIMULATED_GPUS}" if count is None else str(before + count)
        shown = spec if len(spec) <= 80 else spec[:77] + "..."
        raise SettingError(f"{source}: at most {MAX_SIMULATED_GPUS} simulated GPUs, not {said}: {shown!r}")
    return count


def simulated_uuid(position: int, gpu: SimulatedGpuSpec) -> str:
    """A stable UUID from the GPU's position and spec, so sessions with one spec share ledgers."""
    digest = hashlib.sha256(f"{position}|{gpu.total_bytes}|{gpu.used_bytes}|{gpu.name}".encode()).hexdigest()
    return f"GPU-5151{digest[:4]}-{digest[4:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:28]}"


class SimulatedProbe:
    """GPUs that exist only in the spec.

    ``used=`` is what strangers hold. Processes that hold leases are seen using exactly
    what they leased, which the formula credits back, so the probe reports
    ``free = total - used`` and an empty, trustworthy process list.
    """

    def __init__(self, spec: str, source: str = "--gpushare-simulate") -> None:
        self.spec = spec
        self._gpus = parse_simulate(spec, source)

    def probe(self) -> GpuInventory:
        gpus = tuple(
            Gpu(
                index=i,
                uuid=simulated_uuid(i, g),
                name=g.name,
                total_bytes=g.total_bytes,
                free_bytes=g.total_bytes - g.used_bytes,
                used_bytes=g.used_bytes,
                processes=(),
                simulated=True,
            )
            for i, g in enumerate(self._gpus)
        )
        if not gpus:
            return GpuInventory(gpus=(), source="simulated: no GPU (--gpushare-simulate=none)")
        return GpuInventory(gpus=gpus, source=f"simulated ({self.spec})")
