"""A stand-in for nvidia-ml-py's ``pynvml`` module, so NVML code is tested without a GPU.

It copies what the real binding shows to its callers (checked against the installed
``pynvml.py`` by ``test_fake_pynvml.py::test_fake_pynvml_matches_the_real_binding``):

- the same function names and parameters for what ``pytest_gpushare.gpus.nvml`` calls;
- ctypes structures with the real field names (``c_nvmlMemory_t``, ``c_nvmlMemory_v2_t``,
  ``nvmlPciInfo_t``) and process entries as ``nvmlFriendlyObject`` with ``pid``,
  ``usedGpuMemory`` (None where NVML says "not available"), ``gpuInstanceId``,
  ``computeInstanceId``;
- ``NVMLError`` whose ``__new__`` maps the code to an ``NVMLError_*`` subclass built from
  the ``NVML_ERROR_*`` constants as pynvml builds them, ``.value`` the code, ``str()``
  pynvml's text ("RM has detected an NVML/RM version mismatch.", "GPU is lost", ...);
- ``NVMLLibraryMismatchError`` (not an NVMLError) from the unversioned
  ``nvmlDeviceGetComputeRunningProcesses`` when the library lacks the function;
- every call but ``nvmlInit`` fails with "Uninitialized" until NVML is started;
- ``nvmlDeviceGetHandleByUUID`` finds GPUs and MIG devices by UUID ("Not Found" otherwise).

A GPU's (or MIG device's) process list may change while a test runs: give it ``usage``, a
callable that returns the list at each read (``FakeNvml.process_reads`` counts the reads),
to drive a sampler through a schedule. Broken drivers: see ``FakeNvml.hang_init`` and ``FakeGpu.free``.
"""

from __future__ import annotations

import ctypes
import string
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

GiB = 2**30

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1
nvmlMemory_v2 = 0x02000028

# pynvml's own table; codes missing from it are asked from the library (nvmlErrorString).
_ERRCODE_TO_STRING = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_MEMORY: "Insufficient Memory",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}
# What libnvidia-ml's nvmlErrorString says for the rest (the ones the tests meet).
_LIBRARY_ERROR_STRING = {
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH: "Argument version mismatch",
    NVML_ERROR_GPU_NOT_FOUND: "GPU not found",
}


class _PrintableStructure(ctypes.Structure):
    """pynvml's base: string fields read back as ``str``, not ``bytes``."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        return value.decode() if isinstance(value, bytes) else value


class c_nvmlMemory_t(_PrintableStructure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class c_nvmlMemory_v2_t(_PrintableStructure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("total", ctypes.c_ulonglong),
        ("reserved", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class nvmlPciInfo_t(_PrintableStructure):
    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


class nvmlFriendlyObject:
    """pynvml's plain-attribute copy of a structure (what process lists are made of)."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key, value in dictionary.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return str(self.__dict__)


@dataclass
class FakeMig:
    """A MIG device of a :class:`FakeGpu` in MIG mode."""

    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    total: int = 10 * GiB
    used: int = 0
    gpu_instance_id: int = 1
    compute_instance_id: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    usage: Callable[[], list[tuple[int, int | None]]] | None = None
    fail: dict[str, int] = field(default_factory=dict)
    free: int | None = None


@dataclass
class FakeGpu:
    """One GPU of the fake box, in NVML index order.

    ``used`` is what contexts hold (v2's ``used``), ``reserved`` what the driver keeps
    (v2 reports it apart, v1 counts it in ``used``). ``mig=None`` is a GPU without MIG
    support; a list puts it in MIG mode with those devices (an empty list: MIG on, no
    device). ``mig_mode`` overrides the mode NVML reports (0: MIG-capable, MIG off).
    ``fail`` maps a C function name (``nvmlDeviceGetMemoryInfo_v2`` for the v2 call) to
    the NVML error code it returns for this GPU. ``usage``, when set, is called at each read
    of the process list and replaces ``processes`` (a list that changes over time). ``free``,
    when set, is the free memory NVML reports instead of ``total - reserved - used`` (a broken
    driver's figure; ``used`` and ``reserved`` are reported as they are).
    """

    uuid: str
    name: str = "NVIDIA GeForce RTX 4090"
    total: int = 24 * GiB
    used: int = 0
    reserved: int = 0
    bus_id: str = "00000000:01:00.0"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    usage: Callable[[], list[tuple[int, int | None]]] | None = None
    mig: list[FakeMig] | None = None
    mig_mode: int | None = None
    max_mig: int = 7
    fail: dict[str, int] = field(default_factory=dict)
    free: int | None = None


@dataclass
class _Handle:
    gpu: FakeGpu
    mig: FakeMig | None = None

    @property
    def fail(self) -> dict[str, int]:
        return self.mig.fail if self.mig is not None else self.gpu.fail


