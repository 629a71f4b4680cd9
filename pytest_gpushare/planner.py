"""Pure arithmetic: usable memory per GPU, the worker count, and home GPUs for workers.

No I/O, no pytest: values in, values out. The formula is SPEC's:

* reservations come as :class:`Reservation` values, one per GPU and reason; Ollama's is
  ``ollama_hold_g = max(0, ollama_reserve_g - ollama_held_g)`` (:func:`ollama_reservations`,
  with what :func:`pytest_gpushare.ollama.attribute_held` finds Ollama holds on each GPU)
* ``free_g = nvml_free_g + credit_g`` where ``credit_g`` is what processes holding leases on
  this box really use on g, each at most what it booked there (leases + context)
* ``usable_g = max(0, free_g - Σ reservations_g - safety_g)``
* ``capacity_g = max(0, total_g - Σ full reservations_g - safety_g)``: what g could give
  with nothing else running; a need above it is "never", below it a test waits.
* ``workers = Σ_g floor(usable_g / worker_mem)``, capped by ``floor(Σ usable GiB × per-GB)``,
  ``max_workers`` and xdist's own count, at least 1; with no usable GPU, xdist's own count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_gpushare.gpus.model import Gpu, GpuInventory
from pytest_gpushare.units import GiB, PerGpuSizes, format_size

__all__ = [
    "Budget",
    "GpuPlan",
    "Plan",
    "Reservation",
    "WorkerCount",
    "assign_homes",
    "credit_for",
    "credits_from_status",
    "make_plan",
    "ollama_reservations",
    "reservations_from_sizes",
]


@dataclass(frozen=True)
class Reservation:
    """Memory held back on one GPU for another application.

    ``bytes`` is held back now; ``full_bytes`` is what the application may take when it runs at
    full size (for Ollama: its whole reserve, of which ``bytes`` is the part it does not hold
    yet). "Never fits" is judged against ``full_bytes``; usable memory against ``bytes``.
    ``kind`` names who asked (``reserve`` for ``--gpushare-reserve``, ``ollama``, or a plugin).
    """

    gpu_index: int
    bytes: int
    reason: str
    kind: str = "reserve"
    full_bytes: int | None = None

    @property
    def ceiling_bytes(self) -> int:
        return self.bytes if self.full_bytes is None else max(self.bytes, self.full_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_index": self.gpu_index,
            "bytes": self.bytes,
            "reason": self.reason,
            "kind": self.kind,
            "full_bytes": self.ceiling_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reservation:
        return cls(
            int(data["gpu_index"]),
            int(data["bytes"]),
            str(data["reason"]),
            str(data.get("kind", "reserve")),
            int(data.get("full_bytes", data["bytes"])),
        )


def reservations_from_sizes(
    sizes: PerGpuSizes, gpus: Sequence[Gpu], reason: str, kind: str = "reserve"
) -> list[Reservation]:
    """One reservation per GPU that ``sizes`` gives a non-zero size (an index override wins)."""
    return [
        Reservation(g.index, sizes.for_index(g.index), reason, kind)
        for g in gpus
        if sizes.for_index(g.index) > 0
    ]


def ollama_reservations(
    sizes: PerGpuSizes, held_by_gpu: Mapping[int, int], gpus: Sequence[Gpu]
) -> list[Reservation]:
    """The Ollama hold per GPU: ``max(0, reserve_g - held_g)`` now, the whole reserve at full size.

    ``sizes`` is the ollama reserve setting; ``held_by_gpu`` maps a GPU index to what Ollama
    already holds there (what it holds is outside ``free`` already: counting it again would
    hold it back twice). GPUs without a reserve get no reservation.
    """
    out: list[Reservation] = []
    for gpu in gpus:
        want = sizes.for_index(gpu.index)
        if want <= 0:
            continue
        hold = max(0, want - held_by_gpu.get(gpu.index, 0))
        out.append(Reservation(gpu.index, hold, "Ollama hold", kind="ollama", full_bytes=want))
    return out


@dataclass(frozen=True)
class Budget:
    """The settings the formula uses, in bytes."""

    safety_bytes: int
    worker_mem_bytes: int
    context_bytes: int
    workers_per_gb: float | None = None
    max_workers: int | None = None


@dataclass(frozen=True)
class GpuPlan:
    """Every term of the formula for one GPU."""

    gpu: Gpu
    credited_bytes: int
    free_bytes: int
    reservations: tuple[Reservation, ...]
    reserve_bytes: int
    safety_bytes: int
    usable_bytes: int
    capacity_bytes: int
    slots: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.to_dict(),
            "credited_bytes": self.credited_bytes,
            "free_bytes": self.free_bytes,
            "reservations": [r.to_dict() for r in self.reservations],
            "reserve_bytes": self.reserve_bytes,
            "safety_bytes": self.safety_bytes,
            "usable_bytes": self.usable_bytes,
            "capacity_bytes": self.capacity_bytes,
            "slots": self.slots,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuPlan:
        values = dict(data)
        values["gpu"] = Gpu.from_dict(values["gpu"])
        values["reservations"] = tuple(Reservation.from_dict(r) for r in values["reservations"])
        return cls(**values)


@dataclass(frozen=True)
class WorkerCount:
    """The ``-n auto`` answer and how it was derived."""

    workers: int
    derivation: str
    bound_by: str


@dataclass(frozen=True)
class Plan:
    """The VRAM analysis of one session: what each GPU can give, and the budget it was cut by."""

    inventory: GpuInventory
    gpus: tuple[GpuPlan, ...]
    budget: Budget
    per_process_trusted: bool
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return sum(g.usable_bytes for g in self.gpus)

    @property
    def has_usable_gpu(self) -> bool:
        return self.usable_bytes > 0

    def by_uuid(self, uuid: str) -> GpuPlan:
        for g in self.gpus:
            if g.gpu.uuid == uuid:
                return g
        raise KeyError(uuid)

    def worker_count(self, xdist_count: int | None) -> WorkerCount:
        """SPEC's worker formula; ``xdist_count`` is xdist's own answer for ``-n auto`` (None if unknown)."""
        b = self.budget
        if not self.gpus:
            why = "no GPU found" if self.inventory.error is None else "NVML failed"
            return _fallback(xdist_count, why)
        if not self.has_usable_gpu:
            return _fallback(xdist_count, "no GPU has usable memory")
        steps: list[str] = []
        slots = sum(g.slots for g in self.gpus)
        count, bound = slots, "worker mem"
        terms = " + ".join(
            f"floor({format_size(g.usable_bytes)} / {format_size(b.worker_mem_bytes)})" for g in self.gpus
        )
        steps.append(f"{terms} = {slots}")
        if b.workers_per_gb is not None:
            gib = self.usable_bytes / GiB
            cap = math.floor(gib * b.workers_per_gb + 1e-9)
            steps.append(f"workers-per-gb cap floor({gib:.1f} × {b.workers_per_gb:g}) = {cap}")
            if cap < count:
                count, bound = cap, "workers-per-gb"
        if b.max_workers is not None:
            steps.append(f"max-workers cap {b.max_workers}")
            if b.max_workers < count:
                count, bound = b.max_workers, "max-workers"
        if xdist_count is not None:
            steps.append(f"xdist's own count {xdist_count}")
            if xdist_count < count:
                count, bound = xdist_count, "xdist's own count"
        if count < 1:
            steps.append("at least 1")
            count, bound = 1, "at least 1"
        return WorkerCount(count, "; ".join(steps), bound)

    def to_dict(self) -> dict[str, Any]:
        b = self.budget
        return {
            "inventory": self.inventory.to_dict(),
            "gpus": [g.to_dict() for g in self.gpus],
            "budget": {
                "safety_bytes": b.safety_bytes,
                "worker_mem_bytes": b.worker_mem_bytes,
                "context_bytes": b.context_bytes,
                "workers_per_gb": b.workers_per_gb,
                "max_workers": b.max_workers,
            },
            "per_process_trusted": self.per_process_trusted,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        bd = data["budget"]
        budget = Budget(
            safety_bytes=int(bd["safety_bytes"]),
            worker_mem_bytes=int(bd["worker_mem_bytes"]),
            context_bytes=int(bd["context_bytes"]),
            workers_per_gb=bd["workers_per_gb"],
            max_workers=bd["max_workers"],
        )
        return cls(
            inventory=GpuInventory.from_dict(data["inventory"]),
            gpus=tuple(GpuPlan.from_dict(g) for g in data["gpus"]),
            budget=budget,
            per_process_trusted=bool(data["per_process_trusted"]),
            notes=tuple(data.get("notes", ())),
        )


def _fallback(xdist_count: int | None, why: str) -> WorkerCount:
    if xdist_count is None:
        return WorkerCount(1, f"{why}: 1 worker", why)
    return WorkerCount(xdist_count, f"{why}: xdist's own count {xdist_count}", why)


def credit_for(gpu: Gpu, booked_by_pid: Mapping[int, int], owner_of: Mapping[int, int] | None = None) -> int:
    """What lease-holding processes really use on ``gpu``, each at most what it booked there.

    ``booked_by_pid`` maps a holder's host PID to its leases plus context booking on this GPU.
    ``owner_of`` maps a GPU process to the holder it works for when that is not itself (the
    command a ``gpushare run`` holds a lease for); all of a holder's processes together are
    credited at most its booking. Without trustworthy per-process figures nothing is credited:
    all used memory counts as strangers' (the safe side).
    """
    if gpu.processes is None:
        return 0
    owners = owner_of or {}
    used: dict[int, int] = {}
    for p in gpu.processes:
        holder = p.pid if p.pid in booked_by_pid else owners.get(p.pid)
        if holder is not None and holder in booked_by_pid:
            used[holder] = used.get(holder, 0) + p.used_bytes
    return sum(min(n, booked_by_pid[holder]) for holder, n in used.items())


def credits_from_status(
    gpus: Sequence[Gpu], status: Mapping[str, Any], host: str, owner_of: Mapping[int, int] | None = None
) -> dict[str, int]:
    """:func:`credit_for` of every GPU, from a ledger status (``ledger.read_status``).

    Every live lease and context booking of a process on this ``host`` counts as booked by
    its PID; NVML's per-process figures then say how much of that the process really uses.
    """
    booked: dict[str, dict[int, int]] = {}
    for entry in status.get("gpus", ()):
        per_pid = booked.setdefault(str(entry["uuid"]), {})
        for lease in entry.get("leases", ()):
            owner = lease.get("owner", {})
            if owner.get("host") == host and isinstance(owner.get("pid"), int):
                per_pid[owner["pid"]] = per_pid.get(owner["pid"], 0) + int(lease["bytes"])
    return {g.uuid: credit_for(g, booked.get(g.uuid, {}), owner_of) for g in gpus}


def make_plan(
    inventory: GpuInventory,
    budget: Budget,
    *,
    reservations: Sequence[Reservation] = (),
    credits: Mapping[str, int] | None = None,
    notes: Sequence[str] = (),
) -> Plan:
    """Apply the formula to every GPU of ``inventory``.

    ``reservations`` come from every ``pytest_gpushare_reservations`` implementation (the static
    ``--gpushare-reserve`` and the Ollama hold among them); ``credits`` maps a GPU uuid to
    :func:`credit_for`'s answer. The plan's notes are the inventory's (what the probe corrected),
    then ``notes``.
    """
    credit = credits or {}
    plans: list[GpuPlan] = []
    for gpu in inventory.gpus:
        mine = tuple(r for r in reservations if r.gpu_index == gpu.index)
        reserve = sum(r.bytes for r in mine)
        credited = max(0, credit.get(gpu.uuid, 0))
        free = min(gpu.total_bytes, gpu.free_bytes + credited)
        usable = max(0, free - reserve - budget.safety_bytes)
        capacity = max(0, gpu.total_bytes - sum(r.ceiling_bytes for r in mine) - budget.safety_bytes)
        plans.append(
            GpuPlan(
                gpu=gpu,
                credited_bytes=credited,
                free_bytes=free,
                reservations=mine,
                reserve_bytes=reserve,
                safety_bytes=budget.safety_bytes,
                usable_bytes=usable,
                capacity_bytes=capacity,
                slots=usable // budget.worker_mem_bytes,
            )
        )
    trusted = all(g.processes is not None for g in inventory.gpus)
    return Plan(inventory, tuple(plans), budget, trusted, (*inventory.notes, *notes))


def assign_homes(plan: Plan, n_workers: int) -> list[str]:
    """Home GPU (uuid) of each of ``n_workers`` workers, in proportion to usable memory.

    Largest-remainder apportionment, so 2 workers on GPUs of 60 and 20 GiB usable get one each
    only when proportion says so (here: 2 on the first), and every GPU with usable memory gets a
    worker before any gets a second when the counts are close. GPUs without usable memory get
    workers only when no GPU has any (then by total memory).
    """
    if n_workers <= 0 or not plan.gpus:
        return []
    weights = [g.usable_bytes for g in plan.gpus]
    if sum(weights) == 0:
        weights = [g.gpu.total_bytes for g in plan.gpus]
    total = sum(weights)
    quotas = [n_workers * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), -weights[i], i))
    for i in order[: n_workers - sum(counts)]:
        counts[i] += 1
    # Interleave so worker k's home does not depend on how many workers there are in total
    # more than it must: gw0 -> largest GPU, gw1 -> next, ...
    homes: list[str] = []
    remaining = counts[:]
    ranked = sorted(range(len(counts)), key=lambda i: (-weights[i], i))
    while len(homes) < n_workers:
        for i in ranked:
            if remaining[i] > 0:
                homes.append(plan.gpus[i].gpu.uuid)
                remaining[i] -= 1
    return homes
