"""What this process can see of the box: devices, processes, per-process figures.

- :func:`select_visible`: the devices a ``CUDA_VISIBLE_DEVICES`` value leaves visible, as CUDA
  reads it, from the physical GPUs NVML read (:mod:`~pytest_gpushare.gpus.nvml`);
- :func:`pid_exists`: whether a PID NVML lists is a process of our PID namespace;
- :func:`per_process_unavailable_reason`: why this platform gives no per-process figures;
- :func:`cuda_visible_env` and :func:`cuda_ordinal`: the environment that shows a process exactly
  some GPUs (a worker, a ``gpushare run`` command), and where CUDA numbers one of them there;
  :func:`one_process_view`: which of some devices one CUDA process can use together (MIG).
"""

from __future__ import annotations

import enum
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pytest_gpushare.gpus.model import Gpu

__all__ = [
    "FROM_ENVIRONMENT",
    "FromEnvironment",
    "PhysicalGpu",
    "cuda_ordinal",
    "cuda_visible_env",
    "one_process_view",
    "per_process_unavailable_reason",
    "pid_exists",
    "select_visible",
    "visible_spec",
]


class FromEnvironment(enum.Enum):
    TOKEN = "CUDA_VISIBLE_DEVICES at probe time"


FROM_ENVIRONMENT: Final = FromEnvironment.TOKEN
"""Default of ``NvmlProbe(visible=...)``: read ``CUDA_VISIBLE_DEVICES`` each time ``probe()`` runs."""


