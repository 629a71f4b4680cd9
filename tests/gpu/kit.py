"""The kit's pure parts: nvidia-smi's CSV, the plugin's header, comparisons, the record.

Values in, values out: no subprocess, no GPU, no pytest, and no file but the one
:meth:`Record.write` writes, so ``tests/test_gpu_kit.py`` checks all of it on any box. The
plugin is read through what it prints and writes (the header, the ``--gpushare-report`` JSON),
never through its modules.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30

#: nvidia-smi prints whole MiB, and an idle GPU's free memory moves by a MiB or two between
#: two reads; past this, the plugin and nvidia-smi disagree.
SMI_TOLERANCE = 8 * MiB
#: An observed peak this close to what a test allocated is right: the caching allocator rounds
#: to 2 MiB blocks, and CUDA loads kernel modules lazily (a few MiB at a test's first kernel).
PEAK_TOLERANCE = 0.05
#: SPEC's default of ``--gpushare-context-mem``, what the ledger books for one CUDA context.
DEFAULT_CONTEXT = 512 * MiB
#: The record's file name in the output folder.
RECORD_NAME = "record.txt"

OK, FAIL, NA = "ok", "FAIL", "n/a"


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


# --- comparisons -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of the record: what was compared, and whether it held (``ok``, ``FAIL``, ``n/a``).

    ``text`` says what was seen, without the name: the record shows ``name: text``.
    """

    name: str
    status: str
    text: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def verdict(name: str, ok: bool, text: str) -> Check:
    return Check(name, OK if ok else FAIL, text)


def fold(name: str, checks: Iterable[Check]) -> Check:
    """Several comparisons as one record line: failed if any failed, else n/a if any was."""
    checks = list(checks)
    statuses = {c.status for c in checks}
    status = FAIL if FAIL in statuses else NA if NA in statuses else OK
    return Check(name, status, "; ".join(f"{c.name} {c.text}" for c in checks))


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MiB:.1f}MiB"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f}GiB"


def close(name: str, got: int, want: int, tolerance: int, *, shown: str | None = None) -> Check:
    """``got`` within ``tolerance`` of ``want``; the text shows both (``got`` as ``shown``, if
    given: a size as printed) and the difference."""
    delta = got - want
    return verdict(
        name,
        abs(delta) <= tolerance,
        f"{shown or mib(got)} vs {mib(want)} (Δ{delta / MiB:+.1f}MiB)",
    )


def report_vs_smi(gpu: Mapping[str, Any], smi: SmiGpu, tolerance: int = SMI_TOLERANCE) -> Check:
    """A report's ``plan.inventory.gpus[]`` (bytes) against nvidia-smi's figures (MiB).

    The plugin's ``used`` is ``total - free`` (what the driver reserves included), so it is held
    against nvidia-smi's total - free.
    """
    return fold(
        f"GPU {smi.index} report vs nvidia-smi (±{mib(tolerance)})",
        [
            close("total", int(gpu["total_bytes"]), smi.total_bytes, tolerance),
            close("free", int(gpu["free_bytes"]), smi.free_bytes, tolerance),
            close("used", int(gpu["used_bytes"]), smi.used_bytes, tolerance),
        ],
    )


def header_vs_smi(what: str, gpu: HeaderGpu, smi: SmiGpu, tolerance: int = SMI_TOLERANCE) -> Check:
    """A header's printed total and free against nvidia-smi's, allowing for the printed rounding."""
    return fold(
        f"GPU {smi.index} {what} vs nvidia-smi (±rounding+{mib(tolerance)})",
        [
            close(
                "total",
                gpu.total.bytes,
                smi.total_bytes,
                gpu.total.rounding + tolerance,
                shown=gpu.total.text,
            ),
            close("free", gpu.free.bytes, smi.free_bytes, gpu.free.rounding + tolerance, shown=gpu.free.text),
        ],
    )


def peak_close(name: str, allocated: int, observed: int | None, source: str) -> Check:
    """An observed peak within :data:`PEAK_TOLERANCE` of what was allocated."""
    if observed is None:
        return verdict(name, False, f"{source} gave no figure for {gib(allocated)}")
    ratio = observed / allocated - 1
    return verdict(
        name,
        abs(ratio) <= PEAK_TOLERANCE,
        f"{source} {gib(observed)} for {gib(allocated)} ({ratio:+.1%}, ≤{PEAK_TOLERANCE:.0%})",
    )


def per_process(
    name: str,
    pid: int,
    apps: Sequence[SmiApp],
    plugin: Mapping[int, int] | None,
    tolerance: int = SMI_TOLERANCE,
) -> Check:
    """Our process ``pid`` as nvidia-smi and the plugin (:func:`process_figures`) see it.

    Where nvidia-smi gives no figure for ``pid`` (another PID namespace, a sandbox, figures
    withheld), the comparison is ``n/a`` and the plugin must not claim one either.
    """
    seen = [a for a in apps if a.pid == pid and a.used_bytes is not None]
    claimed = None if plugin is None else plugin.get(pid)
    if not seen:
        listed = sorted(a.pid for a in apps)
        text = f"nvidia-smi has no figure for pid {pid} (it lists {listed or 'no process'})"
        if claimed is not None:
            return Check(name, FAIL, f"{text}, yet the plugin says {mib(claimed)}")
        return Check(name, NA, f"{text}; the plugin claims none either")
    smi_bytes = sum(a.used_bytes or 0 for a in seen)
    if claimed is None:
        return Check(name, FAIL, f"nvidia-smi {mib(smi_bytes)} for pid {pid}, the plugin lists none")
    return fold(
        f"{name} plugin vs nvidia-smi (±{mib(tolerance)})",
        [close(f"pid {pid}", claimed, smi_bytes, tolerance)],
    )


# --- the skip ----------------------------------------------------------------------------------


def missing_gpu_reason(
    smi_path: str | None,
    smi_error: str | None,
    smi_gpus: Sequence[SmiGpu],
    torch: Mapping[str, Any] | None,
) -> str | None:
    """Why the real-GPU checks cannot run here, in one line; None when they can.

    ``torch`` is what a child Python said of itself (``version``, ``cuda``, ``available``,
    ``count``, or ``error``); None when it was not asked (no GPU to ask about).
    """
    if smi_path is None:
        return "no GPU: nvidia-smi not found on PATH"
    if smi_error is not None:
        return f"no GPU: nvidia-smi failed: {smi_error}"
    if not smi_gpus:
        return "no GPU: nvidia-smi lists none"
    if torch is None or torch.get("error"):
        return f"no torch with CUDA: {torch.get('error') if torch else 'not asked'}"
    if not torch.get("available") or not torch.get("count"):
        return f"no torch with CUDA: torch {torch.get('version')} (CUDA {torch.get('cuda')}) sees no GPU"
    return None


# --- the record --------------------------------------------------------------------------------


@dataclass
class Record:
    """The kit's compact record: the machine, one line per check, the commands it ran."""

    machine: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.checks)

    @property
    def result(self) -> str:
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        failed = sum(c.failed for c in self.checks)
        na = sum(c.status == NA for c in self.checks)
        passed = len(self.checks) - failed - na
        return f"{passed} ok, {failed} failed, {na} n/a" if self.checks else "no check ran"

    def render(self) -> str:
        lines = ["gpushare real-GPU check", f"result: {self.result}", *self.machine]
        lines += [f"{c.status:<4} {c.name}: {c.text}" for c in self.checks]
        if self.commands:
            lines.append("commands:")
            lines += [f"  {c}" for c in self.commands]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RECORD_NAME
        path.write_text(self.render(), encoding="utf-8")
        return path
