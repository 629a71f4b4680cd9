"""Sharing the GPU for real: a stranger that holds 40 GiB, and ``gpushare run`` beside a session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .box import Box, Run
from .conftest import Hardware
from .kit import SMI_TOLERANCE, Check, Record, close, fold, gib, per_process, verdict
from .readings import GiB, parse_header, process_figures, run_leases
from .suites import HOLDER, LEASE_IN_FULL, MORE_THAN_IS_LEFT, probes, suite

STRANGER = 40 * GiB
WORKER_MEM = 10 * GiB
#: -n auto's count from memory alone: xdist's own count (the CPUs) must not bind it.
AUTO_ENV = {"PYTEST_XDIST_AUTO_NUM_WORKERS": "256"}
RUN_MEM, RUN_USES = 8 * GiB, 6 * GiB


def _lease_bytes(report: dict[str, Any], test: str) -> list[int]:
    return [
        g["bytes"] for lease in report["leases"] if lease["test_id"].endswith(test) for g in lease["gpus"]
    ]


def _never_granted(run: Run, folder: Path, report: dict[str, Any], too_big: int) -> Check:
    """The suite's test_more_than_is_left waited (``--gpushare-timeout=5``) and errored at setup, never granted."""
    return verdict(
        "more than is left",
        run.rc == 1
        and "ERROR test_kit_1.py::test_more_than_is_left" in run.output  # a lease timeout fails setup
        and "no GPU memory for" in run.output
        and not probes(folder, "granted")
        and not _lease_bytes(report, "test_more_than_is_left"),
        f"{gib(too_big)} waited 5 s and failed, never granted (rc {run.rc})",
    )


def test_a_stranger_shrinks_the_plan_and_leases_fit_beside_it(
    hardware: Hardware, box: Box, record: Record
) -> None:
    """Another process allocates 40 GiB: ``gpushare plan``'s usable memory shrinks by what
    nvidia-smi says it took, and ``-n auto``'s count with it (10 GiB per worker: at least 4
    fewer); the plugin's figure for that process is nvidia-smi's; beside it an exclusive lease
    is allocated in full, and a test that needs more than is left waits and times out, never
    granted."""
    uuid = hardware.gpu.uuid
    plan_args = ("plan", f"--worker-mem={WORKER_MEM // GiB}GiB")
    before = parse_header(box.gpushare(*plan_args, env=AUTO_ENV).output)
    smi_before = {g.uuid: g for g in box.smi_gpus()}[uuid]
    ready = box.work / "stranger.json"
    holder = [box.python, str(box.script("stranger", HOLDER)), str(STRANGER), str(ready)]
    with box.hold(holder, ready, env={"CUDA_VISIBLE_DEVICES": uuid}) as stranger:
        smi_with = {g.uuid: g for g in box.smi_gpus()}[uuid]
        apps = box.smi_apps()
        beside = parse_header(box.gpushare(*plan_args, env=AUTO_ENV).output)
        too_big = beside.gpus[0].usable.bytes + 2 * GiB
        folder = box.suite(
            "stranger", suite(LEASE_IN_FULL, MORE_THAN_IS_LEFT, MARK={"exclusive": True}, MEM=too_big)
        )
        run = box.pytest(
            folder,
            "-n",
            "1",
            "--gpushare-timeout=5",
            f"--gpushare-worker-mem={WORKER_MEM // GiB}GiB",
            "--gpushare-report=report.json",
        )
    report = box.report("stranger", folder / "report.json")
    plan_gpu = report["plan"]["gpus"][0]
    taken = smi_before.free_bytes - smi_with.free_bytes
    shrink = before.gpus[0].usable.bytes - beside.gpus[0].usable.bytes
    rounding = before.gpus[0].usable.rounding + beside.gpus[0].usable.rounding
    in_full = [p["mem"] for p in probes(folder, "in_full")]
    lines = [
        fold(
            "stranger",
            [
                verdict(
                    "holds",
                    taken >= STRANGER,
                    f"{gib(taken)} by nvidia-smi's free (pid {stranger.data['pid']})",
                ),
                close("usable shrinks", shrink, taken, rounding + SMI_TOLERANCE, shown=gib(shrink)),
                verdict(
                    "workers",
                    before.auto_workers - beside.auto_workers >= STRANGER // WORKER_MEM
                    and beside.auto_workers == plan_gpu["slots"],
                    f"{before.auto_workers} -> {beside.auto_workers} at {gib(WORKER_MEM)} per worker "
                    f"({beside.workers_line})",
                ),
            ],
        ),
        per_process(
            "stranger per process",
            stranger.data["pid"],
            apps,
            process_figures(report["plan"]["inventory"]["gpus"][0]),
            foreign=[a.pid for a in apps if not Path(f"/proc/{a.pid}").exists()],
        ),
        fold(
            "beside the stranger",
            [
                verdict(
                    "exclusive lease",
                    len(in_full) == 1
                    and _lease_bytes(report, "test_lease_in_full") == in_full
                    and in_full[0] <= plan_gpu["usable_bytes"],
                    f"{[gib(m) for m in in_full]} of usable {gib(plan_gpu['usable_bytes'])}, allocated in full",
                ),
                _never_granted(run, folder, report, too_big),
            ],
        ),
    ]
    assert stranger.run is not None
    for line in lines:
        record.add(line)
    assert stranger.run.rc == 0, stranger.run.failure
    assert not any(line.failed for line in lines), [line.text for line in lines if line.failed]


