"""What the kit reads: nvidia-smi's CSV, and what the plugin prints (the VRAM analysis) and
writes (the ``--gpushare-report`` and ``gpushare status --json`` documents).

Pure: text and JSON in, values out. The plugin is read through its output, never its modules.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 2**20
GiB = 2**30


# --- nvidia-smi --------------------------------------------------------------------------------

#: ``--query-gpu`` fields; ``memory.reserved`` is missing from older drivers (GPU_FIELDS_OLD).
GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "driver_version",
    "memory.total",
    "memory.reserved",
    "memory.used",
    "memory.free",
    "mig.mode.current",
)
GPU_FIELDS_OLD = tuple(f for f in GPU_FIELDS if f != "memory.reserved")
#: ``--query-compute-apps`` fields.
APP_FIELDS = ("gpu_uuid", "pid", "used_memory")


def smi_args(query: str, fields: Sequence[str]) -> list[str]:
    """nvidia-smi's arguments for one CSV query (``query`` is ``gpu`` or ``compute-apps``)."""
    return [f"--query-{query}={','.join(fields)}", "--format=csv,noheader,nounits"]


def _cell(value: str) -> str | None:
    # "[N/A]", "[Not Supported]", "[Insufficient Permissions]": no figure.
    value = value.strip()
    return None if not value or value.startswith("[") or value == "N/A" else value


def _rows(text: str, fields: Sequence[str]) -> list[dict[str, str | None]]:
    rows = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if len(row) == len(fields):  # skips blank lines and "No running processes found"
            rows.append(dict(zip(fields, map(_cell, row), strict=True)))
    return rows


def _int(row: Mapping[str, str | None], key: str) -> int:
    value = row.get(key)
    if value is None:
        raise ValueError(f"nvidia-smi gave no {key}: {dict(row)}")
    return int(value)


def _opt_int(row: Mapping[str, str | None], key: str) -> int | None:
    value = row.get(key)
    return None if value is None else int(value)


@dataclass(frozen=True)
class SmiGpu:
    """One GPU as ``nvidia-smi --query-gpu`` shows it (memory in MiB, as it prints it)."""

    index: int
    uuid: str
    name: str
    driver: str
    total_mib: int
    used_mib: int
    free_mib: int
    reserved_mib: int | None = None
    mig: str | None = None  # "Enabled", "Disabled"; None where the GPU has no MIG

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MiB

    @property
    def free_bytes(self) -> int:
        return self.free_mib * MiB

    @property
    def used_bytes(self) -> int:
        """Used including what the driver reserves, as the plugin counts it: total - free."""
        return self.total_bytes - self.free_bytes


def parse_smi_gpus(text: str, fields: Sequence[str] = GPU_FIELDS) -> list[SmiGpu]:
    """The GPUs of a ``--query-gpu=<fields> --format=csv,noheader,nounits`` answer."""
    return [
        SmiGpu(
            index=_int(row, "index"),
            uuid=str(row["uuid"]),
            name=str(row["name"]),
            driver=str(row.get("driver_version")),
            total_mib=_int(row, "memory.total"),
            used_mib=_int(row, "memory.used"),
            free_mib=_int(row, "memory.free"),
            reserved_mib=_opt_int(row, "memory.reserved"),
            mig=row.get("mig.mode.current"),
        )
        for row in _rows(text, fields)
    ]


@dataclass(frozen=True)
class SmiApp:
    """One compute process of ``nvidia-smi --query-compute-apps`` (None: no figure given)."""

    gpu_uuid: str
    pid: int
    used_mib: int | None

    @property
    def used_bytes(self) -> int | None:
        return None if self.used_mib is None else self.used_mib * MiB


def parse_smi_apps(text: str) -> list[SmiApp]:
    """The processes of a ``--query-compute-apps=gpu_uuid,pid,used_memory`` CSV answer."""
    return [
        SmiApp(str(row["gpu_uuid"]), _int(row, "pid"), _opt_int(row, "used_memory"))
        for row in _rows(text, APP_FIELDS)
    ]


# --- what the plugin prints and writes ---------------------------------------------------------

_UNITS = {"B": 1, "KiB": 2**10, "MiB": MiB, "GiB": GiB, "TiB": 2**40}
_PRINTED_RE = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9])?)(?P<unit>TiB|GiB|MiB|KiB|B)$")


@dataclass(frozen=True)
class Printed:
    """A size as the plugin prints it (``139.8GiB``): its bytes, and the rounding in the text."""

    text: str
    bytes: int
    rounding: int  # half a step of the printed last digit