def visible_spec(visible: str | FromEnvironment | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value ``visible`` stands for (None: unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") if isinstance(visible, FromEnvironment) else visible


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is a process of our PID namespace, as ``/proc`` shows it.

    NVML lists host PIDs; one we cannot see means another PID namespace (or a ``/proc`` that
    hides other accounts' processes). Without ``/proc`` (not Linux) nothing can be matched,
    which leads to the safe side.
    """
    return os.path.exists(f"/proc/{pid}")


def per_process_unavailable_reason() -> str | None:
    """Why this platform gives no per-process GPU memory at all, else None.

    Under WSL2 the driver lists no per-process figures (or no processes), whatever the
    process does; an empty list there must not read as "uses nothing".
    """
    release = platform.uname().release.lower()
    if "microsoft" in release or "wsl" in release:
        return "WSL2 does not report per-process GPU memory"
    return None


@dataclass
class PhysicalGpu:
    """One physical GPU as CUDA_VISIBLE_DEVICES can name it, and the devices it gives."""

    uuid: str
    pci: tuple[int, int, int]  # (domain, bus, device): the order integer entries count in
    devices: tuple[Gpu, ...]
    # (GPU instance id, compute instance id) of each MIG device, for ``MIG-GPU-<uuid>/gi/ci``.
    mig_ids: dict[str, tuple[int, int]] = field(default_factory=dict)


_ORDINAL_RE = re.compile(r"\s*([+-]?)(\d+)")
_OLD_MIG_RE = re.compile(r"MIG-(GPU-[^/]+)/(\d+)/(\d+)")


def _unique(matches: Sequence[Any]) -> Any | None:
    return matches[0] if len(matches) == 1 else None


def _resolve_entry(
    entry: str, kind: str, physical: Sequence[PhysicalGpu]
) -> tuple[str, tuple[Gpu, ...]] | None:
    """What one CUDA_VISIBLE_DEVICES entry names: a key for duplicates and its devices."""
    if kind == "GPU-":
        if not entry.startswith("GPU-"):
            return None
        gpu = _unique([p for p in physical if p.uuid.startswith(entry)])
        return None if gpu is None else (gpu.uuid, gpu.devices)
    if kind == "MIG-":
        if not entry.startswith("MIG-"):
            return None
        old = _OLD_MIG_RE.fullmatch(entry)
        if old:
            parent = _unique([p for p in physical if p.uuid.startswith(old.group(1))])
            if parent is None:
                return None
            ids = (int(old.group(2)), int(old.group(3)))
            dev = _unique([d for d in parent.devices if parent.mig_ids.get(d.uuid) == ids])
        else:
            dev = _unique([d for p in physical for d in p.devices if d.uuid.startswith(entry)])
        return None if dev is None else (dev.uuid, (dev,))
    match = _ORDINAL_RE.match(entry)
    if match is None or (match.group(1) == "-" and int(match.group(2)) != 0):
        return None
    ordinal = int(match.group(2))
    if ordinal >= len(physical):
        return None
    return physical[ordinal].uuid, physical[ordinal].devices


def select_visible(spec: str | None, physical: Sequence[PhysicalGpu]) -> list[Gpu]:
    """The devices ``CUDA_VISIBLE_DEVICES=spec`` leaves visible, in its order.

    ``physical`` comes in PCI bus order. This follows CUDA as its documentation and
    PyTorch's model of it (``torch.cuda._parse_visible_devices`` and its tests) describe it:
    unset shows every GPU, an empty value none; the list is of one kind, chosen by its first
    entry (integers, ``GPU-`` UUIDs or unique prefixes of them, ``MIG-`` UUIDs or
    ``MIG-GPU-<uuid>/<gi>/<ci>``); an integer is read like strtoul (``1gpu`` is 1, ``-0``
    is 0); the first invalid, ambiguous, out-of-range or other-kind entry hides itself and
    all after it; a GPU named twice hides every GPU.

    Integer entries count GPUs in PCI bus order, which is CUDA's order only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on a box with one GPU (CUDA's default, FASTEST_FIRST,
    may differ): prefer UUIDs. An integer or ``GPU-`` UUID that names a GPU in MIG mode gives
    all its MIG devices, although a CUDA process itself uses only one MIG device (give each
    worker one ``MIG-`` UUID).
    """
    if spec is None:
        return [dev for p in physical for dev in p.devices]
    entries = spec.split(",")
    kind = next((k for k in ("GPU-", "MIG-") if entries[0].startswith(k)), "")
    chosen: list[Gpu] = []
    seen: set[str] = set()
    for entry in entries:
        found = _resolve_entry(entry, kind, physical)
        if found is None:
            break
        key, devices = found
        if key in seen:
            return []
        seen.add(key)
        chosen.extend(devices)
    return chosen


def _is_mig(uuid: str) -> bool:
    return uuid.startswith("MIG-")


def one_process_view(gpus: Sequence[Gpu]) -> list[Gpu]:
    """The devices of ``gpus``, listed in this order, that one CUDA process can use together.

    CUDA shows a process at most one MIG instance: a list that starts with a MIG instance gives
    that instance alone, any other list gives its whole GPUs (MIG instances left out), so a
    process is never handed two MIG instances, nor a MIG instance it cannot see.
    """
    if not gpus:
        return []
    if _is_mig(gpus[0].uuid):
        return [gpus[0]]
    return [g for g in gpus if not _is_mig(g.uuid)]


def cuda_visible_env(gpus: Sequence[Gpu]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` listing ``gpus`` by UUID in this order (``cuda:0`` is the first),
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; empty when any of them is simulated.

    By UUID, the list means the same GPUs whatever the inherited ``CUDA_VISIBLE_DEVICES`` was and
    whatever order CUDA would pick. Only what one process can use is listed
    (:func:`one_process_view`): a MIG instance first is listed alone. A simulated GPU has no CUDA
    device behind it: the process keeps the inherited visibility, so a made-up UUID does not hide
    a real GPU.
    """
    if not gpus or any(g.simulated for g in gpus):
        return {}
    shown = one_process_view(gpus)
    return {"CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in shown), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cuda_ordinal(uuid: str, environ: Mapping[str, str]) -> int | None:
    """``N`` of ``cuda:N`` for ``uuid`` where ``environ``'s ``CUDA_VISIBLE_DEVICES`` lists it by
    UUID; None where it does not (the caller falls back to its own count).

    CUDA counts only what it shows: after a MIG instance in first place nothing else, and MIG
    instances after a whole GPU not at all (:func:`one_process_view`).
    """
    listed = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    shown = listed[:1] if listed and _is_mig(listed[0]) else [v for v in listed if not _is_mig(v)]
    return shown.index(uuid) if uuid in shown else None
