"""Real allocations under leases: observed peaks, the CUDA context, ``--gpushare-enforce``."""

from __future__ import annotations

import json

from .box import Box
from .conftest import Hardware
from .kit import DEFAULT_CONTEXT, NA, Check, Record, fold, mib, peak_close, verdict
from .readings import GiB, observed_row
from .suites import ALLOCATIONS, CONTEXT, OVER_USER, probes, suite

SIZES = {"1GiB": GiB, "4GiB": 4 * GiB, "16GiB": 16 * GiB}
DECLARED, ALLOCATED = 2 * GiB, 8 * GiB
#: What the plugin's OOM note starts with for the over-user (docs/howto/lying-tests.rst).
OOM_NOTE = "gpushare: declared 2.0GiB, tried to allocate 8.0GiB more on GPU "


def _in_test_nvml(probe: dict[str, int | None]) -> int | None:
    before, after = probe["nvml_before"], probe["nvml_after"]
    return None if before is None or after is None else after - before


def test_observed_peaks_match_real_allocations(hardware: Hardware, box: Box, record: Record) -> None:
    """Tests that allocate 1, 4 and 16 GiB with torch, each declaring 1 GiB more, at ``-n 3``:
    each report row's observed peak (NVML or torch, the larger) is within 5 % of the allocation
    with verdict ``ok``, and so are torch's and NVML's figures read inside the test; the plan
    books the default CUDA context."""
    folder = box.suite("allocations", suite(ALLOCATIONS, SIZES=SIZES))
    run = box.pytest(folder, "-n", str(len(SIZES)), "--gpushare-report=report.json")
    assert run.rc == 0, run.failure
    report = box.report("allocations", folder / "report.json")
    seen = {p["n"]: p for p in probes(folder, "alloc")}
    lines = []
    for name, n in SIZES.items():
        row, probe = observed_row(report, f"test_alloc[{name}]"), seen[n]
        nvml = _in_test_nvml(probe)
        checks = [
            peak_close("report", n, row["observed_bytes"], row["source"]),
            verdict("verdict", row["verdict"] == "ok", row["verdict"]),
            peak_close("in test", n, probe["torch_delta"], "torch"),
            peak_close("in test", n, nvml, "nvml")
            if nvml is not None
            else Check("in test", NA, "NVML lists no figure"),
        ]
        lines.append(fold(f"observed {name} ({'fresh' if probe['fresh'] else 'warm'} worker)", checks))
    booked = report["plan"]["budget"]["context_bytes"]
    lines.append(
        verdict("context booking", booked == DEFAULT_CONTEXT, f"the plan books {mib(booked)} per process")
    )
    for line in lines:
        record.add(line)
    assert not any(line.failed for line in lines), [line.text for line in lines if line.failed]


def test_cuda_context_fits_the_default_booking(hardware: Hardware, box: Box, record: Record) -> None:
    """One torch process's CUDA context (its first kernel loaded), measured by NVML on the idle
    GPU, is no more than ``--gpushare-context-mem``'s default: what the ledger books for it."""
    uuid = hardware.gpu.uuid
    run = box.run([box.python, str(box.script("context", CONTEXT)), uuid], env={"CUDA_VISIBLE_DEVICES": uuid})
    assert run.rc == 0, run.failure
    data = json.loads(run.output.strip().splitlines()[-1])
    context = data["device_delta"] - data["torch_reserved"]
    per_process = "no figure" if data["process"] is None else mib(data["process"])
    line = record.add(
        verdict(
            "CUDA context",
            0 < context <= DEFAULT_CONTEXT,
            f"{mib(context)} (device used +{mib(data['device_delta'])} less torch's {mib(data['torch_reserved'])}; "
            f"NVML per process {per_process}) vs --gpushare-context-mem default {mib(DEFAULT_CONTEXT)}",
        )
    )
    assert not line.failed, line.text


def test_enforce_fails_the_over_user_with_the_annotated_oom(
    hardware: Hardware, box: Box, record: Record
) -> None:
    """Under ``--gpushare-enforce`` a test that declares 2 GiB and allocates 8 GiB fails itself
    with torch's out-of-memory error and the plugin's note."""
    folder = box.suite("enforce", suite(OVER_USER, DECLARED=DECLARED, ALLOCATED=ALLOCATED))
    run = box.pytest(folder, "-n", "1", "--gpushare-enforce", "--gpushare-report=report.json")
    report = box.report("enforce", folder / "report.json")
    note = next((x.strip() for x in run.output.splitlines() if OOM_NOTE in x), None)
    outcomes = [lease["outcome"] for lease in report["leases"]]
    line = record.add(
        verdict(
            "enforce",
            run.rc == 1 and "OutOfMemoryError" in run.output and note is not None and outcomes == ["failed"],
            f"rc {run.rc}, lease outcomes {outcomes}, allocated anyway: {bool(probes(folder, 'over'))}; "
            f"note: {note or 'missing'}",
        )
    )
    assert not line.failed, f"{line.text}\n{run.output}"


def test_without_enforce_the_over_user_is_flagged(hardware: Hardware, box: Box, record: Record) -> None:
    """Without enforcement the same test passes, and the summary and the report flag it as an
    over-user with its peak (within 5 % of 8 GiB) and a ``mem=`` of its peak plus 20 %, rounded
    up to a whole GiB."""
    folder = box.suite("over-user", suite(OVER_USER, DECLARED=DECLARED, ALLOCATED=ALLOCATED))
    run = box.pytest(folder, "-n", "1", "--gpushare-report=report.json")
    report = box.report("over-user", folder / "report.json")
    row = observed_row(report, "test_over")
    observed, suggested = row["observed_bytes"] or 0, row["suggested_bytes"] or 0
    shown = f'[mem="{suggested / GiB:.1f}GiB"]'
    summary = [x.strip() for x in run.output.splitlines() if "test_kit.py::test_over: declared 2.0GiB" in x]
    checks = [
        verdict("run", run.rc == 0, f"rc {run.rc}"),
        verdict("verdict", row["verdict"] == "over", f"{row['verdict']} x{row['factor']}"),
        peak_close("peak", ALLOCATED, row["observed_bytes"], row["source"]),
        verdict(
            "suggested",
            suggested % GiB == 0 and 1.2 * observed <= suggested < 1.2 * observed + GiB,
            f"{suggested / GiB:.1f}GiB",
        ),
        verdict(
            "summary", len(summary) == 1 and summary[0].endswith(shown), summary[0] if summary else "no line"
        ),
    ]
    line = record.add(fold("over-user", checks))
    assert not line.failed, line.text
