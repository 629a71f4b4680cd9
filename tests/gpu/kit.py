"""The kit's judgement: comparisons within tolerance, the one reason to skip, and the record.

Values in, values out (what :mod:`.readings` read): no subprocess, no GPU, no pytest, and no
file but the one :meth:`Record.write` writes, so ``tests/test_gpu_kit.py`` checks all of it on
any box.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .readings import GiB, HeaderGpu, MiB, SmiApp, SmiGpu

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
    foreign: Sequence[int] = (),
    tolerance: int = SMI_TOLERANCE,
) -> Check:
    """Our process ``pid`` as nvidia-smi and the plugin (:func:`.readings.process_figures`) see it.

    ``foreign`` are the PIDs nvidia-smi lists that do not exist here (another PID namespace).
    Where nvidia-smi gives no figure for ``pid`` (a sandbox, figures withheld), the comparison
    is ``n/a``, and the plugin must not claim one either. Where the plugin distrusts all
    per-process figures (``plugin`` None), that is its documented safe side when some figure is
    withheld or some PID is foreign (``n/a``), and a failure otherwise.
    """
    seen = [a for a in apps if a.pid == pid and a.used_bytes is not None]
    claimed = None if plugin is None else plugin.get(pid)
    listed = sorted(a.pid for a in apps)
    if not seen:
        text = f"nvidia-smi has no figure for pid {pid} (it lists {listed or 'no process'})"
        if claimed is not None:
            return Check(name, FAIL, f"{text}, yet the plugin says {mib(claimed)}")
        return Check(name, NA, f"{text}; the plugin claims none either")
    smi_bytes = sum(a.used_bytes or 0 for a in seen)
    if plugin is None:
        withheld = sorted(a.pid for a in apps if a.used_bytes is None)
        text = f"nvidia-smi {mib(smi_bytes)} for pid {pid}; the plugin distrusts per-process figures"
        if foreign or withheld:
            return Check(name, NA, f"{text} (foreign pids {sorted(foreign)}, withheld {withheld})")
        return Check(name, FAIL, f"{text}, though every pid nvidia-smi lists ({listed}) is ours to see")
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
