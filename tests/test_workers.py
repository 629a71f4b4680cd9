"""Worker devices: home GPUs and CUDA_VISIBLE_DEVICES of real ``pytest -n`` workers on a fake NVML box,
MIG instances, and workers on other hosts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import execnet
import pytest

from pytest_gpushare.gpus import Gpu, GpuInventory, SimulatedProbe
from pytest_gpushare.gpus.visible import cuda_ordinal
from pytest_gpushare.planner import Budget, make_plan
from pytest_gpushare.units import GiB, MiB
from pytest_gpushare.workers import HOME_ENV, is_local, worker_env

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
UUIDS = ["GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from fake_pynvml import FakeGpu, FakeNvml

GiB = 2**30
gpus = [
    FakeGpu(uuid={UUIDS[0]!r}, name="A", total=48 * GiB, bus_id="00000000:01:00.0"),
    FakeGpu(uuid={UUIDS[1]!r}, name="B", total=48 * GiB, bus_id="00000000:02:00.0"),
]
sys.modules["pynvml"] = FakeNvml(gpus=gpus).module
"""

SUITE = """
import json, os, pytest

@pytest.mark.parametrize("i", range(8))
@pytest.mark.gpu(mem="1GiB")
def test_where(gpu, i):
    path = os.path.join(os.path.dirname(__file__), f"seen-{os.environ['PYTEST_XDIST_WORKER']}-{i}.json")
    with open(path, "w") as f:
        json.dump({"cvd": os.environ["CUDA_VISIBLE_DEVICES"], "order": os.environ["CUDA_DEVICE_ORDER"],
                   "device": gpu.device, "uuid": gpu.uuid}, f)
"""


@pytest.fixture
def box(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_where=SUITE)
    return pytester


def seen(pytester: pytest.Pytester) -> list[dict[str, str]]:
    return [json.loads(p.read_text()) for p in sorted(pytester.path.glob("seen-*.json"))]


def test_each_worker_sees_its_home_gpu_first_by_uuid(box: pytest.Pytester) -> None:
    result = box.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    views = seen(box)
    homes = {v["cvd"].split(",")[0] for v in views}
    assert homes == set(UUIDS)  # two workers, spread over both GPUs
    for v in views:
        home, other = v["cvd"].split(",")
        assert {home, other} == set(UUIDS)
        assert v["order"] == "PCI_BUS_ID"
        # a test that takes `gpu` is leased on its home GPU when it can serve it: cuda:0
        assert (v["device"], v["uuid"]) == ("cuda:0", home)


