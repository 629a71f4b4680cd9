"""Declared against observed, end to end: real ``pytest -n 2`` on a fake NVML box.

The suite's conftest installs the fake ``pynvml`` (tests/fake_pynvml.py) in the controller and
in every worker; a test "uses" memory by writing a file named after its PID, which the fake's
per-process list reads. Nothing is simulated on the plugin's side: the NVML probe, the worker
devices, the sampler and the report run as they would on a real box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from pytest_gpushare.ledger import read_status

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
UUID = "GPU-0f0f0f0f-1111-2222-3333-444455556666"

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from usage_box import GiB, install, use, wait_for_samples

box = install({UUID!r}, total=24 * GiB, used=2 * GiB)
"""

SUITE = f"""
import os
import subprocess
import sys
import time
import pytest
from conftest import GiB, use, wait_for_samples

CONTEXT = 300 * 2**20

@pytest.mark.gpu(mem="1GiB")
def test_liar(gpu):
    assert os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0] == {UUID!r}
    assert gpu.device == "cuda:0" and gpu.uuid == {UUID!r}
    use(CONTEXT + 3 * GiB)
    wait_for_samples()
    use(CONTEXT)

@pytest.mark.gpu(mem="2GiB")
def test_honest(gpu):
    use(CONTEXT + GiB)
    wait_for_samples()
    use(CONTEXT)

@pytest.mark.gpu(mem="8GiB")
def test_generous(gpu):
    use(CONTEXT + 512 * 2**20)
    wait_for_samples()
    use(CONTEXT)
"""


@pytest.fixture
def box(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    usage = tmp_path / "usage"
    usage.mkdir()
    monkeypatch.setenv("USAGE_DIR", str(usage))
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return usage


def test_over_users_are_flagged_with_a_suggestion(pytester: pytest.Pytester, box: Path) -> None:
    result = pytester.runpytest_subprocess(
        "-n", "2", "--gpushare-observe-interval=0.005", "--gpushare-report=report.json", timeout=120
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "gpushare: VRAM analysis (source: NVML (driver 575.51.03))",
            "*GPU 0 NVIDIA GeForce RTX 4090 (GPU-0f0f0f0f-*): total 24.0GiB, free 22.0GiB*",
            "tests that used more than they declared (suggested mem= in brackets):",
            '  3.0x test_suite.py::test_liar: declared 1.0GiB, peak 3.0GiB (nvml) [mem="4.0GiB"]',
            "tests that declared far more than they used (hint):",
            '  test_suite.py::test_generous: declared 8.0GiB, peak 512.0MiB [mem="768.0MiB"]',
        ]
    )
    assert "test_honest" not in result.stdout.str().split("gpushare ---")[-1]
    report = json.loads((pytester.path / "report.json").read_text())
    rows = {r["test_id"]: r for r in report["observed"]}
    assert rows["test_suite.py::test_liar"]["observed_bytes"] == 3 * 2**30  # the context is not the test's
    assert rows["test_suite.py::test_honest"]["verdict"] == "ok"

    # The next run sizes -n auto's worker budget from what this one observed.
    plan = pytester.run(sys.executable, "-m", "pytest_gpushare", "plan", timeout=120)
    assert plan.ret == 0
    plan.stdout.fnmatch_lines(
        [
            "*workers: 2 (floor(21.0GiB / 4.0GiB) = 5; xdist's own count 2; bound by xdist's own count)",
            "*note: worker mem 95th percentile of 3 tests' observed peaks 3.0GiB*",
        ]
    )


def test_without_per_process_figures_it_says_not_measurable(
    pytester: pytest.Pytester, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PID namespace we cannot see into: NVML lists PIDs that do not exist here.
    monkeypatch.setenv("PID_OFFSET", str(2**22))
    result = pytester.runpytest_subprocess("-n", "2", "--gpushare-report=report.json", timeout=120)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["observed VRAM: not measurable for 3 GPU test(s)"])
    report = json.loads((pytester.path / "report.json").read_text())
    assert {r["verdict"] for r in report["observed"]} == {"not measurable"}
    assert all(r["observed_bytes"] is None for r in report["observed"])
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None  # the controller's own env stays untouched


STRANGER_CONFTEST = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
from fake_pynvml import FakeGpu, FakeNvml

class StrangerGpu(FakeGpu):
    # What strangers use comes from a file the outer test rewrites while the session runs.
    @property
    def used(self):
        with open(os.environ["STRANGER_FILE"]) as f:
            return int(f.read())

    @used.setter
    def used(self, value):
        pass

sys.modules["pynvml"] = FakeNvml(gpus=[StrangerGpu(uuid={UUID!r}, total=24 * 2**30)]).module
"""


def test_a_test_waits_for_strangers_to_leave_then_runs(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = tmp_path / "stranger"
    stranger.write_text(str(22 * 2**30))
    ledger = tmp_path / "ledger"
    monkeypatch.setenv("STRANGER_FILE", str(stranger))
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(ledger))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makeconftest(STRANGER_CONFTEST)
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='8GiB')\ndef test_big(gpu): pass\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "1", "--gpushare-timeout=60"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The test is not skipped (8GiB fits the GPU's capacity) but waits: strangers fill it.
        wait_until(
            lambda: any(g["waiters"] for g in read_status(str(ledger))["gpus"]),
            "the test to wait",
            timeout=60,
            proc=proc,
        )
        stranger.write_text(str(2 * 2**30))  # the stranger leaves
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "1 passed" in out
