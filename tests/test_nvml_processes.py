"""NVML's per-process figures: :func:`~pytest_gpushare.gpus.nvml.process_usage` (the sampler's
source) and the probe's process lists, through a faithful fake pynvml."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

import pytest
from fake_pynvml import (
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeMig,
    FakeNvml,
    install_fake_pynvml,
)
from nvml_support import M1, A, B, mig_box, probe

from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.gpus.model import GpuProcess
from pytest_gpushare.gpus.nvml import NvmlProbe, process_usage
from pytest_gpushare.units import GiB

PID = os.getpid()


# --- NVML per process (nvml.process_usage, the sampler's source) ------------------------------


def test_process_usage_reads_the_per_process_list_by_uuid(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake = fake_nvml([FakeGpu(A, processes=[(PID, 3 * GiB), (1, None)]), FakeGpu(B)])
    assert process_usage(A) == {PID: 3 * GiB, 1: None}
    assert process_usage(B) == {}
    assert fake.init_calls == 1


def test_process_usage_finds_mig_devices_and_sums_a_process_listed_twice(
    fake_nvml: Callable[..., FakeNvml],
) -> None:
    mig = FakeMig("MIG-11111111-2222-3333-4444-555555555555", processes=[(PID, GiB), (PID, 2 * GiB), (7, 1)])
    fake_nvml([FakeGpu(A, name="NVIDIA A100-SXM4-80GB", mig=[mig])])
    assert process_usage(mig.uuid) == {PID: 3 * GiB, 7: 1}
    mig.processes.append((7, None))
    assert process_usage(mig.uuid) == {PID: 3 * GiB, 7: None}


def test_process_usage_looks_each_handle_up_once(
    fake_nvml: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_nvml([FakeGpu(A, processes=[(PID, GiB)])])
    lookups: list[object] = []
    real_lookup = fake.module.nvmlDeviceGetHandleByUUID

    def counted_lookup(uuid: str) -> object:
        lookups.append(uuid)
        return real_lookup(uuid)

    monkeypatch.setattr(fake.module, "nvmlDeviceGetHandleByUUID", counted_lookup)
    for _ in range(5):
        process_usage(A)
    assert lookups == [A]


def test_process_usage_starts_nvml_again_after_someone_shut_it_down(
    fake_nvml: Callable[..., FakeNvml],
) -> None:
    fake = fake_nvml([FakeGpu(A, processes=[(PID, GiB)])])
    assert process_usage(A) == {PID: GiB}
    fake.drop_all_references()
    assert process_usage(A) == {PID: GiB}
    assert fake.init_calls == 2


def test_process_usage_errors_quote_nvml(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake_nvml([FakeGpu(A, fail={"nvmlDeviceGetComputeRunningProcesses_v3": NVML_ERROR_GPU_IS_LOST})])
    with pytest.raises(GpuShareError, match="GPU is lost"):
        process_usage(A)
    with pytest.raises(GpuShareError, match="Not Found"):
        process_usage(B)


def test_process_usage_without_a_driver_says_so(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake_nvml([FakeGpu(A)], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(GpuShareError, match="no NVIDIA driver is installed"):
        process_usage(A)
    fake_nvml(import_error=True)
    with pytest.raises(GpuShareError, match="cannot be imported"):
        process_usage(A)


def test_fake_handle_by_uuid_matches_the_real_binding(
    fake_nvml: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    real = importlib.import_module("pynvml")
    fake = fake_nvml().module
    for name in ("nvmlDeviceGetHandleByUUID", "nvmlDeviceGetComputeRunningProcesses"):
        assert list(inspect.signature(getattr(fake, name)).parameters) == list(
            inspect.signature(getattr(real, name)).parameters
        )


def test_the_probe_sums_a_process_listed_once_per_compute_instance(
    fake_nvml: Callable[..., FakeNvml],
) -> None:
    # One list reader serves the probe and process_usage: the planner credits a process once.
    mig = FakeMig("MIG-11111111-2222-3333-4444-555555555555", processes=[(PID, GiB), (PID, 2 * GiB)])
    fake_nvml([FakeGpu(A, name="NVIDIA A100-SXM4-80GB", mig=[mig])])
    (gpu,) = NvmlProbe(None).probe().gpus
    assert gpu.processes == (GpuProcess(PID, 3 * GiB),)


# --- the probe's per-process figures ---------------------------------------------------------


def test_process_figures_are_kept_when_every_pid_is_ours_to_see(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(A, used=3 * GiB, processes=[(101, 1 * GiB), (202, 2 * GiB)])
    install_fake_pynvml(monkeypatch, [gpu, FakeGpu(B, bus_id="00000000:02:00.0")])
    first, second = probe(pids=frozenset({101, 202})).gpus
    assert first.processes == (GpuProcess(101, 1 * GiB), GpuProcess(202, 2 * GiB))
    assert second.processes == ()


def test_process_figures_without_memory_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(A, processes=[(101, 1 * GiB), (202, None)])])
    assert probe().gpus[0].processes is None


def test_process_figures_with_foreign_pids_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    # A PID that is not a process here: NVML sees another PID namespace than ours.
    install_fake_pynvml(monkeypatch, [FakeGpu(A, processes=[(101, 1 * GiB), (4_000_001, 1 * GiB)])])
    assert probe(pids=frozenset({101})).gpus[0].processes is None


@pytest.mark.parametrize(
    "code", [NVML_ERROR_NO_PERMISSION, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND]
)
def test_process_figures_that_cannot_be_read_are_not_trusted(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    gpu = FakeGpu(A, processes=[(101, 1 * GiB)], fail={"nvmlDeviceGetComputeRunningProcesses_v3": code})
    install_fake_pynvml(monkeypatch, [gpu])
    inv = probe()
    assert inv.unusable == ()
    assert inv.gpus[0].processes is None


def test_mig_devices_have_their_own_process_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    box = mig_box()
    assert box[1].mig is not None
    box[1].mig[0].processes.append((303, 1 * GiB))
    install_fake_pynvml(monkeypatch, box)
    assert probe(M1).gpus[0].processes == (GpuProcess(303, 1 * GiB),)
