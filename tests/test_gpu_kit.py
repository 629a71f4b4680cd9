"""The real-GPU kit (tests/gpu/) proves itself on a box without a GPU.

Its pure parts (nvidia-smi's CSV, the header, the comparisons, the record) on sample text and on
what ``gpushare plan`` really prints; its plumbing (sub-runs, the helper processes, NVML asked
directly, the skip) against the fake NVML box and a fake ``nvidia-smi``; ``tests/gpu/run.sh``
end to end; and, where torch is installed, the generated suites' torch code on a simulated GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_pynvml import FakeGpu, FakeMig, FakeNvml
from gpu import kit, readings, suites
from gpu.box import RUNS_NAME, SMI_NAME, Box, clean_env, detect
from gpu.facts import nvml_facts
from gpu.kit import FAIL, NA, OK
from gpu.readings import GiB, MiB

TESTS = Path(__file__).resolve().parent
UUID = "GPU-0f0f0f0f-1111-2222-3333-444455556666"
#: -n auto's count from memory alone, whatever the CPUs of this box.
AUTO_ENV = {"PYTEST_XDIST_AUTO_NUM_WORKERS": "256"}
HAS_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch is not installed here (CI's venv has none); the GPU box runs this code for real"


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path / "out", tmp_path / "work")


# --- nvidia-smi's CSV ----------------------------------------------------------------------------


def test_smi_gpus_are_read_with_their_missing_figures() -> None:
    text = (
        f"0, {UUID}, NVIDIA H200, 580.159.03, 143771, 566, 0, 143204, Disabled\n"
        "1, GPU-2, NVIDIA GeForce RTX 4090, 575.51.03, 24564, [N/A], 1000, 23000, [N/A]\n"
    )
    h200, rtx = readings.parse_smi_gpus(text)
    assert (h200.index, h200.uuid, h200.name, h200.driver) == (0, UUID, "NVIDIA H200", "580.159.03")
    assert (h200.total_bytes, h200.free_bytes, h200.reserved_mib, h200.mig) == (
        143771 * MiB,
        143204 * MiB,
        566,
        "Disabled",
    )
    assert h200.used_bytes == (143771 - 143204) * MiB  # the driver's reserve included, as the plugin counts
    assert (rtx.reserved_mib, rtx.mig, rtx.used_mib) == (None, None, 1000)
    old = readings.parse_smi_gpus(
        "0, GPU-1, Old GPU, 470.1, 16000, 100, 15900, [N/A]\n", readings.GPU_FIELDS_OLD
    )
    assert (old[0].reserved_mib, old[0].free_mib) == (None, 15900)


def test_smi_apps_are_read_and_messages_ignored() -> None:
    apps = readings.parse_smi_apps(f"{UUID}, 1234, 41472\n{UUID}, 99, [N/A]\n")
    assert [(a.pid, a.used_bytes) for a in apps] == [(1234, 41472 * MiB), (99, None)]
    assert readings.parse_smi_apps("No running processes found\n") == []


# --- what the plugin prints ---------------------------------------------------------------------


def test_printed_sizes_carry_their_rounding() -> None:
    assert readings.printed("139.8GiB") == readings.Printed("139.8GiB", round(139.8 * GiB), GiB // 20)
    assert readings.printed("512.0MiB").bytes == 512 * MiB
    assert readings.printed("0B") == readings.Printed("0B", 0, 0)
    with pytest.raises(ValueError, match="not a size"):
        readings.printed("12 GB")


def test_header_is_read_as_gpushare_plan_prints_it(box: Box) -> None:
    run = box.gpushare("plan", "--simulate", "141GiB:used=40GiB", "--worker-mem", "10GiB", env=AUTO_ENV)
    assert run.rc == 0, run.output
    header = readings.parse_header(run.output)
    assert header.source.startswith("simulated")
    (gpu,) = header.gpus
    assert (gpu.index, gpu.name, gpu.uuid.startswith("GPU-")) == (0, "Simulated GPU", True)
    assert (gpu.total.text, gpu.free.text, gpu.usable.text) == ("141.0GiB", "101.0GiB", "100.0GiB")
    assert (header.workers, header.auto_workers) == (10, 10)
    assert header.workers_line.startswith("workers: 10 (floor(100.0GiB / 10.0GiB) = 10")


def test_header_of_a_run_without_workers_says_what_n_auto_would_give(box: Box) -> None:
    folder = box.suite("noop", suites.suite(suites.NOOP))
    run = box.pytest(folder, "--gpushare-simulate=24GiB", env=AUTO_ENV)
    assert run.rc == 0, run.output
    header = readings.parse_header(run.output)
    assert (header.workers, header.auto_workers) == (1, 7)  # floor((24 - 1 safety) / 3)
    assert [(p["device"], p["worker"]) for p in suites.probes(folder, "noop")] == [("cpu", "main")]
    (controller,) = suites.probes(folder, "controller")
    assert controller["torch_imported"] is False and controller["cuda_initialized"] is False
    with pytest.raises(ValueError, match="no 'gpushare: VRAM analysis'"):
        readings.parse_header("1 passed")


def test_report_rows_and_process_figures_are_found() -> None:
    report = {"observed": [{"test_id": "t.py::test_alloc[1GiB]"}, {"test_id": "t.py::test_alloc[16GiB]"}]}
    assert readings.observed_row(report, "test_alloc[1GiB]") == {"test_id": "t.py::test_alloc[1GiB]"}
    with pytest.raises(ValueError, match="0 observed rows"):
        readings.observed_row(report, "test_other")
    assert readings.process_figures({"processes": [[12, 300]]}) == {12: 300}
    assert readings.process_figures({"processes": [{"pid": 12, "used_bytes": 300}]}) == {12: 300}
    assert readings.process_figures({"processes": None}) is None
    owner = {"worker_id": "gpushare-run"}
    leases = [
        {"kind": "test", "bytes": 8, "test_id": "python", "owner": owner},
        {"kind": "context", "bytes": 5, "test_id": "CUDA context", "owner": owner},
    ]
    status = {"gpus": [{"uuid": UUID, "leases": leases}]}
    assert readings.run_leases(status) == [(UUID, 8, "python")]


# --- comparisons -----------------------------------------------------------------------------------


def smi_gpu(total_mib: int = 24576, free_mib: int = 22228, reserved_mib: int | None = 300) -> readings.SmiGpu:
    return readings.SmiGpu(
        0, UUID, "NVIDIA GeForce RTX 4090", "575.51.03", total_mib, 2048, free_mib, reserved_mib, None
    )


def test_close_and_fold() -> None:
    ok = kit.close("free", 100 * MiB, 104 * MiB, 4 * MiB)
    assert (ok.status, ok.text) == (OK, "100.0MiB vs 104.0MiB (Δ-4.0MiB)")
    assert kit.close("free", 100 * MiB, 105 * MiB, 4 * MiB).failed
    assert kit.close("total", GiB, GiB, 0, shown="1.0GiB").text == "1.0GiB vs 1024.0MiB (Δ+0.0MiB)"
    na = kit.Check("x", NA, "no figure")
    assert kit.fold("line", [ok, na]).status == NA
    folded = kit.fold("line", [ok, na, kit.verdict("y", False, "bad")])
    assert (folded.status, folded.text) == (FAIL, "free 100.0MiB vs 104.0MiB (Δ-4.0MiB); x no figure; y bad")


def test_report_and_header_against_nvidia_smi() -> None:
    gpu = {"total_bytes": 24 * GiB, "free_bytes": 22228 * MiB + 3 * MiB, "used_bytes": 2348 * MiB - 3 * MiB}
    line = kit.report_vs_smi(gpu, smi_gpu())
    assert line.status == OK, line.text
    assert line.name == "GPU 0 report vs nvidia-smi (±8.0MiB)"
    assert kit.report_vs_smi({**gpu, "free_bytes": 22328 * MiB}, smi_gpu()).failed
    header = readings.HeaderGpu(
        0, "x", UUID, readings.printed("24.0GiB"), readings.printed("21.7GiB"), readings.printed("20.7GiB")
    )
    assert kit.header_vs_smi("run header", header, smi_gpu()).status == OK  # 21.7GiB is 22220.8MiB
    assert kit.header_vs_smi("run header", header, smi_gpu(free_mib=22400)).failed


def test_peaks_within_five_percent() -> None:
    assert kit.peak_close("report", 16 * GiB, int(16.7 * GiB), "nvml").status == OK
    over = kit.peak_close("report", 16 * GiB, int(16.9 * GiB), "nvml")
    assert over.failed and over.text == "nvml 16.90GiB for 16.00GiB (+5.6%, ≤5%)"
    assert kit.peak_close("report", GiB, None, "not measurable").failed


def test_per_process_figures_agree_or_are_not_claimed() -> None:
    apps = [readings.SmiApp(UUID, 77, 41000), readings.SmiApp(UUID, 5, None)]
    assert kit.per_process("p", 77, apps, {77: 41000 * MiB + MiB}).status == OK
    assert kit.per_process("p", 77, apps, {77: 40000 * MiB}).failed
    assert kit.per_process("p", 77, apps[:1], None).failed  # nothing withheld: no reason to distrust
    assert kit.per_process("p", 77, apps, None).status == NA  # pid 5's figure is withheld
    foreign = kit.per_process("p", 77, apps[:1], None, foreign=[9])
    assert (foreign.status, foreign.text) == (
        NA,
        "nvidia-smi 41000.0MiB for pid 77; the plugin distrusts per-process figures (foreign pids [9], withheld [])",
    )
    hidden = kit.per_process("p", 88, apps, None)
    assert (hidden.status, hidden.text) == (
        NA,
        "nvidia-smi has no figure for pid 88 (it lists [5, 77]); the plugin claims none either",
    )
    assert kit.per_process("p", 5, apps, {5: MiB}).failed  # a figure nvidia-smi withholds


def test_the_reason_to_skip_is_one_line() -> None:
    h200 = [smi_gpu()]
    cuda = {"version": "2.11.0", "cuda": "13.0", "available": True, "count": 1}
    assert kit.missing_gpu_reason(None, None, [], None) == "no GPU: nvidia-smi not found on PATH"
    assert (
        kit.missing_gpu_reason("/x", "NVIDIA-SMI has failed", [], None)
        == "no GPU: nvidia-smi failed: NVIDIA-SMI has failed"
    )
    assert kit.missing_gpu_reason("/x", None, [], None) == "no GPU: nvidia-smi lists none"
    assert (
        kit.missing_gpu_reason("/x", None, h200, {"error": "cannot import torch: x"})
        == "no torch with CUDA: cannot import torch: x"
    )
    no_cuda = {**cuda, "available": False}
    assert (
        kit.missing_gpu_reason("/x", None, h200, no_cuda)
        == "no torch with CUDA: torch 2.11.0 (CUDA 13.0) sees no GPU"
    )
    assert kit.missing_gpu_reason("/x", None, h200, cuda) is None


def test_record_renders_one_line_per_check(tmp_path: Path) -> None:
    record = kit.Record(machine=["machine: H200"], commands=["$ python -m pytest  (rc 0, 1.0s)"])
    record.add(kit.verdict("nvml", True, "driver 580"))
    record.add(kit.Check("per process", NA, "no figure"))
    record.add(kit.verdict("enforce", False, "rc 0"))
    assert record.render().splitlines() == [
        "gpushare real-GPU check",
        "result: 1 ok, 1 failed, 1 n/a",
        "machine: H200",
        "ok   nvml: driver 580",
        "n/a  per process: no figure",
        "FAIL enforce: rc 0",
        "commands:",
        "  $ python -m pytest  (rc 0, 1.0s)",
    ]
    assert record.write(tmp_path).read_text().startswith("gpushare real-GPU check\nresult: 1 ok")
    assert (
        kit.Record(skipped="no GPU: nvidia-smi not found on PATH").result
        == "skipped: no GPU: nvidia-smi not found on PATH"
    )


# --- the plumbing on a fake box ------------------------------------------------------------------

FAKE_SMI = f"""#!{sys.executable}
# nvidia-smi's CSV answers, from the JSON file in $FAKE_SMI.
import json, os, sys

