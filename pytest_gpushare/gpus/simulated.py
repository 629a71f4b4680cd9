"""Simulated GPUs (``--gpushare-simulate``): ``[Nx]TOTAL[:used=SIZE][:name=TEXT]``, comma-separated."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.model import Gpu, GpuInventory
from pytest_gpushare.units import parse_size

__all__ = ["SimulatedGpuSpec", "SimulatedProbe", "parse_simulate", "simulated_uuid"]

_COUNT_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(.+)$")


@dataclass(frozen=True)
class SimulatedGpuSpec:
    total_bytes: int
    used_bytes: int
    name: str


def parse_simulate(spec: str, source: str) -> tuple[SimulatedGpuSpec, ...]:
    """Parse ``[Nx]TOTAL[:used=SIZE][:name=TEXT]`` entries separated by commas.

    ``none`` means no GPU at all.
    """
    if spec.strip().lower() == "none":
        return ()
    gpus: list[SimulatedGpuSpec] = []
    for raw_entry in spec.split(","):
        entry = raw_entry.strip()
        if not entry:
            raise SettingError(f"{source}: empty GPU in the list: {spec!r}")
        count = 1
        match = _COUNT_RE.match(entry)
        if match:
            count = int(match.group(1))
            if count < 1:
                raise SettingError(f"{source}: a GPU count must be at least 1: {spec!r}")
        head, *options = (match.group(2) if match else entry).split(":")
        total = parse_size(head.strip(), source, allow_zero=False)
        used = 0
        name = "Simulated GPU"
        for option in options:
            key, sep, value = option.partition("=")
            key = key.strip().lower()
            if not sep:
                raise SettingError(f"{source}: expected key=value after ':', got {option!r} in {spec!r}")
            if key == "used":
                used = parse_size(value.strip(), source)
            elif key == "name":
                name = value.strip() or name
            else:
                raise SettingError(f"{source}: unknown GPU option {key!r} (use used= or name=) in {spec!r}")
        if used > total:
            raise SettingError(f"{source}: used= is larger than the GPU's total in {spec!r}")
        gpus.extend(SimulatedGpuSpec(total, used, name) for _ in range(count))
    return tuple(gpus)


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