def printed(text: str) -> Printed:
    """Read a size the way SPEC says the plugin prints it: one decimal, binary units."""
    m = _PRINTED_RE.match(text)
    if m is None:
        raise ValueError(f"not a size as the plugin prints it: {text!r}")
    unit = _UNITS[m["unit"]]
    return Printed(text, round(float(m["n"]) * unit), unit // 20)


@dataclass(frozen=True)
class HeaderGpu:
    """One GPU line of the ``gpushare: VRAM analysis`` block."""

    index: int
    name: str
    uuid: str
    total: Printed
    free: Printed
    usable: Printed


@dataclass(frozen=True)
class Header:
    """The ``gpushare: VRAM analysis`` block of a pytest run or of ``gpushare plan``.

    ``workers`` is the workers line's N; ``auto_workers`` what ``-n auto`` gives (N itself where
    the line is ``-n auto``'s, as in ``gpushare plan``).
    """

    source: str
    gpus: tuple[HeaderGpu, ...]
    workers: int
    auto_workers: int
    workers_line: str


_HEAD_RE = re.compile(r"^gpushare: VRAM analysis \(source: (?P<source>.*)\)$")
_GPU_RE = re.compile(
    r"^\s+GPU (?P<index>\d+) (?P<name>.+?) \((?P<uuid>(?:GPU|MIG)-[^)]*)\): "
    r"total (?P<total>[^,\s]+), free (?P<free>[^,\s]+).* -> usable (?P<usable>\S+)$"
)
_WORKERS_RE = re.compile(r"^\s+workers: (?P<n>\d+) \((?P<how>.*)\)$")
_AUTO_RE = re.compile(r"-n auto would give (?P<n>\d+)")


def parse_header(text: str) -> Header:
    """The first VRAM analysis block in ``text`` (a run's output); ValueError if there is none."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _HEAD_RE.match(line)), None)
    if start is None:
        raise ValueError("no 'gpushare: VRAM analysis' block in the output")
    head = _HEAD_RE.match(lines[start])
    assert head is not None
    gpus: list[HeaderGpu] = []
    workers: re.Match[str] | None = None
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        if m := _GPU_RE.match(line):
            gpus.append(
                HeaderGpu(
                    int(m["index"]),
                    m["name"],
                    m["uuid"],
                    printed(m["total"]),
                    printed(m["free"]),
                    printed(m["usable"]),
                )
            )
        elif workers is None:
            workers = _WORKERS_RE.match(line)
    if workers is None:
        raise ValueError("no 'workers:' line in the VRAM analysis")
    auto = _AUTO_RE.search(workers["how"])
    n = int(workers["n"])
    return Header(head["source"], tuple(gpus), n, int(auto["n"]) if auto else n, workers.group(0).strip())


def process_figures(gpu: Mapping[str, Any]) -> dict[int, int] | None:
    """PID -> bytes of a report's ``plan.inventory.gpus[]``; None where the plugin untrusted them.

    Accepts both ``[[pid, bytes], ...]`` (what the plugin writes) and ``[{"pid", "used_bytes"}]``
    (what docs/reference/report.rst describes).
    """
    procs = gpu.get("processes")
    if procs is None:
        return None
    pairs = ((p["pid"], p["used_bytes"]) if isinstance(p, Mapping) else (p[0], p[1]) for p in procs)
    return {int(pid): int(used) for pid, used in pairs}


def observed_row(report: Mapping[str, Any], test_id_end: str) -> dict[str, Any]:
    """The report's ``observed`` row of the one test whose id ends with ``test_id_end``."""
    rows = [r for r in report.get("observed", []) if str(r["test_id"]).endswith(test_id_end)]
    if len(rows) != 1:
        ids = [r["test_id"] for r in report.get("observed", [])]
        raise ValueError(f"{len(rows)} observed rows end with {test_id_end!r}: {ids}")
    return dict(rows[0])


def run_leases(status: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """``(GPU uuid, bytes, command)`` of each ``gpushare run`` lease in ``gpushare status --json``
    (its CUDA context booking, ``kind`` ``context``, left out)."""
    return [
        (gpu["uuid"], lease["bytes"], lease["test_id"])
        for gpu in status["gpus"]
        for lease in gpu["leases"]
        if lease["kind"] == "test" and lease["owner"]["worker_id"] == "gpushare-run"
    ]
