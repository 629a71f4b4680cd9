"""NVML's probe, through a faithful fake pynvml: GPUs, MIG devices, failures, NVML's lifetime.

Per-process figures are in test_nvml_processes.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from nvml_support import M1, M2, A, B, C, mig_box, probe, two_gpus, uuids

from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.gpus import GpuInventory, nvml_lifetime
from pytest_gpushare.gpus.nvml import NvmlProbe, process_usage
from pytest_gpushare.units import GiB, MiB

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


@pytest.mark.parametrize(
    ("used", "reserved", "free", "note"),
    [
        # NVML's used figure is sane: free is what it leaves.
        (2 * GiB, 512 * MiB, 21 * GiB + 512 * MiB, "taken as total - used"),
        # Nothing is sane: the whole GPU counts as used, the safe side.
        (2**64 - 1, 0, 0, "counted as full"),
    ],
)
def test_free_above_total_is_corrected_once_and_said(
    monkeypatch: pytest.MonkeyPatch, used: int, reserved: int, free: int, note: str
) -> None:
    # A broken driver reports free = 2**64 - 1 (an unsigned -1); nothing downstream may see it.
    gpu = FakeGpu(A, total=24 * GiB, used=used, reserved=reserved, free=2**64 - 1)
    install_fake_pynvml(monkeypatch, [gpu, FakeGpu(B, bus_id="00000000:02:00.0")])
    inv = probe()
    first, second = inv.gpus
    assert (first.total_bytes, first.free_bytes, first.used_bytes) == (24 * GiB, free, 24 * GiB - free)
    assert second.free_bytes == second.total_bytes  # the sane GPU is untouched
    (line,) = inv.notes
    assert line.startswith(f"GPU 0 ({A}): NVML reported free 16777216.0TiB of 24.0GiB") and note in line
    assert GpuInventory.from_dict(inv.to_dict()) == inv


def test_free_above_total_from_memory_v1_uses_its_used(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(A, total=16 * GiB, used=3 * GiB, free=17 * GiB)
    gpu.fail["nvmlDeviceGetMemoryInfo_v2"] = NVML_ERROR_NOT_SUPPORTED
    install_fake_pynvml(monkeypatch, [gpu])
    (seen,) = probe().gpus
    assert (seen.free_bytes, seen.used_bytes) == (13 * GiB, 3 * GiB)


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


def test_a_hanging_start_is_bounded_and_not_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    fake.hang_init = threading.Event()
    try:
        started = time.monotonic()
        inv = NvmlProbe(init_timeout_s=0.2).probe()
        assert time.monotonic() - started < 5
        assert inv.gpus == ()
        assert inv.error == (
            "nvmlInit did not return within 0.2s (a hung driver or GPU?): "
            "NVML counts as failed for the rest of this process"
        )
        # Not a second wait: the probe and the per-process reads fail at once, with the same words.
        started = time.monotonic()
        assert NvmlProbe(init_timeout_s=60).probe().error == inv.error
        with pytest.raises(GpuShareError, match=r"^nvmlInit did not return within 0\.2s"):
            process_usage(A)
        assert time.monotonic() - started < 5
        assert fake.init_calls == 1
    finally:
        fake.hang_init.set()


def test_shutdown_at_exit_releases_our_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    probe()
    nvml_lifetime.shutdown()
    assert (fake.shutdown_calls, fake.refcount) == (1, 0)
    nvml_lifetime.shutdown()
    assert fake.shutdown_calls == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_pynvml(monkeypatch, two_gpus())
    probe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        ok = nvml_lifetime._nvml_started is None and uuids(probe()) == [A, B] and fake.init_calls == 2
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fake.init_calls == 1
    assert nvml_lifetime._nvml_started is fake.module


def test_importing_devices_does_not_import_pynvml() -> None:
    code = "import sys, pytest_gpushare.gpus.model; print('pynvml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_an_nvml_inventory_survives_the_round_trip_through_a_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, [FakeGpu(A, processes=[(1, GiB)]), FakeGpu(B, processes=[(1, None)])])
    inv = probe()
    assert inv.gpus[1].processes is None
    assert GpuInventory.from_dict(inv.to_dict()) == inv


# --- end to end --------------------------------------------------------------------------------

pytest_plugins = ["pytester"]

FREE_ABOVE_TOTAL = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fake_pynvml import FakeGpu, FakeNvml

box = FakeNvml(gpus=[FakeGpu({A!r}, total=24 * 2**30, used=2 * 2**30, free=2**64 - 1)])
sys.modules["pynvml"] = box.module
"""


def test_a_session_on_a_gpu_reporting_free_above_total_runs_and_says_so(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makeconftest(FREE_ABOVE_TOTAL)
    pytester.makepyfile(
        "import pytest\n"
        + "".join(f"@pytest.mark.gpu(mem='1GiB')\ndef test_{n}(gpu): pass\n" for n in range(4))
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            f"*note: GPU 0 ({A}): NVML reported free 16777216.0TiB of 24.0GiB; "
            "taken as total - used = 22.0GiB*",
            "*4 passed*",
        ]
    )
