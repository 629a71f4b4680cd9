"""Which GPU holds Ollama's memory: Ollama says how much, NVML's process lists say where.

Where NVML's per-process list is trustworthy and Ollama's processes are visible in this
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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from pytest_gpushare.gpus.model import Gpu
from pytest_gpushare.ollama.model import OllamaStatus
from pytest_gpushare.units import format_size

__all__ = ["HeldAttribution", "attribute_held", "find_ollama_pids"]


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
    """Which GPU holds how much of Ollama's memory (see the module docstring); pure, never raises.

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
