"""What a GPU is, and the probes that find the GPUs of this box.

One seam (:class:`GpuProbe`) with two real implementations: :class:`NvmlProbe`
(NVML through ``pynvml`` from nvidia-ml-py, started lazily; it lives in ``nvml.py``, the
only module that touches ``pynvml``, and is re-exported here) and :class:`SimulatedProbe`
(``--gpushare-simulate``). Nothing here ever initialises CUDA.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pytest_gpushare.errors import SettingError
from pytest_gpushare.units import parse_size

if TYPE_CHECKING:
    from pytest_gpushare.nvml import FROM_ENVIRONMENT, NvmlProbe, process_usage

__all__ = [
    "FROM_ENVIRONMENT",
    "Gpu",
    "GpuInventory",
    "GpuProbe",
    "GpuProcess",
    "NvmlProbe",
    "SimulatedProbe",
    "parse_simulate",
    "probe_for",
    "process_usage",
]

# nvml.py builds on the dataclasses below, so its names are re-exported lazily (PEP 562):
# importing either module first works, and neither imports pynvml.
_FROM_NVML = frozenset({"FROM_ENVIRONMENT", "NvmlProbe", "process_usage"})


def __getattr__(name: str) -> Any:
    if name in _FROM_NVML:
        from pytest_gpushare import nvml

        return getattr(nvml, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class GpuProcess:
    """One process NVML sees on a GPU (host PID, bytes it uses there)."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class Gpu:
    """One GPU as this box shows it to us.

    ``index`` is the GPU's position among the GPUs visible to the session (after the
    inherited ``CUDA_VISIBLE_DEVICES``), in PCI bus order: the ``N`` of ``cuda:N`` in a
    process that inherits the session's ``CUDA_VISIBLE_DEVICES`` with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Per-GPU settings (``0:12GiB``) use this index.
    ``uuid`` is the key of everything else (ledgers, leases, ``CUDA_VISIBLE_DEVICES`` of
    workers). ``processes`` is None where per-process figures are unavailable or cannot be
    trusted (another PID namespace, ``usedGpuMemory`` None).
    """

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    processes: tuple[GpuProcess, ...] | None = ()
    simulated: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.processes is not None:
            data["processes"] = [[p.pid, p.used_bytes] for p in self.processes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Gpu:
        procs = data.get("processes")
        return cls(
            index=int(data["index"]),
            uuid=str(data["uuid"]),
            name=str(data["name"]),
            total_bytes=int(data["total_bytes"]),
            free_bytes=int(data["free_bytes"]),
            used_bytes=int(data["used_bytes"]),
            processes=None if procs is None else tuple(GpuProcess(int(p), int(b)) for p, b in procs),
            simulated=bool(data.get("simulated", False)),
        )


@dataclass(frozen=True)
class GpuInventory:
    """What a probe found: the usable GPUs, where the numbers came from, what went wrong.

    ``source`` is shown in the header (``NVML (driver 575.51)``, ``simulated``, ...).
    ``error`` is NVML's own text when no GPU could be read at all; ``unusable`` lists GPUs
    that exist but could not be read, each as ``"<what>: <error>"``.
    """

    gpus: tuple[Gpu, ...]
    source: str
    error: str | None = None
    unusable: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "source": self.source,
            "error": self.error,
            "unusable": list(self.unusable),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuInventory:
        return cls(
            gpus=tuple(Gpu.from_dict(g) for g in data["gpus"]),
            source=str(data["source"]),
            error=data.get("error"),
            unusable=tuple(data.get("unusable", ())),
        )


class GpuProbe(Protocol):
    """The GPUs of this box. Implementations never raise: failures become ``error``."""

    def probe(self) -> GpuInventory: ...


# --- simulated GPUs ------------------------------------------------------------------------

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


def probe_for(simulate: str | None, source: str = "--gpushare-simulate") -> GpuProbe:
    """The probe for a session: simulated GPUs when ``simulate`` is set, else NVML.

    ``simulate="none"`` means no GPU at all, even where NVML would find some. A bad spec
    raises :class:`SettingError` naming ``source``.
    """
    if simulate is not None:
        return SimulatedProbe(simulate, source)
    from pytest_gpushare.nvml import NvmlProbe

    return NvmlProbe()
