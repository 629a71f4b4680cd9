"""What a GPU is: the data the probes return, and the probe Protocol they implement.

The implementations live beside this module: :mod:`~pytest_gpushare.gpus.nvml` (the only
module that touches ``pynvml``) and :mod:`~pytest_gpushare.gpus.simulated`. Nothing here
ever initialises CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["Gpu", "GpuInventory", "GpuProbe", "GpuProcess"]


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
    that exist but could not be read, each as ``"<what>: <error>"``; ``notes`` says, one line
    each, what the probe corrected (NVML's impossible memory figures) for the header.
    """

    gpus: tuple[Gpu, ...]
    source: str
    error: str | None = None
    unusable: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "source": self.source,
            "error": self.error,
            "unusable": list(self.unusable),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuInventory:
        return cls(
            gpus=tuple(Gpu.from_dict(g) for g in data["gpus"]),
            source=str(data["source"]),
            error=data.get("error"),
            unusable=tuple(data.get("unusable", ())),
            notes=tuple(data.get("notes", ())),
        )


class GpuProbe(Protocol):
    """The GPUs of this box. Implementations never raise: failures become ``error``."""

    def probe(self) -> GpuInventory: ...
