"""The GPU probes: NVML through a faithful fake pynvml, and simulated GPUs."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
from fake_pynvml import (
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeMig,
    install_fake_pynvml,
)

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus import GpuInventory, GpuProcess, SimulatedProbe, nvml, probe_for
from pytest_gpushare.gpus.nvml import NvmlProbe
from pytest_gpushare.gpus.simulated import parse_simulate
from pytest_gpushare.gpus.visible import FROM_ENVIRONMENT, pid_exists
from pytest_gpushare.units import GiB, MiB

A = "GPU-aaaaaaaa-1111-2222-3333-000000000001"
B = "GPU-bbbbbbbb-1111-2222-3333-000000000002"
C = "GPU-abcdef01-1111-2222-3333-000000000003"
M1 = "MIG-11111111-aaaa-bbbb-cccc-000000000001"
M2 = "MIG-22222222-aaaa-bbbb-cccc-000000000002"

ALL_PIDS = frozenset(range(1, 1 << 22))


def probe(visible: str | None = None, pids: frozenset[int] = ALL_PIDS) -> GpuInventory:
    return NvmlProbe(visible, pid_exists=pids.__contains__).probe()


def uuids(inventory: GpuInventory) -> list[str]:
    return [g.uuid for g in inventory.gpus]


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(A, name="NVIDIA GeForce RTX 4090", total=24 * GiB, used=2 * GiB, bus_id="00000000:01:00.0"),
        FakeGpu(B, name="NVIDIA RTX A6000", total=48 * GiB, used=0, bus_id="00000000:41:00.0"),
    ]


def mig_box() -> list[FakeGpu]:
    migs = [
        FakeMig(
            M1, name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=40 * GiB, used=1 * GiB, gpu_instance_id=1
        ),
        FakeMig(M2, name="NVIDIA A100-SXM4-80GB MIG 1g.10gb", total=10 * GiB, gpu_instance_id=9),
    ]
    return [
        FakeGpu(A, bus_id="00000000:01:00.0"),
        FakeGpu(B, name="NVIDIA A100-SXM4-80GB", total=80 * GiB, bus_id="00000000:81:00.0", mig=migs),
    ]


# --- reading the box -------------------------------------------------------------------------


def test_reads_every_gpu_with_its_memory_and_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    inv = probe()
    assert inv.error is None
    assert inv.unusable == ()
    assert inv.source == "NVML (driver 575.51.03)"
    first, second = inv.gpus
    assert (first.index, first.uuid, first.name) == (0, A, "NVIDIA GeForce RTX 4090")
    assert (first.total_bytes, first.free_bytes, first.used_bytes) == (24 * GiB, 22 * GiB, 2 * GiB)
    assert (second.index, second.uuid, second.total_bytes, second.free_bytes) == (1, B, 48 * GiB, 48 * GiB)
    assert not first.simulated


def test_orders_gpus_by_pci_bus_not_by_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(
        monkeypatch,
        [
            FakeGpu(B, bus_id="00000000:C1:00.0"),
            FakeGpu(C, bus_id="00000001:01:00.0"),
            FakeGpu(A, bus_id="00000000:3B:00.0"),
        ],
    )
    assert uuids(probe()) == [A, B, C]
    # Integer entries of CUDA_VISIBLE_DEVICES count in the same (PCI) order.
    assert uuids(probe("0")) == [A]


def test_no_gpu_is_an_empty_inventory_without_error(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [])
    inv = probe()
    assert (inv.gpus, inv.error, inv.unusable) == ((), None, ())


def test_memory_v2_counts_reserved_memory_as_used(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(A, total=24 * GiB, used=2 * GiB, reserved=512 * MiB)])
    (gpu,) = probe().gpus
    assert gpu.free_bytes == 24 * GiB - 2 * GiB - 512 * MiB
    assert gpu.used_bytes == gpu.total_bytes - gpu.free_bytes


@pytest.mark.parametrize(
    "code", [NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_ARGUMENT_VERSION_MISMATCH]
)
def test_memory_falls_back_to_v1_where_the_driver_lacks_v2(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    gpu = FakeGpu(
        A, total=16 * GiB, used=3 * GiB, reserved=256 * MiB, fail={"nvmlDeviceGetMemoryInfo_v2": code}
    )
    install_fake_pynvml(monkeypatch, [gpu])
    inv = probe()
    assert inv.unusable == ()
    assert inv.gpus[0].free_bytes == 16 * GiB - 3 * GiB - 256 * MiB
    # The fallback really is v1: when v1 fails too, the GPU cannot be read.
    gpu.fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_UNKNOWN
    assert probe().unusable == (f"GPU 0 ({A}): Unknown Error",)


def test_memory_v2_failing_for_another_reason_is_not_hidden_by_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(A, fail={"nvmlDeviceGetMemoryInfo_v2": NVML_ERROR_GPU_IS_LOST})
    install_fake_pynvml(monkeypatch, [gpu, FakeGpu(B, bus_id="00000000:02:00.0")])
    inv = probe()
    assert uuids(inv) == [B]
    assert inv.unusable == (f"GPU 0 ({A}): GPU is lost",)


def test_memory_uses_v1_with_a_pynvml_that_has_no_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(
        monkeypatch, [FakeGpu(A, fail={"nvmlDeviceGetMemoryInfo_v2": NVML_ERROR_UNKNOWN})]
    )
    monkeypatch.delattr(fake.module, "nvmlMemory_v2")
    assert uuids(probe()) == [A]


# --- MIG ---------------------------------------------------------------------------------------


def test_a_gpu_in_mig_mode_gives_its_mig_devices_instead_of_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, mig_box())
    inv = probe()
    assert uuids(inv) == [A, M1, M2]
    assert [g.index for g in inv.gpus] == [0, 1, 2]
    mig = inv.gpus[1]
    assert mig.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert (mig.total_bytes, mig.free_bytes, mig.used_bytes) == (40 * GiB, 39 * GiB, 1 * GiB)
    assert inv.unusable == ()


def test_a_mig_capable_gpu_with_mig_off_is_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(B, mig_mode=0, mig=[FakeMig(M1)])])
    assert uuids(probe()) == [B]


def test_mig_mode_without_mig_devices_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(B, mig=[])])
    inv = probe()
    assert inv.gpus == ()
    assert inv.unusable == (f"GPU 0 ({B}): MIG mode is enabled but the GPU has no MIG device",)


def test_a_mig_name_without_the_profile_keeps_the_gpu_name(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(B, name="NVIDIA H100", mig=[FakeMig(M1, name="1g.10gb")])])
    assert probe().gpus[0].name == "NVIDIA H100 MIG 1g.10gb"


def test_one_unreadable_mig_device_leaves_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    box = mig_box()
    assert box[1].mig is not None
    box[1].mig[0].fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_GPU_IS_LOST
    box[1].mig[0].fail["nvmlDeviceGetMemoryInfo_v2"] = NVML_ERROR_NOT_SUPPORTED
    install_fake_pynvml(monkeypatch, box)
    inv = probe()
    assert uuids(inv) == [A, M2]
    assert inv.unusable == (f"GPU 1 ({B}) MIG device 0 ({M1}): GPU is lost",)


# --- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(None, [A, B, C], id="unset: every GPU"),
        pytest.param("", [], id="empty: no GPU"),
        pytest.param("2,0", [C, A], id="indices in their order"),
        pytest.param(" 1", [B], id="index with leading space"),
        pytest.param("1gpu,+2", [B, C], id="indices read like strtoul"),
        pytest.param("-0", [A], id="minus zero is zero"),
        pytest.param("1,3,0", [B], id="index out of range hides the rest"),
        pytest.param("0,-1,1", [A], id="negative index hides the rest"),
        pytest.param("0,,1", [A], id="empty entry hides the rest"),
        pytest.param("0,1,0", [], id="a GPU named twice hides every GPU"),
        pytest.param(f"{B},{A}", [B, A], id="full UUIDs"),
        pytest.param("GPU-bb,GPU-ab", [B, C], id="unique UUID prefixes"),
        pytest.param("GPU-bb,GPU-a,GPU-aaaa", [B], id="ambiguous prefix hides the rest"),
        pytest.param("GPU-bb,GPU-ffff,GPU-aaaa", [B], id="unknown UUID hides the rest"),
        pytest.param(f"{B},0", [B], id="an index after UUIDs hides the rest"),
        pytest.param(f"0,{B}", [A], id="a UUID after indices hides the rest"),
        pytest.param(f"{A},{A[:12]}", [], id="one GPU named twice by UUID"),
        pytest.param("bbbbbbbb", [], id="a UUID without GPU- is no UUID"),
        pytest.param(f"{B} ", [], id="UUID with trailing space matches nothing"),
    ],
)
def test_cuda_visible_devices_is_applied_as_cuda_does(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, expected: list[str]
) -> None:
    install_fake_pynvml(
        monkeypatch,
        [FakeGpu(A), FakeGpu(B, bus_id="00000000:02:00.0"), FakeGpu(C, bus_id="00000000:03:00.0")],
    )
    inv = probe(visible)
    assert uuids(inv) == expected
    assert [g.index for g in inv.gpus] == list(range(len(expected)))


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(M2, [M2], id="MIG UUID"),
        pytest.param(f"{M2},{M1}", [M2, M1], id="MIG UUIDs in their order"),
        pytest.param("MIG-1111", [M1], id="MIG UUID prefix"),
        pytest.param(f"MIG-{B}/9/0", [M2], id="old MIG-GPU-uuid/gi/ci spelling"),
        pytest.param(f"MIG-{B}/5/0,{M1}", [], id="old spelling of a MIG device that does not exist"),
        pytest.param(f"{M1},{A}", [M1], id="a GPU UUID after MIG UUIDs hides the rest"),
        pytest.param("1", [M1, M2], id="index of a GPU in MIG mode gives its MIG devices"),
        pytest.param(B, [M1, M2], id="UUID of a GPU in MIG mode gives its MIG devices"),
        pytest.param(f"{M1},MIG-1", [], id="a MIG device named twice hides every GPU"),
    ],
)
def test_cuda_visible_devices_names_mig_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[str]
) -> None:
    install_fake_pynvml(monkeypatch, mig_box())
    assert uuids(probe(visible)) == expected


def test_cuda_visible_devices_is_read_from_the_environment_at_probe_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    nvml = NvmlProbe(pid_exists=ALL_PIDS.__contains__)
    assert nvml.visible is FROM_ENVIRONMENT
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    first = nvml.probe()
    assert uuids(first) == [B]
    assert first.gpus[0].index == 0
    assert first.source == "NVML (driver 575.51.03, CUDA_VISIBLE_DEVICES='1')"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert uuids(nvml.probe()) == [A, B]


def test_explicit_none_means_every_gpu_whatever_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert uuids(NvmlProbe(None).probe()) == [A, B]


# --- failures --------------------------------------------------------------------------------


def test_missing_pynvml_means_no_gpu_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus(), import_error=True)
    inv = probe()
    assert inv.gpus == ()
    assert inv.source == "NVML"
    assert inv.error is not None
    assert inv.error.startswith("pynvml (nvidia-ml-py) cannot be imported: ")


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found (libnvidia-ml.so.1 is missing"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded (the NVIDIA kernel module is not loaded)"),
        (
            NVML_ERROR_LIB_RM_VERSION_MISMATCH,
            "RM has detected an NVML/RM version mismatch. (driver/library version mismatch: ",
        ),
        (NVML_ERROR_NO_PERMISSION, "Insufficient Permissions (this account may not open"),
        (NVML_ERROR_UNKNOWN, "Unknown Error"),
    ],
)
def test_nvml_that_cannot_start_means_no_gpu_and_quotes_nvml(
    monkeypatch: pytest.MonkeyPatch, code: int, text: str
) -> None:
    install_fake_pynvml(monkeypatch, two_gpus(), init_error=code)
    inv = probe()
    assert inv.gpus == ()
    assert inv.source == "NVML"
    assert inv.error is not None
    assert inv.error.startswith(text)
    assert "\n" not in inv.error


def test_counting_gpus_failing_is_a_whole_box_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus(), fail={"nvmlDeviceGetCount_v2": NVML_ERROR_NO_PERMISSION})
    inv = probe()
    assert inv.gpus == ()
    assert inv.error is not None
    assert inv.error.startswith("Insufficient Permissions")


def test_a_lost_gpu_is_unusable_and_the_others_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [*two_gpus(), FakeGpu(C, bus_id="00000000:81:00.0")]
    gpus[0].fail["nvmlDeviceGetHandleByIndex_v2"] = NVML_ERROR_GPU_IS_LOST
    gpus[2].fail["nvmlDeviceGetName"] = NVML_ERROR_GPU_IS_LOST
    install_fake_pynvml(monkeypatch, gpus)
    inv = probe()
    assert inv.error is None
    assert uuids(inv) == [B]
    assert inv.gpus[0].index == 0
    assert inv.unusable == ("GPU 0: GPU is lost", f"GPU 2 ({C}): GPU is lost")


def test_an_unreadable_gpu_keeps_its_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA still counts a GPU whose memory NVML cannot read, so "1" stays the second GPU.
    gpus = two_gpus()
    gpus[0].fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_UNKNOWN
    gpus[0].fail["nvmlDeviceGetMemoryInfo_v2"] = NVML_ERROR_UNKNOWN
    install_fake_pynvml(monkeypatch, gpus)
    assert uuids(probe("1")) == [B]
    assert uuids(probe("0,1")) == [B]


def test_driver_version_failing_leaves_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus(), fail={"nvmlSystemGetDriverVersion": NVML_ERROR_UNKNOWN})
    inv = probe()
    assert inv.source == "NVML"
    assert uuids(inv) == [A, B]


def test_an_unexpected_exception_never_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())

    def broken(handle: object) -> str:
        raise RuntimeError("binding bug")

    monkeypatch.setattr(fake.module, "nvmlDeviceGetName", broken)
    inv = probe()
    assert inv.gpus == ()
    assert inv.error == "reading NVML failed: RuntimeError: binding bug"


# --- NVML's lifetime ---------------------------------------------------------------------------


def test_nvml_is_started_once_and_kept_open(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    assert fake.init_calls == 0
    probe()
    probe()
    assert (fake.init_calls, fake.shutdown_calls, fake.refcount) == (1, 0, 1)


def test_nvml_restarts_when_someone_else_shut_it_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    probe()
    fake.drop_all_references()
    assert uuids(probe()) == [A, B]
    assert fake.init_calls == 2


def test_a_failed_start_is_tried_again_on_the_next_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus(), init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    assert probe().error is not None
    fake.init_error = None
    assert uuids(probe()) == [A, B]


def test_shutdown_at_exit_releases_our_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    probe()
    nvml._shutdown_nvml()
    assert (fake.shutdown_calls, fake.refcount) == (1, 0)
    nvml._shutdown_nvml()
    assert fake.shutdown_calls == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    probe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        ok = nvml._nvml_started is None and uuids(probe()) == [A, B] and fake.init_calls == 2
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fake.init_calls == 1
    assert nvml._nvml_started is fake.module


def test_importing_devices_does_not_import_pynvml() -> None:
    code = "import sys, pytest_gpushare.gpus.model; print('pynvml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- per-process figures -----------------------------------------------------------------------


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


def test_the_default_pid_check_sees_this_process_and_not_an_unused_pid() -> None:
    assert pid_exists(os.getpid())
    assert not pid_exists(2**31 - 1)


def test_an_nvml_inventory_survives_the_round_trip_through_a_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(A, processes=[(1, GiB)]), FakeGpu(B, processes=[(1, None)])])
    inv = probe()
    assert inv.gpus[1].processes is None
    assert GpuInventory.from_dict(inv.to_dict()) == inv


# --- simulated GPUs ----------------------------------------------------------------------------


def test_simulate_spec_gives_totals_used_and_names() -> None:
    inv = SimulatedProbe("24GiB:used=2GiB,2x16GiB:name=RTX 4080").probe()
    assert [(g.index, g.total_bytes, g.used_bytes, g.free_bytes, g.name) for g in inv.gpus] == [
        (0, 24 * GiB, 2 * GiB, 22 * GiB, "Simulated GPU"),
        (1, 16 * GiB, 0, 16 * GiB, "RTX 4080"),
        (2, 16 * GiB, 0, 16 * GiB, "RTX 4080"),
    ]
    assert all(g.simulated and g.processes == () for g in inv.gpus)
    assert inv.source == "simulated (24GiB:used=2GiB,2x16GiB:name=RTX 4080)"


def test_simulated_uuids_are_stable_and_distinct_per_position() -> None:
    first = SimulatedProbe("2x80GiB").probe()
    again = SimulatedProbe("2x80GiB").probe()
    assert uuids(first) == uuids(again)
    assert len(set(uuids(first))) == 2
    assert all(u.startswith("GPU-") and len(u) == len(A) for u in uuids(first))
    assert uuids(SimulatedProbe("80GiB").probe())[0] == uuids(first)[0]


def test_simulate_none_is_no_gpu() -> None:
    inv = SimulatedProbe("None").probe()
    assert inv.gpus == ()
    assert inv.error is None
    assert "none" in inv.source


@pytest.mark.parametrize(
    "spec",
    ["", "24GiB,", "0GiB", "-4GiB", "lots", "0x24GiB", "24GiB:used=30GiB", "24GiB:color=red", "24GiB:used"],
)
def test_a_bad_simulate_spec_names_its_source(spec: str) -> None:
    with pytest.raises(SettingError, match=r"^GPUSHARE_SIMULATE: "):
        parse_simulate(spec, "GPUSHARE_SIMULATE")


def test_probe_for_picks_nvml_or_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    assert isinstance(probe_for(None), NvmlProbe)
    assert uuids(probe_for(None).probe()) == [A, B]
    assert probe_for("none").probe().gpus == ()
    assert [g.total_bytes for g in probe_for("2x8GiB").probe().gpus] == [8 * GiB, 8 * GiB]
    with pytest.raises(SettingError, match=r"^--gpushare-simulate: "):
        probe_for("8XB")
    with pytest.raises(SettingError, match=r"^gpushare_simulate in pytest.ini: "):
        probe_for("", source="gpushare_simulate in pytest.ini")


# --- the fake against the real binding ---------------------------------------------------------

USED_FUNCTIONS = [
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
]


def test_fake_pynvml_matches_the_real_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    real = importlib.import_module("pynvml")
    fake = install_fake_pynvml(monkeypatch).module
    for name in USED_FUNCTIONS:
        real_params = list(inspect.signature(getattr(real, name)).parameters)
        assert list(inspect.signature(getattr(fake, name)).parameters) == real_params, name
    codes = [n for n in dir(real) if n.startswith("NVML_ERROR_")]
    assert codes == [n for n in dir(fake) if n.startswith("NVML_ERROR_")]
    for code_name in codes:
        value = getattr(real, code_name)
        assert getattr(fake, code_name) == value
        real_err, fake_err = real.NVMLError(value), fake.NVMLError(value)
        assert type(real_err).__name__ == type(fake_err).__name__
        assert fake_err.value == real_err.value == value
        assert isinstance(fake_err, fake.NVMLError)
        if value in real.NVMLError._errcode_to_string:
            assert str(fake_err) == str(real_err)
        # The subclasses are raised bare, too (NVMLError_GpuIsLost()), as pynvml allows.
        assert getattr(fake, type(fake_err).__name__)().value == value
    assert fake.nvmlMemory_v2 == real.nvmlMemory_v2
    assert fake.NVML_DEVICE_MIG_ENABLE == real.NVML_DEVICE_MIG_ENABLE
    for struct in ("c_nvmlMemory_t", "c_nvmlMemory_v2_t", "nvmlPciInfo_t"):
        assert [f[0] for f in getattr(fake, struct)._fields_] == [
            f[0] for f in getattr(real, struct)._fields_
        ]
    process_fields = [f[0] for f in real.c_nvmlProcessInfo_t._fields_]
    box = install_fake_pynvml(monkeypatch, [FakeGpu(A, processes=[(1, 2)])]).module
    box.nvmlInit()
    (entry,) = box.nvmlDeviceGetComputeRunningProcesses(box.nvmlDeviceGetHandleByIndex(0))
    assert sorted(vars(entry)) == sorted(process_fields)
    assert not issubclass(fake.NVMLLibraryMismatchError, fake.NVMLError)
    assert not issubclass(real.NVMLLibraryMismatchError, real.NVMLError)


def test_fake_pynvml_refuses_calls_before_nvml_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus()).module
    with pytest.raises(fake.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
