"""NVML for real: versions, v2 memory info, MIG mode, and the plugin's figures beside nvidia-smi's."""

from __future__ import annotations

from .box import Box
from .conftest import Hardware
from .kit import OK, SMI_TOLERANCE, Check, Record, close, fold, header_vs_smi, mib, report_vs_smi, verdict
from .readings import parse_header
from .suites import NOOP, probes, suite


def test_nvml_versions_memory_and_mig(hardware: Hardware, record: Record) -> None:
    """NVML's driver is nvidia-smi's; v2 memory info exists and agrees with v1 where the plugin
    relies on it (free is the same in both); NVML's MIG mode is nvidia-smi's."""
    smi = hardware.gpu
    nvml = hardware.nvml_gpu(smi.uuid)
    v1, v2 = nvml["v1"], nvml["v2"]
    driver = hardware.nvml["driver"]
    checks = [verdict("driver", driver == smi.driver, f"{driver} (NVML) vs {smi.driver} (nvidia-smi)")]
    if v2 is None:
        checks.append(verdict("v2", False, f"none: {hardware.nvml['errors']}"))
    else:
        parts = v2["reserved"] + v2["used"] + v2["free"]
        checks += [
            close("free v2", v2["free"], v1["free"], SMI_TOLERANCE),
            Check(
                "v2",
                OK,
                f"reserved {mib(v2['reserved'])} + used {mib(v2['used'])} + free {mib(v2['free'])} "
                f"= {mib(parts)} of total {mib(v2['total'])}; v1 total {mib(v1['total'])}, used {mib(v1['used'])}",
            ),
        ]
    smi_mig = {"Enabled": "enabled", "Disabled": "disabled", None: "not supported"}.get(smi.mig, smi.mig)
    checks.append(verdict("MIG", nvml["mig"] == smi_mig, f"{nvml['mig']} (NVML) vs {smi.mig} (nvidia-smi)"))
    line = record.add(fold("nvml", checks))
    assert not line.failed, line.text


def test_plugin_sees_what_nvidia_smi_sees(hardware: Hardware, box: Box, record: Record) -> None:
    """A pytest run's header and report, and ``gpushare plan``'s header, give nvidia-smi's total,
    free and used, within a few MiB (plus the header's printed rounding), for every GPU."""
    folder = box.suite("nvml", suite(NOOP))
    smi_run = {g.uuid: g for g in box.smi_gpus()}
    run = box.pytest(folder, "--gpushare-report=report.json")
    smi_plan = {g.uuid: g for g in box.smi_gpus()}
    plan = box.gpushare("plan", cwd=folder)
    assert run.rc == 0, run.failure
    assert plan.rc == 0, plan.failure
    report = box.report("nvml", folder / "report.json")
    run_header, plan_header = parse_header(run.output), parse_header(plan.output)

    inventory = report["plan"]["inventory"]
    plugin_gpus = [g["uuid"] for g in inventory["gpus"]]
    lines = [
        verdict(
            "plugin source",
            f"driver {hardware.nvml['driver']}" in inventory["source"]
            and sorted(plugin_gpus) == sorted(smi_run),
            f"{inventory['source']!r}, GPUs {plugin_gpus}",
        )
    ]
    # A GPU that nvidia-smi does not list fails the line above.
    lines += [report_vs_smi(g, smi_run[g["uuid"]]) for g in inventory["gpus"] if g["uuid"] in smi_run]
    for what, header, smi in (("run header", run_header, smi_run), ("plan header", plan_header, smi_plan)):
        lines += [header_vs_smi(what, g, smi[g.uuid]) for g in header.gpus if g.uuid in smi]
    for line in lines:
        record.add(line)
    assert [p["uuid"] for p in probes(folder, "noop")] == [hardware.gpu.uuid]
    assert not any(line.failed for line in lines), [line.text for line in lines if line.failed]
