"""The fleet recipe (examples/fleet, docs/howto/fleet.rst): a GitHub Actions matrix of GPU runners,
each running one pytest-split shard with pytest-gpushare planning on the runner's own box.

Here the workflow's own shard command runs once per matrix entry, each in its own copy of the
example (a runner's checkout) on its own simulated box with its own ledger folder, with the
workflow's environment.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from process_support import clean_env, run_command

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "examples" / "fleet"
WORKFLOW = FLEET / "gpu-fleet.yml"
#: The runners' boxes, by matrix group: a big GPU, and a small one where -n auto gives 1 worker.
BOXES = {1: "12GiB", 2: "8GiB:used=2GiB"}
GROUP = "${{ matrix.group }}"
WORKSPACE = "${{ github.workspace }}"


def _workflow() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="the test extras install pyyaml")
    document: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    return document


def _runs(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def _shard_command(job: dict[str, Any], group: int) -> list[str]:
    """The job's pytest command as the runner of matrix entry ``group`` runs it."""
    (command,) = [run for run in _runs(job) if run.startswith("pytest ") and "--splits" in run]
    assert f"--group {GROUP}" in command, command
    return shlex.split(command.replace(GROUP, str(group)))


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _collected(folder: Path, env: dict[str, str]) -> set[str]:
    proc = run_command(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=folder,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_workflow_is_a_matrix_of_shards() -> None:
    workflow = _workflow()
    job = workflow["jobs"]["gpu-tests"]
    groups = job["strategy"]["matrix"]["group"]
    args = _shard_command(job, groups[-1])
    assert groups == list(range(1, len(groups) + 1))
    assert _option(args, "--splits") == str(len(groups))
    assert _option(args, "--group") == str(groups[-1])
    assert _option(args, "-n") == "auto"  # each runner's own GPUs decide its worker count
    assert (FLEET / _option(args, "--durations-path")).is_file()
    assert job["strategy"]["fail-fast"] is False  # one broken runner does not cancel the others
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    assert job["env"]["GPUSHARE_FALLBACK"] == "fail"
    (install,) = [run for run in _runs(job) if "pip install" in run]
    assert "pytest-split" in install
    assert re.search(r'"pytest-gpushare @ git\+https://', install), install  # not on PyPI yet
    durations = workflow["jobs"]["durations"]
    store = [run for run in _runs(durations) if "--store-durations" in run]
    assert store and _option(shlex.split(store[0]), "--durations-path") == _option(args, "--durations-path")


def test_durations_name_every_test_of_the_example(tmp_path: Path) -> None:
    durations = json.loads((FLEET / ".test_durations").read_text(encoding="utf-8"))
    env = clean_env(GPUSHARE_LEDGER_DIR=str(tmp_path / "ledger"), GPUSHARE_OLLAMA="off")
    assert set(durations) == _collected(FLEET, env)
    assert all(isinstance(seconds, float) and seconds > 0 for seconds in durations.values())


@dataclass
class Shard:
    output: str
    test_ids: set[str]
    report: dict[str, Any]


def _run_shard(job: dict[str, Any], group: int, box: str, tmp_path: Path) -> Shard:
    """The workflow's shard command on one runner: its own checkout, box and ledger folder."""
    checkout = tmp_path / f"runner-{group}"
    shutil.copytree(FLEET, checkout, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    env = clean_env(
        **{name: str(value).replace(WORKSPACE, str(checkout)) for name, value in job["env"].items()},
        GPUSHARE_SIMULATE=box,
        GPUSHARE_LEDGER_DIR=str(tmp_path / f"box-{group}-ledgers"),
        GPUSHARE_OLLAMA="off",
        # xdist's own count, the same on every machine (and small on a 2-core CI box).
        PYTEST_XDIST_AUTO_NUM_WORKERS="2",
    )
    args = _shard_command(job, group)[1:]
    proc = run_command(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "--junitxml=shard.xml"],
        cwd=checkout,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout
    cases = ET.parse(checkout / "shard.xml").getroot().iter("testcase")
    test_ids = {f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}" for c in cases}
    report = json.loads((checkout / "gpushare-report.json").read_text(encoding="utf-8"))
    return Shard(proc.stdout, test_ids, report)


def test_two_shards_on_two_boxes_run_every_test_once(tmp_path: Path) -> None:
    pytest.importorskip("pytest_split", reason="the test extras install pytest-split")
    job = _workflow()["jobs"]["gpu-tests"]
    assert sorted(BOXES) == job["strategy"]["matrix"]["group"]
    shards = [_run_shard(job, group, box, tmp_path) for group, box in BOXES.items()]
    big, small = shards

    # Every test of the suite ran, on exactly one runner.
    everything = _collected(FLEET, clean_env(GPUSHARE_LEDGER_DIR=str(tmp_path / "collect")))
    assert big.test_ids and small.test_ids
    assert not big.test_ids & small.test_ids
    assert big.test_ids | small.test_ids == everything

    # Each shard planned on its own box: its header, its worker count, its GPUs' leases.
    assert "total 12.0GiB, free 12.0GiB" in big.output and "workers: 2 (" in big.output, big.output
    assert "total 8.0GiB, free 6.0GiB" in small.output and "workers: 1 (" in small.output, small.output
    inventories = [{g["uuid"] for g in s.report["plan"]["inventory"]["gpus"]} for s in shards]
    assert not inventories[0] & inventories[1]
    for shard, own in zip(shards, inventories, strict=True):
        leased = {gpu["uuid"] for lease in shard.report["leases"] for gpu in lease["gpus"]}
        assert leased and leased <= own
        assert {lease["test_id"] for lease in shard.report["leases"]} <= shard.test_ids