@dataclass
class FakeNvml:
    """The state behind one fake ``pynvml`` module; tests read the call counts. ``hang_init``
    makes ``nvmlInit`` wait for that event (a hung driver); set it at the end of the test."""

    gpus: list[FakeGpu]
    init_error: int | None = None
    hang_init: threading.Event | None = None
    driver_version: str = "575.51.03"
    fail: dict[str, int] = field(default_factory=dict)
    refcount: int = 0
    init_calls: int = 0
    shutdown_calls: int = 0
    process_reads: int = 0
    module: types.ModuleType = field(init=False)

    def __post_init__(self) -> None:
        self.module = _build_module(self)

    def drop_all_references(self) -> None:
        """What another library's extra ``nvmlShutdown`` does to everyone in the process."""
        self.refcount = 0


def _build_module(box: FakeNvml) -> types.ModuleType:
    mod = types.ModuleType("pynvml", "Fake pynvml (tests/fake_pynvml.py)")
    ns: dict[str, Any] = mod.__dict__
    ns.update({k: v for k, v in globals().items() if k.startswith(("NVML_", "nvmlMemory_"))})
    ns.update(
        c_nvmlMemory_t=c_nvmlMemory_t,
        c_nvmlMemory_v2_t=c_nvmlMemory_v2_t,
        nvmlPciInfo_t=nvmlPciInfo_t,
        nvmlFriendlyObject=nvmlFriendlyObject,
    )

    class NVMLError(Exception):
        _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}
        _errcode_to_string: ClassVar[dict[int, str]] = dict(_ERRCODE_TO_STRING)
        value: int

        def __new__(typ, value: int) -> NVMLError:
            if typ == NVMLError:
                typ = NVMLError._valClassMapping.get(value, typ)
            obj = Exception.__new__(typ)
            obj.value = value
            return obj

        def __str__(self) -> str:
            if self.value in NVMLError._errcode_to_string:
                return NVMLError._errcode_to_string[self.value]
            return _LIBRARY_ERROR_STRING.get(self.value, f"NVML Error with code {self.value}")

        def __eq__(self, other: object) -> bool:
            return self.value == getattr(other, "value", None)

        __hash__ = None  # type: ignore[assignment] # as in pynvml: __eq__ without __hash__

    class NVMLLibraryMismatchError(Exception):
        pass

    ns["NVMLError"] = NVMLError
    ns["NVMLLibraryMismatchError"] = NVMLLibraryMismatchError
    NVMLError.__module__ = "pynvml"
    for err_name in [k for k in ns if k.startswith("NVML_ERROR_")]:
        # As pynvml: NVML_ERROR_GPU_IS_LOST becomes NVMLError_GpuIsLost.
        class_name = "NVMLError_" + string.capwords(err_name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        err_val = ns[err_name]

        def new(typ: type[NVMLError], *args: Any, _val: int = err_val) -> NVMLError:
            return NVMLError.__new__(typ, _val)

        cls = type(class_name, (NVMLError,), {"__new__": new})
        cls.__module__ = "pynvml"
        ns[class_name] = cls
        NVMLError._valClassMapping[err_val] = cls

    def check(name: str, handle: _Handle | None = None) -> None:
        if box.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        code = box.fail.get(name)
        if code is None and handle is not None:
            code = handle.fail.get(name)
        if code is not None:
            raise NVMLError(code)

    def nvmlInit() -> None:
        box.init_calls += 1
        if box.hang_init is not None:
            box.hang_init.wait()
        if box.init_error is not None:
            raise NVMLError(box.init_error)
        box.refcount += 1

    def nvmlShutdown() -> None:
        box.shutdown_calls += 1
        check("nvmlShutdown")
        box.refcount -= 1

    def nvmlSystemGetDriverVersion() -> str:
        check("nvmlSystemGetDriverVersion")
        return box.driver_version

    def nvmlDeviceGetCount() -> int:
        check("nvmlDeviceGetCount_v2")
        return len(box.gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
        check("nvmlDeviceGetHandleByIndex_v2")
        if not 0 <= index < len(box.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(box.gpus[index])
        check("nvmlDeviceGetHandleByIndex_v2", handle)
        return handle

    def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
        check("nvmlDeviceGetHandleByUUID")
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in box.gpus:
            if gpu.uuid == wanted:
                return _Handle(gpu)
            for mig in gpu.mig or []:
                if mig.uuid == wanted:
                    return _Handle(gpu, mig)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(handle: _Handle) -> str:
        check("nvmlDeviceGetUUID", handle)
        return handle.mig.uuid if handle.mig else handle.gpu.uuid

    def nvmlDeviceGetName(handle: _Handle) -> str:
        check("nvmlDeviceGetName", handle)
        return handle.mig.name if handle.mig else handle.gpu.name

    def nvmlDeviceGetPciInfo(handle: _Handle) -> nvmlPciInfo_t:
        check("nvmlDeviceGetPciInfo_v3", handle)
        domain, bus, device = (int(part, 16) for part in handle.gpu.bus_id.replace(".", ":").split(":")[:3])
        info = nvmlPciInfo_t()
        info.domain, info.bus, info.device = domain, bus, device
        info.busId = f"{domain:08X}:{bus:02X}:{device:02X}.0".encode()
        info.busIdLegacy = f"{domain:04X}:{bus:02X}:{device:02X}.0".encode()
        return info

    def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> Any:
        total, used = (
            (handle.mig.total, handle.mig.used) if handle.mig else (handle.gpu.total, handle.gpu.used)
        )
        reserved = 0 if handle.mig else handle.gpu.reserved
        reported = (handle.mig or handle.gpu).free
        free = total - reserved - used if reported is None else reported
        if not version:
            check("nvmlDeviceGetMemoryInfo", handle)
            v1 = c_nvmlMemory_t()
            v1.total, v1.free, v1.used = total, free, used + reserved
            return v1
        check("nvmlDeviceGetMemoryInfo_v2", handle)
        if version != nvmlMemory_v2:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        v2 = c_nvmlMemory_v2_t()
        v2.version, v2.total, v2.reserved, v2.free, v2.used = version, total, reserved, free, used
        return v2

    def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[nvmlFriendlyObject]:
        try:
            check("nvmlDeviceGetComputeRunningProcesses_v3", handle)
        except ns["NVMLError_FunctionNotFound"] as exc:
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match"
            ) from exc
        source = handle.mig or handle.gpu
        box.process_reads += 1
        entries = source.usage() if source.usage is not None else source.processes
        gi, ci = (
            (handle.mig.gpu_instance_id, handle.mig.compute_instance_id) if handle.mig else (0xFFFFFFFF,) * 2
        )
        return [
            nvmlFriendlyObject(
                {"pid": pid, "usedGpuMemory": used, "gpuInstanceId": gi, "computeInstanceId": ci}
            )
            for pid, used in entries
        ]

    def nvmlDeviceGetMigMode(device: _Handle) -> list[int]:
        check("nvmlDeviceGetMigMode", device)
        if device.mig is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = device.gpu.mig_mode
        if mode is None:
            if device.gpu.mig is None:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            mode = NVML_DEVICE_MIG_ENABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(device: _Handle) -> int:
        check("nvmlDeviceGetMaxMigDeviceCount", device)
        if device.gpu.mig is None and device.gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return device.gpu.max_mig

    def nvmlDeviceGetMigDeviceHandleByIndex(device: _Handle, index: int) -> _Handle:
        check("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if not 0 <= index < device.gpu.max_mig:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        migs = device.gpu.mig or []
        if index >= len(migs):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return _Handle(device.gpu, migs[index])

    def mig_only(name: str, device: _Handle) -> FakeMig:
        check(name, device)
        if device.mig is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return device.mig

    def nvmlDeviceGetGpuInstanceId(device: _Handle) -> int:
        return mig_only("nvmlDeviceGetGpuInstanceId", device).gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(device: _Handle) -> int:
        return mig_only("nvmlDeviceGetComputeInstanceId", device).compute_instance_id

    # Every nvml* function defined above is the module's, as in pynvml.
    for name, fn in list(locals().items()):
        if name.startswith("nvml") and callable(fn):
            fn.__module__ = "pynvml"
            ns[name] = fn
    return mod


def install_fake_pynvml(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[FakeGpu] | None = None,
    *,
    init_error: int | None = None,
    import_error: bool = False,
    driver_version: str = "575.51.03",
    fail: dict[str, int] | None = None,
) -> FakeNvml:
    """Make ``import pynvml`` give a fake NVML box for the rest of the test.

    Each call builds a fresh module (fresh error classes too): one test's fake never leaks
    into the next.

    ``init_error`` makes ``nvmlInit`` fail with that NVML code (library not found, driver
    not loaded, version mismatch, ...); ``import_error`` makes the import itself fail, as
    where nvidia-ml-py is not installed; ``fail`` maps library-wide C function names
    (``nvmlDeviceGetCount_v2``, ``nvmlSystemGetDriverVersion``) to NVML error codes.
    """
    box = FakeNvml(
        gpus=list(gpus or []), init_error=init_error, driver_version=driver_version, fail=dict(fail or {})
    )
    # None in sys.modules makes ``import pynvml`` raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", None if import_error else box.module)
    return box
