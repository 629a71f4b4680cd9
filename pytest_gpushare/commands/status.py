"""``gpushare status``: who holds what on this box, per GPU, beside what the devices say.

Reading the ledgers is an access like any other: owners whose liveness lock is free are dead,
and their leases are reclaimed on the way (:func:`pytest_gpushare.ledger.read_status`); what this
access reclaimed or repaired is listed with the rest.

The ledger folder is the one pytest would use in the current folder: ``--ledger-dir``, else
``GPUSHARE_LEDGER_DIR``, else the ini file's ``gpushare_ledger_dir`` (pytest's own
configuration is read, as ``gpushare plan`` does), else the account's own folder.

Devices are asked through NVML, or the simulated probe with ``--simulate`` /
``GPUSHARE_SIMULATE``; ledger GPUs are matched to devices by UUID. Exit codes: 0, also for a
folder that does not exist yet (no leases); 2 for a bad command line or a folder that is unsafe
to use; 4 for a bad setting value.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_gpushare.commands.common import (
    CommandParser,
    UsageError,
    add_settings_help,
    pytest_view,
    take_settings,
)
from pytest_gpushare.errors import LedgerError, SettingError
from pytest_gpushare.gpus import Gpu, GpuInventory, probe_for
from pytest_gpushare.ledger import CONTEXT, default_ledger_dir, read_status, trust_lines
from pytest_gpushare.units import format_size

__all__ = ["cmd_status", "device_view", "status_document", "status_lines"]

_RUN_WORKER = "gpushare-run"


#: The settings ``gpushare status`` takes: where the ledgers are, and which devices to show.
_SETTINGS = ("gpushare_ledger_dir", "gpushare_simulate")


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="gpushare status",
        description=(
            "The live leases on this box per GPU (owner session, worker, test id or command, size, "
            "age), CUDA context bookings, waiters, what this access reclaimed, and what NVML says is "
            "used. The ledger folder is --ledger-dir, else GPUSHARE_LEDGER_DIR, else the ini file's "
            "gpushare_ledger_dir, else the account's own folder."
        ),
        epilog="exit codes: 0 (also for a folder that does not exist yet), 2 bad command line or unsafe "
        "folder, 4 bad setting",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on standard output")
    add_settings_help(
        parser,
        only=_SETTINGS,
        helps={
            "gpushare_ledger_dir": "the ledger folder (else GPUSHARE_LEDGER_DIR, else the ini file's)",
            "gpushare_simulate": "show these simulated GPUs beside the ledgers instead of asking NVML",
        },
    )
    return parser


def device_view(simulate: str | None, source: str = "--simulate") -> GpuInventory:
    """What the devices say: the simulated GPUs of ``simulate``, else NVML (never raises for NVML)."""
    return probe_for(simulate, source).probe()


def status_document(
    snapshot: Mapping[str, Any],
    devices: GpuInventory,
    *,
    folder_source: str,
    log: Sequence[str] = (),
    sessions: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``read_status``'s answer with the devices' view added.

    ``sessions`` are the running files of live broker sessions
    (:func:`pytest_gpushare.broker.read_running`): each running test's lease (test id, worker,
    parts, age) and waiting request. The box ledger books a broker session's pooled tests as its
    controller's chunks, so these say which test holds what; a lease routed ``"direct"`` is also
    a ledger lease of its worker (its bytes are in the ledger's figures once).

    Adds ``folder_source`` (which setting named the folder), ``log`` (the lines this access
    logged), ``devices`` (``source``, ``error``, ``unusable``, ``notes``, ``gpus``: every device
    with ``in_ledger``) and, on each ledger GPU, ``device``: the matching device by UUID (index,
    name, total/free/used bytes, simulated) or None.

    ``gpus`` lists the ledgers of the devices seen now, and of any other GPU with a live lease or
    waiter (a GPU that left the box, a session on other simulated GPUs). The UUIDs of the rest go
    to ``idle_ledgers``: nobody books them and no device here is theirs (old simulated specs).

    A simulated device is seen as a real one would be: its used memory is what strangers hold
    (``used=``) plus what the live lease holders booked on it (leases and CUDA contexts).
    """
    by_uuid = {g.uuid: g for g in devices.gpus}
    booked = {gpu["uuid"]: int(gpu["booked_bytes"]) for gpu in snapshot.get("gpus", [])}
    gpus, idle = [], []
    for gpu in snapshot.get("gpus", []):
        seen = by_uuid.get(gpu["uuid"])
        if seen is None and not (gpu["leases"] or gpu["waiters"]):
            idle.append(gpu["uuid"])
            continue
        gpus.append({**gpu, "device": None if seen is None else _device_fields(seen, booked)})
    # In the devices' order where they are known; the folder lists ledgers by file name.
    gpus.sort(key=lambda g: (g["device"] is None, g["device"]["index"] if g["device"] else 0, g["uuid"]))
    document = dict(snapshot)
    document["gpus"] = gpus
    document["idle_ledgers"] = sorted(idle)
    document["folder_source"] = folder_source
    document["log"] = list(log)
    document["sessions"] = [dict(doc) for doc in sessions]
    document["devices"] = {
        "source": devices.source,
        "error": devices.error,
        "unusable": list(devices.unusable),
        "notes": list(devices.notes),
        "gpus": [
            {**_device_fields(g, booked), "uuid": g.uuid, "in_ledger": g.uuid in booked} for g in devices.gpus
        ],
    }
    return document


