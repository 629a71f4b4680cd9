"""Text of the VRAM analysis (header, summary) and the JSON report: pure formatting, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_gpushare.planner import GpuPlan, Plan, WorkerCount
from pytest_gpushare.units import format_size

if TYPE_CHECKING:
    from pytest_gpushare.ollama import OllamaStatus

__all__ = [
    "WorkerLine",
    "env_text",
    "header_lines",
    "json_report",
    "peak_concurrent",
    "pin_lines",
    "summarize",
    "summary_lines",
    "worker_wait_lines",
    "worker_wait_text",
]

#: A wait shorter than this is no wait worth naming ("0.0s" helps nobody).
NOTABLE_WAIT_S = 0.05
#: The summary names at most this many GPU tests that did not run on a GPU.
NOT_RUN_SHOWN = 10


@dataclass(frozen=True)
class WorkerLine:
    """What the session really runs with, next to what the plan says.

    ``mode`` is ``auto`` (``-n auto``/``-n logical``: the plan decided), ``fixed`` (``-n N``),
    or ``single`` (no xdist, or ``-n 0``).
    """

    mode: str
    workers: int
    planned: WorkerCount


def _gpu_line(g: GpuPlan) -> str:
    gpu = g.gpu
    parts = [f"total {format_size(gpu.total_bytes)}", f"free {format_size(g.free_bytes)}"]
    if g.credited_bytes:
        parts[-1] += f" (incl. {format_size(g.credited_bytes)} our lease holders use)"
    if g.reservations:
        parts += [f"{r.reason} {format_size(r.bytes)}" for r in g.reservations]
    else:
        parts.append("reserve 0B")
    parts.append(f"safety {format_size(g.safety_bytes)}")
    return (
        f"  GPU {gpu.index} {gpu.name} ({gpu.uuid}): "
        + ", ".join(parts)
        + f" -> usable {format_size(g.usable_bytes)}"
    )


def workers_line(line: WorkerLine) -> str:
    planned = line.planned
    if line.mode == "auto":
        return f"  workers: {line.workers} ({planned.derivation}; bound by {planned.bound_by})"
    if line.mode == "fixed":
        return (
            f"  workers: {line.workers} (set by -n {line.workers}; -n auto would give "
            f"{planned.workers}: {planned.derivation})"
        )
    return f"  workers: 1 (no xdist workers; -n auto would give {planned.workers}: {planned.derivation})"


def header_lines(
    plan: Plan,
    workers: WorkerLine,
    *,
    ledger: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``gpushare: VRAM analysis`` block, one string per line."""
    inv = plan.inventory
    lines = [f"gpushare: VRAM analysis (source: {inv.source})"]
    if inv.error:
        lines.append(f"  NVML failed: {inv.error}")
    lines += [f"  unusable: {u}" for u in inv.unusable]
    if not plan.gpus:
        lines.append("  no GPU: GPU tests follow --gpushare-fallback")
    lines += [_gpu_line(g) for g in plan.gpus]
    if plan.gpus and not plan.per_process_trusted:
        lines.append(
            "  per-process figures unavailable or untrusted (another PID namespace, WSL2?): "
            "all used memory counts as other applications' (the safe side)"
        )
    lines.append(workers_line(workers))
    lines += [f"  {x}" for x in extra]
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append(f"  ledger: {ledger}")
    return lines


def env_text(env: dict[str, str]) -> str:
    """``A=1, B=2``: environment variables the plugin set, as the header lists them."""
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items()))


def pin_lines(pinned: Sequence[tuple[str, str]], env: dict[str, str]) -> list[str]:
    """What each xdist worker was pinned to (worker id, ``GPU 0 only``), and what else each got."""
    if not pinned:
        return []
    lines = [
        "gpushare: workers pinned by CUDA_VISIBLE_DEVICES, home GPU first as cuda:0: "
        + "; ".join(f"{worker} {text}" for worker, text in pinned)
    ]
    if env:
        lines.append(f"gpushare: set in each worker: {env_text(env)}")
    return lines


def foreign_lines(foreign: dict[int, list[int]]) -> list[str]:
    """Other accounts use a GPU while our ledger folder is private: they cannot see our leases."""
    return [
        f"WARNING: other accounts' processes use GPU {index} (pids {', '.join(map(str, pids))}) but the "
        "ledger folder is this account's own: their sessions cannot see these leases; "
        "share a group folder with --gpushare-ledger-dir (docs: share a box)"
        for index, pids in sorted(foreign.items())
    ]


def spilling_lines(status: OllamaStatus) -> list[str]:
    """Models Ollama has already pushed partly to the CPU (slow inference)."""
    return [
        f"WARNING: Ollama model {m.name} is spilling to the CPU: {format_size(m.cpu_bytes)} of "
        f"{format_size(m.size_bytes)} is not on the GPU"
        for m in status.models
        if status.answered and m.cpu_bytes > 0
    ]


