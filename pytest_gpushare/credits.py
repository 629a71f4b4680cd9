"""What lease holders really use, and usable memory now: the I/O around the planner's formula.

SPEC's ``free_g`` is NVML's free memory plus what the processes holding leases on this box
really use on g, each credited at most what it booked there. This module reads the ledger
(who booked what) and ``/proc`` (whose child a GPU process is), and hands the pure planner
numbers. Used at planning (the plugin, ``gpushare run``) and while a request waits (the
ledger's ``refresh``), so one formula serves all three.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.gpus.model import Gpu, GpuInventory
from pytest_gpushare.planner import Plan, credits_from_status, make_plan

__all__ = ["fresh_usable", "holder_credits", "parent_pid"]

#: How far up the process tree a GPU process is matched to a lease holder: ``gpushare run``
#: holds the lease while its command (a child, or a shell's grandchild) uses the memory.
MAX_ANCESTRY = 8


def parent_pid(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The parent of ``pid`` from ``/proc/<pid>/stat`` (None when it cannot be read)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _holder_of(
    pid: int, holders: set[int], parent: Callable[[int], int | None], depth: int = MAX_ANCESTRY
) -> int | None:
    current: int | None = pid
    for _ in range(depth + 1):
        if current is None or current <= 1:
            return None
        if current in holders:
            return current
        current = parent(current)
    return None


def holder_credits(
    gpus: tuple[Gpu, ...],
    ledger_dir: str | None,
    *,
    parent: Callable[[int], int | None] = parent_pid,
) -> dict[str, int]:
    """Credit per GPU uuid for what lease holders (and their child processes) really use.

    Only real GPUs with trustworthy per-process figures can be credited; a ledger folder that
    cannot be read credits nothing (the safe side: the first lease reports the folder's problem).
    """
    real = [g for g in gpus if not g.simulated and g.processes]
    if not real:
        return {}
    from pytest_gpushare.ledger import read_status

    try:
        status = read_status(ledger_dir or None)
    except (LedgerError, OSError):
        return {}
    host = socket.gethostname()
    holders = {
        int(lease["owner"]["pid"])
        for entry in status.get("gpus", ())
        for lease in entry.get("leases", ())
        if lease.get("owner", {}).get("host") == host and isinstance(lease["owner"].get("pid"), int)
    }
    owner_of = {
        p.pid: holder
        for g in real
        for p in g.processes or ()
        if (holder := _holder_of(p.pid, holders, parent)) is not None
    }
    return credits_from_status(gpus, status, host, owner_of)


def fresh_usable(plan: Plan, ledger_dir: str | None, probe: Callable[[], GpuInventory]) -> dict[str, int]:
    """Usable memory now per GPU uuid: NVML asked again, the plan's own reservations and safety.

    GPUs keep the plan's numbering (reservations use it), whatever order the probe sees them in.
    """
    seen = {g.uuid: g for g in probe().gpus}
    fresh = tuple(
        dataclasses.replace(seen[g.gpu.uuid], index=g.gpu.index) for g in plan.gpus if g.gpu.uuid in seen
    )
    inventory = GpuInventory(fresh, "NVML (refresh)")
    reservations = [r for g in plan.gpus for r in g.reservations]
    credits = holder_credits(inventory.gpus, ledger_dir)
    again = make_plan(inventory, plan.budget, reservations=reservations, credits=credits)
    return {g.gpu.uuid: g.usable_bytes for g in again.gpus}


def nvml_refresh(plan: Plan, ledger_dir: str | None) -> Callable[[], Mapping[str, int]] | None:
    """The ledger's ``refresh`` for a plan: None on simulated GPUs (nothing changes there)."""
    if not any(not g.gpu.simulated for g in plan.gpus):
        return None

    def refresh() -> Mapping[str, int]:
        from pytest_gpushare.gpus.nvml import NvmlProbe

        return fresh_usable(plan, ledger_dir, NvmlProbe().probe)

    return refresh
