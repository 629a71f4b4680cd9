"""The fake pynvml (tests/fake_pynvml.py) against the real binding it stands in for."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
from fake_pynvml import FakeGpu, install_fake_pynvml
from nvml_support import A, two_gpus

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