def _device_fields(gpu: Gpu, booked: Mapping[str, int]) -> dict[str, Any]:
    """What a device shows; on a simulated one the holders use what they booked (``booked`` by UUID)."""
    used, free = gpu.used_bytes, gpu.free_bytes
    if gpu.simulated:
        used = min(gpu.total_bytes, used + booked.get(gpu.uuid, 0))
        free = gpu.total_bytes - used
    return {
        "index": gpu.index,
        "name": gpu.name,
        "total_bytes": gpu.total_bytes,
        "free_bytes": free,
        "used_bytes": used,
        "simulated": gpu.simulated,
    }


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _who(owner: Mapping[str, Any]) -> str:
    if "pid" not in owner:
        return f"owner {owner.get('key')}"
    return (
        f"session {owner.get('session_id')}, {owner.get('worker_id')}, "
        f"pid {owner.get('pid')} on {owner.get('host')}"
    )


def _holder(lease: Mapping[str, Any]) -> str:
    owner = lease["owner"]
    if owner.get("worker_id") == _RUN_WORKER and owner.get("command"):
        return f"command: {owner['command']}"
    return f"test {lease['test_id']}"


def _usage(device: Mapping[str, Any]) -> str:
    return (
        f"used {format_size(device['used_bytes'])}, "
        f"free {format_size(device['free_bytes'])} of {format_size(device['total_bytes'])}"
    )


def _ledger_head(gpu: Mapping[str, Any]) -> str:
    """A ledger GPU's first line: what it is, its limit and what is booked on it."""
    limit, booked = gpu["limit_bytes"], gpu["booked_bytes"]
    head = f"{gpu['uuid']} ({gpu['name'] or 'unknown GPU'}"
    head += f", {format_size(gpu['total_bytes'])})" if gpu["total_bytes"] else ")"
    if limit is None:
        return f"{head}: booked {format_size(booked)}, no live owner sets a limit"
    return (
        f"{head}: limit {format_size(limit)}, booked {format_size(booked)} "
        f"(leases {format_size(gpu['leased_bytes'])}, CUDA contexts {format_size(gpu['context_bytes'])}), "
        f"{format_size(max(0, limit - booked))} left"
    )


def _ledger_gpu_lines(gpu: Mapping[str, Any], devices: Mapping[str, Any]) -> list[str]:
    """One ledger GPU: its head, what the device says, its leases, contexts and waiters."""
    lines = [_ledger_head(gpu)]
    device = gpu["device"]
    seer = "NVML" if devices["source"].startswith("NVML") else "simulated"
    if device is not None:
        lines.append(f"  {seer} GPU {device['index']}: {_usage(device)}")
    elif devices["error"] is None:  # a failed NVML shows no GPU; its failure is said below
        lines.append(f"  {seer}: does not show this GPU")
    # Test leases first, then the CUDA contexts that come with them.
    for lease in sorted(gpu["leases"], key=lambda lease: lease["kind"] == CONTEXT):
        size = format_size(lease["bytes"])
        age = _age(lease["age_s"])
        if lease["kind"] == CONTEXT:
            lines.append(f"  context  {size:>9}  {_who(lease['owner'])}, {age}")
        else:
            lines.append(f"  lease    {size:>9}  {_holder(lease)}  ({_who(lease['owner'])}, {age})")
    for waiter in gpu["waiters"]:
        need = format_size(waiter["bytes"]) + (" exclusive" if waiter["exclusive"] else "")
        if waiter["count"] > 1:
            need += f" on each of {waiter['count']} GPUs"
        lines.append(
            f"  waiting  {need:>9}  {waiter['test_id']}  "
            f"({_who(waiter['owner'])}, waited {_age(waiter['waited_s'])})"
        )
    return lines