def ollama_lines(
    status: OllamaStatus,
    plan: Plan,
    *,
    reserve_set: bool,
    held_by_gpu: dict[int, int],
    attribution_note: str | None,
) -> list[str]:
    """Where Ollama was asked, what it answered, its models, and the hold on each GPU."""
    if not status.asked:
        return ["ollama: not asked (--gpushare-ollama=off)"]
    if not status.answered:
        lines = [f"ollama: {status.address} did not answer usefully ({status.problem})"]
        if reserve_set:
            lines.append("  nothing credited: the full --gpushare-ollama-reserve is held back")
        return lines
    held = sum(m.vram_bytes for m in status.models)
    lines = [
        f"ollama: {status.address} answered: {len(status.models)} model(s) loaded, "
        f"{format_size(held)} in VRAM"
    ]
    lines += [
        f"  {m.name}: {format_size(m.vram_bytes)} VRAM of {format_size(m.size_bytes)}" for m in status.models
    ]
    for g in plan.gpus:
        for r in g.reservations:
            if r.kind == "ollama":
                lines.append(
                    f"  GPU {g.gpu.index}: Ollama reserve {format_size(r.ceiling_bytes)}, holds "
                    f"{format_size(held_by_gpu.get(g.gpu.index, 0))} already "
                    f"-> hold back {format_size(r.bytes)} more"
                )
    if attribution_note:
        lines.append(f"  {attribution_note}")
    if held and not reserve_set:
        lines.append(
            f"  Ollama holds {format_size(held)}, but no reservation protects its next load: "
            "set --gpushare-ollama-reserve (e.g. the size of the largest model it serves)"
        )
    lines += [f"  {x}" for x in spilling_lines(status)]
    return lines


REPORT_VERSION = 1