box = json.load(open(os.environ["FAKE_SMI"]))
if len(sys.argv) == 1:
    print("fake nvidia-smi")
    sys.exit(0)
query, fields = sys.argv[1].split("=", 1)
fields = fields.split(",")
if box.get("old_driver") and "memory.reserved" in fields:
    print('Field "memory.reserved" is not a valid field to query.')
    sys.exit(2)
rows = box["gpus"] if query == "--query-gpu" else box["apps"]
for row in rows:
    print(", ".join(str(row[f]) for f in fields))
"""

FAKE_NVML = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from fake_pynvml import FakeGpu, FakeNvml

GiB, MiB = 2**30, 2**20
sys.modules["pynvml"] = FakeNvml(
    gpus=[FakeGpu(uuid={UUID!r}, total=24 * GiB, used=2 * GiB, reserved=300 * MiB)]
).module
"""


def fake_smi(tmp_path: Path, *, free_mib: int = 22228, old_driver: bool = False) -> dict[str, str]:
    """A fake nvidia-smi on PATH that shows the fake NVML box's GPU: the environment for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    gpu = {
        "index": 0,
        "uuid": UUID,
        "name": "NVIDIA GeForce RTX 4090",
        "driver_version": "575.51.03",
        "memory.total": 24576,
        "memory.reserved": 300,
        "memory.used": 2048,
        "memory.free": free_mib,
        "mig.mode.current": "[N/A]",
    }
    answers = tmp_path / "smi.json"
    answers.write_text(json.dumps({"gpus": [gpu], "apps": [], "old_driver": old_driver}))
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SMI": str(answers)}


def fake_box(tmp_path: Path, **smi: Any) -> Box:
    return Box(tmp_path / "out", tmp_path / "work", base_env={**os.environ, **fake_smi(tmp_path, **smi)})


def test_the_plugin_beside_nvidia_smi_on_a_fake_box(tmp_path: Path) -> None:
    box = fake_box(tmp_path)
    folder = box.suite(
        "nvml", {**suites.suite(suites.NOOP), "conftest.py": FAKE_NVML + suites.PROBE_CONFTEST}
    )
    (smi,) = box.smi_gpus()
    run = box.pytest(folder, "--gpushare-report=report.json")
    plan = box.gpushare("plan", cwd=folder)
    assert run.rc == 0 and plan.rc == 0, run.output + plan.output
    report = box.report("nvml", folder / "report.json")
    (gpu,) = report["plan"]["inventory"]["gpus"]
    assert report["plan"]["inventory"]["source"] == "NVML (driver 575.51.03)"
    assert kit.report_vs_smi(gpu, smi).status == OK, kit.report_vs_smi(gpu, smi).text
    for header in (readings.parse_header(run.output), readings.parse_header(plan.output)):
        assert kit.header_vs_smi("header", header.gpus[0], smi).status == OK
    # nvidia-smi 100 MiB off: the comparison says so.
    off = fake_box(tmp_path / "off", free_mib=22328).smi_gpus()[0]
    assert (
        "free 21.7GiB vs 22328.0MiB"
        in kit.header_vs_smi("header", readings.parse_header(run.output).gpus[0], off).text
    )
    assert kit.report_vs_smi(gpu, off).failed
    box.finish(kit.Record())
    assert sorted(p.name for p in box.out.iterdir()) == [
        "nvidia-smi.txt",
        "record.txt",
        "reports.json",
        "runs.txt",
    ]
    assert json.loads((box.out / "reports.json").read_text())["nvml"]["version"] == report["version"]


def test_old_drivers_are_asked_without_memory_reserved(tmp_path: Path) -> None:
    (gpu,) = fake_box(tmp_path, old_driver=True).smi_gpus()
    assert (gpu.reserved_mib, gpu.free_mib) == (None, 22228)


def test_detection_asks_torch_only_where_nvidia_smi_finds_a_gpu(tmp_path: Path) -> None:
    no_smi = detect(sys.executable, {**clean_env(os.environ), "PATH": str(tmp_path)})
    assert (no_smi.reason, no_smi.runs) == ("no GPU: nvidia-smi not found on PATH", [])
    found = detect(sys.executable, {**clean_env(os.environ), **fake_smi(tmp_path)})
    assert [g.uuid for g in found.gpus] == [UUID]
    assert found.reason is not None and found.reason.startswith("no torch with CUDA: ")
    assert [log for log, _ in found.runs] == [SMI_NAME, RUNS_NAME]


def test_nvml_facts_from_the_fake_binding() -> None:
    box = FakeNvml(
        gpus=[
            FakeGpu(uuid=UUID, used=GiB, reserved=512 * MiB, processes=[(123, GiB)]),
            FakeGpu(uuid="GPU-mig", mig=[FakeMig(uuid="MIG-1")]),
        ]
    )
    facts = nvml_facts(box.module)
    assert (facts["driver"], facts["nvml"], facts["cuda_driver"]) == ("575.51.03", None, None)
    assert "nvmlSystemGetNVMLVersion: not in this nvidia-ml-py" in facts["errors"]
    plain, mig = facts["gpus"]
    assert plain["v2"] == {
        "total": 24 * GiB,
        "reserved": 512 * MiB,
        "free": 24 * GiB - 1536 * MiB,
        "used": GiB,
    }
    assert plain["v1"] == {"total": 24 * GiB, "free": 24 * GiB - 1536 * MiB, "used": 1536 * MiB}
    assert (plain["mig"], plain["processes"], mig["mig"]) == ("not supported", [[123, GiB]], "enabled")
    assert box.refcount == 0  # NVML shut down again


def test_a_helper_holds_until_the_block_ends(box: Box) -> None:
    ready = box.work / "holder.json"
    with box.hold(
        [box.python, str(box.script("holder", suites.HOLDER)), "0", str(ready), "none"], ready
    ) as held:
        assert held.data["pid"] == held.proc.pid and held.proc.poll() is None
    assert held.run is not None and held.run.rc == 0
    assert (box.work / "holder.json.stop").exists()
    assert held.run.line.startswith("$ python holder.py 0 holder.json none  (rc 0, ")


def test_a_helper_that_dies_early_fails_with_its_output(box: Box) -> None:
    with (
        pytest.raises(pytest.fail.Exception, match="ended with 3: gone"),
        box.hold([box.python, "-c", "print('gone'); raise SystemExit(3)"], box.work / "never.json"),
    ):
        pass


def test_gpushare_run_holds_its_lease_while_the_helper_lives(box: Box) -> None:
    ready = box.work / "run.json"
    argv = [
        box.python,
        "-m",
        "pytest_gpushare",
        "run",
        "--simulate=24GiB",
        "--mem=8GiB",
        "--timeout=60",
        "--",
    ]
    with box.hold(
        [*argv, box.python, str(box.script("holder", suites.HOLDER)), "0", str(ready), "none"], ready
    ) as held:
        during = json.loads(box.gpushare("status", "--json", "--simulate=24GiB").output)
    after = json.loads(box.gpushare("status", "--json", "--simulate=24GiB").output)
    (lease,) = readings.run_leases(during)
    assert lease[:2] == (during["devices"]["gpus"][0]["uuid"], 8 * GiB)
    assert held.data["cvd"] is None  # a simulated GPU: no CUDA device to name
    assert held.run is not None and held.run.rc == 0
    assert readings.run_leases(after) == []


# --- run.sh --------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="this box has nvidia-smi: run.sh runs the real checks"
)
def test_run_sh_without_a_gpu_exits_0_with_a_skipped_record(tmp_path: Path) -> None:
    env = {**clean_env(os.environ), "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(TESTS / "gpu" / "run.sh"), str(tmp_path / "kit")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = (tmp_path / "kit" / "record.txt").read_text().splitlines()
    assert record[:2] == ["gpushare real-GPU check", "result: skipped: no GPU: nvidia-smi not found on PATH"]
    log = (tmp_path / "kit" / "kit-log.txt").read_text()
    assert re.search(
        r"SKIPPED \[\d+\] tests/gpu/conftest.py:\d+: no GPU: nvidia-smi not found on PATH", log
    ), log
    assert "gpu kit: done: result: skipped: no GPU" in proc.stdout


# --- the suites' torch code, where torch is installed -------------------------------------------


@pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH)
def test_the_suites_run_on_a_simulated_gpu_with_cpu_torch(box: Box) -> None:
    # Tests declare 1 GiB or more; the exclusive one allocates all it gets, so its GPU is small.
    sim = ("-n", "2", "--gpushare-simulate=4GiB")
    small = (
        "-n",
        "2",
        "--gpushare-simulate=256MiB",
        "--gpushare-safety=0",
        "--gpushare-context-mem=1MiB",
        "--gpushare-default-mem=64MiB",
    )
    cases = {
        "pinning": (suites.suite(suites.PINNING, COUNT=4), sim),
        "alloc": (suites.suite(suites.ALLOCATIONS, SIZES={"1MiB": MiB, "4MiB": 4 * MiB}), sim),
        "over": (suites.suite(suites.OVER_USER, DECLARED=MiB, ALLOCATED=2 * MiB), sim),
        "whole": (
            suites.suite(suites.LEASE_IN_FULL, suites.MORE_THAN_IS_LEFT, MARK={"exclusive": True}, MEM=GiB),
            small,
        ),
    }
    runs = {name: box.pytest(box.suite(name, files), *args) for name, (files, args) in cases.items()}
    assert all(run.rc == 0 and "skipped" not in run.output for run in list(runs.values())[:3]), runs
    assert runs["whole"].rc == 0 and "1 passed, 1 skipped" in runs["whole"].output  # 1GiB never fits
    pinned = suites.probes(box.work / "pinning", "pinned")
    assert {(p["device"], p["tensor_device"], p["current_device"]) for p in pinned} == {("cpu", "cpu", None)}
    assert sorted(p["n"] for p in suites.probes(box.work / "alloc", "alloc")) == [MiB, 4 * MiB]
    assert [p["n"] for p in suites.probes(box.work / "over", "over")] == [2 * MiB]
    assert 64 * MiB <= suites.probes(box.work / "whole", "in_full")[0]["mem"] <= 256 * MiB
    ready = box.work / "holder.json"
    with box.hold(
        [box.python, str(box.script("holder", suites.HOLDER)), str(MiB), str(ready), "cpu"], ready
    ) as held:
        assert held.data["bytes"] == MiB
