"""The real-GPU kit's fixtures: one skip for every check, the box that runs the commands, the record.

Every check asks for ``hardware``. Where there is no NVIDIA GPU, or no torch that can use one,
each such check is skipped at setup with one reason, from one place (``pytest -ra`` shows a
single line). The record goes to the folder named by ``GPUKIT_OUT`` (``tests/gpu/run.sh`` sets
it), else to a temporary folder; it is written at the end of the session and shown in the
terminal summary.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .box import Box, Detection, clean_env, detect
from .facts import nvml_facts, software_line
from .kit import FAIL, Check, Record
from .readings import SmiGpu

OUT_ENV = "GPUKIT_OUT"
#: The order of the checks, and of their lines in the record: the box first, then what runs on it.
ORDER = ("test_real_nvml", "test_real_workers", "test_real_memory", "test_real_sharing", "test_real_examples")


@dataclass
class Kit:
    box: Box
    record: Record


@dataclass(frozen=True)
class Hardware:
    """The box the checks run on: nvidia-smi's GPUs (``gpu``: the one they use) and NVML's facts."""

    gpus: list[SmiGpu]
    nvml: dict[str, Any]

    @property
    def gpu(self) -> SmiGpu:
        return self.gpus[0]

    def nvml_gpu(self, uuid: str) -> dict[str, Any]:
        return next(g for g in self.nvml["gpus"] if g["uuid"] == uuid)


DETECTION = pytest.StashKey[Detection]()
KIT = pytest.StashKey[Kit]()
RECORD = pytest.StashKey[Record]()
CHECKS_BEFORE = pytest.StashKey[int]()


def _detection(config: pytest.Config) -> Detection:
    if DETECTION not in config.stash:
        config.stash[DETECTION] = detect(sys.executable, clean_env(os.environ))
    return config.stash[DETECTION]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Only the kit's own items move, within the places they hold (the hook sees every item).
    places = [i for i, item in enumerate(items) if item.path.stem in ORDER]
    ordered = sorted((items[i] for i in places), key=lambda item: ORDER.index(item.path.stem))
    for place, item in zip(places, ordered, strict=True):
        items[place] = item


def pytest_runtest_setup(item: pytest.Item) -> None:
    made = item.config.stash.get(KIT, None)
    item.stash[CHECKS_BEFORE] = len(made.record.checks) if made else 0
    if "hardware" in getattr(item, "fixturenames", ()):
        # Skipped here, not in the fixture: pytest shows a fixture's skip at each test's line.
        reason = _detection(item.config).reason
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    out = os.environ.get(OUT_ENV)
    box = Box(
        Path(out) if out else tmp_path_factory.mktemp("gpu-kit"), tmp_path_factory.mktemp("gpu-kit-work")
    )
    made = Kit(box, Record(machine=[software_line()]))
    request.config.stash[KIT] = made
    return made


@pytest.fixture(scope="session")
def box(kit: Kit) -> Box:
    return kit.box


@pytest.fixture(scope="session")
def record(kit: Kit) -> Record:
    return kit.record


@pytest.fixture(scope="session")
def hardware(request: pytest.FixtureRequest, kit: Kit) -> Hardware:
    """The real GPU (the tests that ask for it are skipped at setup where there is none)."""
    import pynvml

    found = _detection(request.config)
    for log, run in found.runs:
        kit.box.keep(run, log)
    kit.box.smi()  # the full table, for the record folder
    facts = nvml_facts(pynvml)
    gpu, torch = found.gpus[0], found.torch or {}
    kit.record.machine += [
        f"machine: {len(found.gpus)} GPU(s); {gpu.name} {gpu.uuid}, {gpu.total_mib}MiB, MIG {gpu.mig or 'n/a'}",
        f"driver: {facts['driver']} (nvidia-smi {gpu.driver}), NVML {facts['nvml']}, "
        f"CUDA driver API {facts['cuda_driver']}; torch {torch.get('version')} (CUDA {torch.get('cuda')})",
    ]
    return Hardware(found.gpus, facts)


# --- the record ----------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    made = item.config.stash.get(KIT, None)
    if made is not None and report.failed:
        # A check that failed before it wrote its line (an exception, a run that crashed).
        own = made.record.checks[item.stash.get(CHECKS_BEFORE, 0) :]
        if not any(c.status == FAIL for c in own):
            crash = getattr(report.longrepr, "reprcrash", None)
            why = crash.message.splitlines()[0] if crash is not None else str(report.longrepr)[-200:]
            made.record.add(Check(item.name, FAIL, f"{report.when}: {why}"))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    made, found, out = config.stash.get(KIT, None), config.stash.get(DETECTION, None), os.environ.get(OUT_ENV)
    if made is not None:
        made.box.finish(made.record)
        config.stash[RECORD] = made.record
    elif found is not None and found.reason is not None and out:
        skipped = Record(machine=[software_line()], skipped=found.reason)
        skipped.write(Path(out))
        config.stash[RECORD] = skipped


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # In the normal suite on a box without a GPU, the skip line of -ra says it all.
    done = config.stash.get(RECORD, None)
    if done is not None and (done.skipped is None or os.environ.get(OUT_ENV)):
        terminalreporter.section("gpu kit record")
        terminalreporter.write(done.render())
