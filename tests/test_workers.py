"""Worker devices: home GPUs and CUDA_VISIBLE_DEVICES of real ``pytest -n`` workers on a fake NVML box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_gpushare.gpus import SimulatedProbe
from pytest_gpushare.planner import Budget, make_plan
from pytest_gpushare.units import GiB, MiB
from pytest_gpushare.workers import HOME_ENV, worker_env

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
