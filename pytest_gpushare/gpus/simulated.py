"""Simulated GPUs (``--gpushare-simulate``): ``[Nx]TOTAL[:used=SIZE][:name=TEXT]``, comma-separated."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.model import Gpu, GpuInventory
from pytest_gpushare.gpus.visible import (
    FROM_ENVIRONMENT,
    FromEnvironment,
    PhysicalGpu,
    select_visible,
    visible_spec,
)
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


def _names_these(spec: str, uuids: list[str]) -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES=spec`` is about these simulated GPUs: a list of integers
    (places, which every box has), or of UUIDs at least one of which is one of ``uuids``.

    A list of UUIDs that are all real ones was set for the real box (a worker pinned by a session
    on real GPUs, a ``gpushare run`` command) and means nothing to a simulation started inside it.
    """
    entries = [e.strip() for e in spec.split(",")]
    if not entries[0].startswith(("GPU-", "MIG-")):
        return True
    return any(e and u.startswith(e) for e in entries for u in uuids)


class SimulatedProbe:
    """GPUs that exist only in the spec.

    ``used=`` is what strangers hold. Processes that hold leases are seen using exactly
    what they leased, which the formula credits back, so the probe reports
    ``free = total - used`` and an empty, trustworthy process list.

    ``visible`` is the inherited ``CUDA_VISIBLE_DEVICES``, applied as the NVML probe applies it
    (:func:`~pytest_gpushare.gpus.visible.select_visible`): integers count the spec's GPUs in
    order, ``GPU-`` entries name their simulated UUIDs. A value that names only real GPUs by
    UUID was set for the real box, not for this one: it is ignored, and a note says so.
    :data:`FROM_ENVIRONMENT` (the default) reads it at each probe. A GPU keeps the UUID of its
    place in the spec, so sessions that see different GPUs of one spec still share ledgers; its
    ``index`` is its place among the visible ones.
    """

    def __init__(
        self,
        spec: str,
        source: str = "--gpushare-simulate",
        *,
        visible: str | FromEnvironment | None = FROM_ENVIRONMENT,
    ) -> None:
        self.spec = spec
        self.visible = visible
        self._gpus = parse_simulate(spec, source)

    def probe(self) -> GpuInventory:
        if not self._gpus:
            return GpuInventory(gpus=(), source="simulated: no GPU (--gpushare-simulate=none)")
        physical = [
            PhysicalGpu(uuid, (0, i, 0), (self._gpu(i, uuid, g),))
            for i, g in enumerate(self._gpus)
            for uuid in (simulated_uuid(i, g),)
        ]
        seen = visible_spec(self.visible)
        if seen is not None and not _names_these(seen, [p.uuid for p in physical]):
            note = f"CUDA_VISIBLE_DEVICES={seen!r} names real GPUs, none of the simulated ones: ignored"
            gpus = tuple(d for p in physical for d in p.devices)
            return GpuInventory(gpus=gpus, source=f"simulated ({self.spec})", notes=(note,))
        gpus = tuple(replace(g, index=n) for n, g in enumerate(select_visible(seen, physical)))
        shown = "" if seen is None else f", CUDA_VISIBLE_DEVICES={seen!r}"
        return GpuInventory(gpus=gpus, source=f"simulated ({self.spec}{shown})")

    @staticmethod
    def _gpu(position: int, uuid: str, g: SimulatedGpuSpec) -> Gpu:
        return Gpu(
            index=position,
            uuid=uuid,
            name=g.name,
            total_bytes=g.total_bytes,
            free_bytes=g.total_bytes - g.used_bytes,
            used_bytes=g.used_bytes,
            processes=(),
            simulated=True,
        )