def test_gpushare_run_beside_a_session(hardware: Hardware, box: Box, record: Record) -> None:
    """``gpushare run --mem 8GiB -- python holder.py`` (torch, 6 GiB) holds its lease while a
    pytest session runs beside it: the command sees the leased GPU by UUID, as ``cuda:0``;
    ``gpushare status`` lists its lease; in the session a test that leases well within what is
    left gets it and allocates it all, and a test that needs 1 GiB more than is left waits and
    times out, never granted; the lease ends with the command, whose exit code
    ``gpushare run`` returns."""
    uuid = hardware.gpu.uuid
    usable = parse_header(box.gpushare("plan").output).gpus[0].usable.bytes
    # What fits even where NVML's per-process figures cannot be trusted and the session counts
    # the command's memory as a stranger's besides its lease; 3 GiB for contexts and rounding.
    fits, too_big = usable - RUN_MEM - RUN_USES - 3 * GiB, usable - RUN_MEM + GiB
    ready = box.work / "run.json"
    command = [box.python, str(box.script("holder", HOLDER)), str(RUN_USES), str(ready)]
    argv = [box.python, "-m", "pytest_gpushare", "run", f"--mem={RUN_MEM // GiB}GiB", "--", *command]
    with box.hold(argv, ready) as held:
        during = json.loads(box.gpushare("status", "--json").output)
        folder = box.suite(
            "beside-run", suite(LEASE_IN_FULL, MORE_THAN_IS_LEFT, MARK={"mem": fits}, MEM=too_big)
        )
        run = box.pytest(folder, "-n", "1", "--gpushare-timeout=5", "--gpushare-report=report.json")
    after = json.loads(box.gpushare("status", "--json").output)
    assert held.run is not None
    report = box.report("beside-run", folder / "report.json")
    seen = held.data
    line = record.add(
        fold(
            "gpushare run",
            [
                verdict(
                    "command",
                    (seen["cvd"], seen.get("current_device"), seen.get("device_count")) == (uuid, 0, 1),
                    f"CUDA_VISIBLE_DEVICES={seen['cvd']} CUDA_DEVICE_ORDER={seen['order']}, "
                    f"cuda:{seen.get('current_device')} of {seen.get('device_count')}, {gib(seen.get('reserved') or 0)} held",
                ),
                verdict(
                    "status",
                    [(u, b) for u, b, _ in run_leases(during)] == [(uuid, RUN_MEM)],
                    f"{[(gib(b), box.tidy(t)) for _, b, t in run_leases(during)]}",
                ),
                verdict(
                    "left",
                    _lease_bytes(report, "test_lease_in_full") == [fits]
                    and len(probes(folder, "in_full")) == 1,
                    f"{gib(fits)} of usable {gib(usable)} leased and allocated in full",
                ),
                _never_granted(run, folder, report, too_big),
                verdict(
                    "end",
                    held.run.rc == 0 and not run_leases(after),
                    f"gpushare run rc {held.run.rc}, leases left {run_leases(after)}",
                ),
            ],
        )
    )
    assert not line.failed, line.text