def test_inherited_cuda_visible_devices_is_respected(
    box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # only the second GPU, by index
    result = box.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*GPU 0 B (GPU-bbbbbbbb-*): total 48.0GiB*"])
    for v in seen(box):
        assert v["cvd"] == UUIDS[1]
        assert (v["device"], v["uuid"]) == ("cuda:0", UUIDS[1])


def test_worker_env_lists_real_gpus_home_first_and_leaves_simulated_alone() -> None:
    budget = Budget(GiB, 3 * GiB, 512 * MiB)
    inv = SimulatedProbe("2x24GiB").probe()
    simulated = make_plan(inv, budget)
    env = worker_env(simulated, inv.gpus[1].uuid)
    assert env == {HOME_ENV: inv.gpus[1].uuid}  # a made-up UUID must not hide a real GPU


# --- MIG: a process sees at most one MIG instance ----------------------------------------------

MIG = ["MIG-11111111-0000-0000-0000-000000000000", "MIG-22222222-0000-0000-0000-000000000000"]
WHOLE = "GPU-cccccccc-0000-0000-0000-000000000000"

MIG_CONFTEST = f"""
import json, os, sys
sys.path.insert(0, {str(TESTS)!r})
from fake_pynvml import FakeGpu, FakeMig, FakeNvml

GiB = 2**30
a100 = FakeGpu(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000", name="NVIDIA A100-SXM4-80GB",
               total=80 * GiB, bus_id="00000000:01:00.0",
               mig=[FakeMig({MIG[0]!r}, total=20 * GiB, gpu_instance_id=1),
                    FakeMig({MIG[1]!r}, total=20 * GiB, gpu_instance_id=2)])
gpus = [a100]
if os.environ.get("WITH_WHOLE_GPU"):
    gpus.append(FakeGpu(uuid={WHOLE!r}, total=20 * GiB, bus_id="00000000:02:00.0"))
sys.modules["pynvml"] = FakeNvml(gpus=gpus).module
"""

MIG_SUITE = """
import json, os, pytest

def _record(name, gpus):
    path = os.path.join(os.path.dirname(__file__), f"seen-{name}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "devices": [g.device for g in gpus],
                   "uuids": [g.uuid for g in gpus]}, f)

@pytest.mark.parametrize("i", range(3))
@pytest.mark.gpu(mem="1GiB")
def test_one(gpu, i):
    _record(f"one{i}", [gpu])

@pytest.mark.gpu(mem="1GiB", count=2)
def test_two(gpus):
    _record("two", gpus)
"""


@pytest.fixture
def mig_box(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    for key in [k for k in os.environ if k.startswith(("CUDA_", "PYTEST_XDIST_", "GPUSHARE_SIMULATE"))]:
        monkeypatch.delenv(key)
    pytester.makeconftest(MIG_CONFTEST)
    pytester.makepyfile(test_mig=MIG_SUITE)
    return pytester


def test_a_single_process_on_mig_never_gets_two_instances(mig_box: pytest.Pytester) -> None:
    result = mig_box.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=3, skipped=1)  # one MIG instance can be used: count=2 never fits
    result.stdout.fnmatch_lines(["SKIPPED * test_mig.py::test_two needs 2 GPUs, but only 1 can serve it*"])
    for v in seen(mig_box):
        assert (v["devices"], v["uuids"]) == (["cuda:0"], [MIG[0]])


def test_a_worker_whose_home_is_a_mig_instance_sees_only_it(
    mig_box: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WITH_WHOLE_GPU", "1")
    result = mig_box.runpytest_subprocess("-p", "no:cacheprovider", "-n", "3", "-rs")
    result.stdout.fnmatch_lines(
        [
            "gpushare: workers pinned by CUDA_VISIBLE_DEVICES, home GPU first as cuda:0: "
            "gw0 GPU 0 only; gw1 GPU 1 only; gw2 GPU 2 only",
        ]
    )
    views = seen(mig_box)
    for v in views:
        shown = v["cvd"].split(",")
        # a MIG home is listed alone, a whole GPU's list holds no MIG instance
        assert shown in ([MIG[0]], [MIG[1]], [WHOLE])
        assert v["devices"] == ["cuda:0"] and v["uuids"] == shown
    assert not [v for v in views if len(v["uuids"]) == 2]  # test_two never got two instances


def test_worker_env_lists_one_mig_instance_or_whole_gpus() -> None:
    budget = Budget(GiB, 3 * GiB, 512 * MiB)
    gpus = (
        Gpu(0, MIG[0], "A100 MIG 1g.10gb", 20 * GiB, 20 * GiB, 0),
        Gpu(1, MIG[1], "A100 MIG 1g.10gb", 20 * GiB, 20 * GiB, 0),
        Gpu(2, WHOLE, "L4", 24 * GiB, 24 * GiB, 0),
    )
    plan = make_plan(GpuInventory(gpus, "NVML"), budget)
    assert worker_env(plan, MIG[1])["CUDA_VISIBLE_DEVICES"] == MIG[1]
    assert worker_env(plan, WHOLE)["CUDA_VISIBLE_DEVICES"] == WHOLE
    assert cuda_ordinal(MIG[1], {"CUDA_VISIBLE_DEVICES": f"{MIG[0]},{MIG[1]}"}) is None
    assert cuda_ordinal(WHOLE, {"CUDA_VISIBLE_DEVICES": f"{MIG[0]},{WHOLE}"}) is None
    assert cuda_ordinal(WHOLE, {"CUDA_VISIBLE_DEVICES": f"{WHOLE},{MIG[0]}"}) == 0


# --- workers on other hosts (SPEC "Past one box") ---------------------------------------------


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("popen", True),
        (f"popen//python={sys.executable}", True),
        ("popen//id=w1//chdir=/tmp", True),
        ("ssh=gpu-box-2//python=python3", False),
        ("socket=10.0.0.7:8888", False),
        ("popen//via=proxy", False),
        ("vagrant_ssh=default", False),
    ],
)
def test_only_popen_workers_are_on_this_box(spec: str, local: bool) -> None:
    assert is_local(execnet.XSpec(spec)) is local


def test_a_worker_on_another_host_plans_there(pytester: pytest.Pytester, tmp_path: Path) -> None:
    # A worker reached through another gateway stands in for one on another host, whose box
    # differs (here: a probe that answers 8GiB in a worker, 24GiB in the controller): it gets no
    # home GPU and no plan from the controller, and plans (and leases) on what it sees.
    pytester.makeconftest(
        """
        from pytest_gpushare.gpus import SimulatedProbe

        def pytest_gpushare_probe(config):
            return SimulatedProbe("8GiB" if hasattr(config, "workerinput") else "24GiB").probe()
        """
    )
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.gpu(mem="2GiB")
        def test_leases_there(gpu):
            assert "GPUSHARE_HOME_GPU" not in os.environ
            assert gpu.mem == 2 * 2**30 and gpu.simulated
            assert gpu.total == 8 * 2**30  # the worker's box, not the controller's 24GiB
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--dist=load", "--px", "popen//id=proxy",
        "--tx", "popen//via=proxy",
        f"--gpushare-ledger-dir={tmp_path / 'ledger'}", "--gpushare-ollama=off", "--gpushare-report=report.json",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "report.json").read_text())
    assert [x["test_id"] for x in report["leases"]] == [
        "test_a_worker_on_another_host_plans_there.py::test_leases_there"
    ]