def peak_concurrent(intervals: Sequence[tuple[float, float, int]]) -> int:
    """Largest sum of ``bytes`` over intervals ``(start, end, bytes)`` alive at one moment."""
    events: list[tuple[float, int]] = []
    for start, end, n_bytes in intervals:
        events.append((start, n_bytes))
        events.append((end, -n_bytes))
    # Ends sort before starts at the same instant: a release and a grant at one time never overlap.
    events.sort(key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def summarize(
    collected: Sequence[dict[str, Any]], lost: Sequence[str], now: float, plan: Plan | None
) -> dict[str, Any]:
    """Fold the per-test records the controller received into the run's lease summary.

    A lease never given back (its process died) counts as held until ``now``. ``workers`` has
    each worker's wait for memory and the part of it with room for another pending test
    (:mod:`pytest_gpushare.waits`, against ``plan``'s usable memory and CUDA context size;
    ``plan`` is None only where nothing was collected, so that nothing is planned for it).
    """
    leases: list[dict[str, Any]] = []
    not_run: list[dict[str, Any]] = []
    log: list[str] = []
    for entry in collected:
        log += entry.get("log", [])
        if "lease" in entry:
            lease = dict(entry["lease"])
            lease["outcome"] = entry.get("outcome")
            leases.append(lease)
        elif entry.get("fallback"):
            not_run.append({"test_id": entry["test_id"], "fallback": entry["fallback"]})
    per_gpu: dict[str, dict[str, Any]] = {}
    for lease in leases:
        end = lease["released_at"] or max(now, lease["taken_at"])
        for part in lease["gpus"]:
            slot = per_gpu.setdefault(part["uuid"], {"index": part["index"], "leases": 0, "intervals": []})
            slot["leases"] += 1
            slot["intervals"].append((lease["taken_at"], end, part["bytes"]))
    gpus = {
        uuid: {"index": v["index"], "leases": v["leases"], "peak_bytes": peak_concurrent(v["intervals"])}
        for uuid, v in per_gpu.items()
    }
    waited = sorted((x for x in leases if x["waited_s"] >= NOTABLE_WAIT_S), key=lambda x: -x["waited_s"])
    usable = {} if plan is None else {g.gpu.uuid: g.usable_bytes for g in plan.gpus}
    context = 0 if plan is None else plan.budget.context_bytes
    # Here and not at the top: xdist workers import this module for their header lines only.
    from pytest_gpushare.waits import find_waits, per_worker

    waits = find_waits(leases, usable, context_bytes=context, finished=now)
    return {
        "leases": leases,
        "not_run": not_run,
        "gpus": gpus,
        "waited_longest": [{"test_id": x["test_id"], "waited_s": x["waited_s"]} for x in waited[:5]],
        "workers": [w.to_dict() for w in per_worker(leases, waits)],
        "lost": list(lost),
        "log": log,
    }


def summary_lines(plan: Plan, data: dict[str, Any]) -> list[str]:
    """The ``gpushare`` terminal summary section."""
    lines: list[str] = []
    if plan.inventory.error:
        lines.append(f"NVML failed: {plan.inventory.error}")
    for g in plan.gpus:
        got = data["gpus"].get(g.gpu.uuid, {"leases": 0, "peak_bytes": 0})
        lines.append(
            f"GPU {g.gpu.index} {g.gpu.name}: peak leased {format_size(got['peak_bytes'])} of "
            f"{format_size(g.usable_bytes)} usable, {got['leases']} lease(s)"
        )
    planned = {g.gpu.uuid for g in plan.gpus}
    lines += [  # leased by workers on another host (SPEC "Past one box"), on their own GPUs
        f"GPU {got['index']} {uuid} (another host): peak leased {format_size(got['peak_bytes'])}, "
        f"{got['leases']} lease(s)"
        for uuid, got in sorted(data["gpus"].items())
        if uuid not in planned
    ]
    if data["waited_longest"]:
        lines.append("waited longest for memory:")
        lines += [f"  {w['waited_s']:.1f}s {w['test_id']}" for w in data["waited_longest"]]
    lines += worker_wait_lines(data["workers"])
    lines += not_run_lines(data["not_run"])
    rows = data.get("observed", [])
    if any(g.gpu.simulated for g in plan.gpus):  # nothing to measure on a simulated GPU
        rows = [r for r in rows if r["verdict"] != "not measurable"]
    lines += observed_lines(rows)
    lines += [f"lost: {x}" for x in data["lost"]]
    lines += [f"note: {x}" for x in data["log"]]
    if not lines:
        lines.append("no GPU tests ran")
    return lines


def worker_wait_text(worker: str, waited_s: float, room_s: float) -> str:
    """``worker gw0 waited 3.2s for memory, 1.1s of it with room for another pending test``
    (``none of it`` when there was none)."""
    room = f"{room_s:.1f}s" if room_s > 0 else "none"
    return (
        f"worker {worker} waited {waited_s:.1f}s for memory, {room} of it with room for another pending test"
    )


def worker_wait_lines(workers: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per worker that really waited (the report's ``workers``); none when nobody did."""
    return [
        worker_wait_text(w["worker"], w["waited_s"], w["waited_with_room_s"])
        for w in workers
        if w["waited_s"] >= NOTABLE_WAIT_S
    ]


def not_run_lines(not_run: Sequence[dict[str, Any]], limit: int = NOT_RUN_SHOWN) -> list[str]:
    """``N GPU tests not run`` and which (the first ``limit``), so a green run hides none."""
    if not not_run:
        return []
    modes = sorted({x["fallback"] for x in not_run})
    lines = [f"{len(not_run)} GPU tests not run ({', '.join(modes)}: no GPU could serve them):"]
    lines += [f"  {x['test_id']} ({x['fallback']})" for x in not_run[:limit]]
    if len(not_run) > limit:
        lines.append(f"  and {len(not_run) - limit} more (all in the --gpushare-report JSON)")
    return lines


def observed_lines(rows: Sequence[dict[str, Any]], limit: int = 10) -> list[str]:
    """Declared against observed: over-users first with their factor, then generous ones."""
    over = [r for r in rows if r["verdict"] == "over"]
    generous = [r for r in rows if r["verdict"] == "generous"]
    unmeasured = [r for r in rows if r["verdict"] == "not measurable"]
    lines: list[str] = []
    if over:
        lines.append("tests that used more than they declared (suggested mem= in brackets):")
        lines += [
            f"  {r['factor']:.1f}x {r['test_id']}: declared {format_size(r['declared_bytes'])}, "
            f"peak {format_size(r['observed_bytes'])} ({r['source']}) "
            f'[mem="{format_size(r["suggested_bytes"])}"]'
            for r in over[:limit]
        ]
    if generous:
        lines.append("tests that declared far more than they used (hint):")
        lines += [
            f"  {r['test_id']}: declared {format_size(r['declared_bytes'])}, "
            f'peak {format_size(r["observed_bytes"])} [mem="{format_size(r["suggested_bytes"])}"]'
            for r in generous[:limit]
        ]
    if unmeasured and len(unmeasured) == len(rows):
        lines.append(f"observed VRAM: not measurable for {len(unmeasured)} GPU test(s)")
    return lines


def json_report(plan: Plan, data: dict[str, Any], started: float, finished: float) -> dict[str, Any]:
    """The ``--gpushare-report`` document (schema version ``REPORT_VERSION``, see docs)."""
    return {
        "version": REPORT_VERSION,
        "started": started,
        "finished": finished,
        "plan": plan.to_dict(),
        "usable_bytes": {g.gpu.uuid: g.usable_bytes for g in plan.gpus},
        "leases": data["leases"],
        "gpus": data["gpus"],
        "waited_longest": data["waited_longest"],
        "workers": data["workers"],
        "not_run": data["not_run"],
        "lost": data["lost"],
        "log": data["log"],
        "observed": data.get("observed", []),
    }