def _device_lines(devices: Mapping[str, Any]) -> list[str]:
    """What the devices say beyond the ledgers: NVML's failure, unreadable GPUs, GPUs without a ledger."""
    lines = [] if devices["error"] is None else [f"NVML failed: {devices['error']}"]
    lines += [f"{devices['source']}: cannot read {what}" for what in devices["unusable"]]
    lines += [f"{devices['source']}: {note}" for note in devices["notes"]]
    others = [g for g in devices["gpus"] if not g["in_ledger"]]
    if others:
        lines.append(f"GPUs without a ledger here ({devices['source']}):")
        lines += [f"  GPU {g['index']} ({g['name']}, {g['uuid']}): {_usage(g)}" for g in others]
    return lines


def _session_lines(document: Mapping[str, Any]) -> list[str]:
    """Each running test and waiting request of the live broker sessions."""
    index = {g["uuid"]: g["device"]["index"] for g in document["gpus"] if g["device"] is not None}
    now = float(document.get("taken_at", 0.0))
    lines: list[str] = []
    for doc in document.get("sessions", []):
        if not doc["leases"] and not doc["waiting"]:
            continue
        lines.append(f"running tests of session {doc['session_id']} (controller pid {doc['pid']}):")
        for lease in doc["leases"]:
            where = ", ".join(f"{format_size(int(n))} on GPU {index.get(u, u)}" for u, n in lease["parts"])
            age = _age(max(0.0, now - float(lease["taken_at"])))
            lines.append(f"  test     {where}  {lease['test_id']}  ({lease['worker_id']}, {age})")
        for wait in doc["waiting"]:
            waited = _age(max(0.0, now - float(wait["since"])))
            lines.append(
                f"  waiting  {wait['need']}  {wait['test_id']}  ({wait['worker_id']}, waited {waited})"
            )
    return lines


def status_lines(document: Mapping[str, Any]) -> list[str]:
    """The text ``gpushare status`` prints for a :func:`status_document`."""
    lines = [f"gpushare status: ledger folder {document['folder']} ({document['folder_source']})"]
    if not document["gpus"]:
        lines.append("no leases")
    for gpu in document["gpus"]:
        lines += _ledger_gpu_lines(gpu, document["devices"])
    lines += _session_lines(document)
    if document["idle_ledgers"]:
        lines.append(
            f"not shown: {len(document['idle_ledgers'])} ledger(s) that nobody books, of GPUs not seen here "
            "(other simulated specs, GPUs that left; --json lists them)"
        )
    lines += trust_lines(document)
    if document["log"]:
        lines.append("this access reclaimed or repaired:")
        lines += [f"  {line}" for line in document["log"]]
    return lines + _device_lines(document["devices"])


def cmd_status(args: Sequence[str]) -> int:
    """``gpushare status [--ledger-dir PATH] [--simulate SPEC] [--json]``; returns the exit code."""
    try:
        flags = take_settings(args, only=_SETTINGS)
        opts = _parser().parse_args(flags.rest)
    except UsageError as exc:
        print(f"gpushare status: {exc}", file=sys.stderr)
        return 2
    except SettingError as exc:
        print(f"gpushare status: {exc}", file=sys.stderr)
        return 4
    try:
        settings, _ = pytest_view(flags, want_plan=False)  # the ini file counts, as for pytest here
        folder, folder_source = settings.ledger_dir, settings.sources["ledger_dir"]
        devices = device_view(settings.simulate, settings.sources["simulate"])
    except SettingError as exc:
        print(f"gpushare status: {exc}", file=sys.stderr)
        return 4
    if folder is None:
        folder, folder_source = str(default_ledger_dir()), "this account's own folder"
    elif folder_source == "default":
        folder_source = "this account's own folder"
    log: list[str] = []
    try:
        snapshot = read_status(folder, log=log.append)
    except LedgerError as exc:
        print(f"gpushare status: {exc}", file=sys.stderr)
        return 2
    from pytest_gpushare.broker.status import live_owner_keys, read_running

    sessions = read_running(folder, live_owner_keys(snapshot), snapshot["taken_at"])
    document = status_document(snapshot, devices, folder_source=folder_source, log=log, sessions=sessions)
    if opts.json:
        for line in log:
            print(line, file=sys.stderr)
        json.dump(document, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print("\n".join(status_lines(document)))
    sys.stdout.flush()
    return 0
