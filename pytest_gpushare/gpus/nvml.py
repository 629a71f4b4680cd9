"""NVML, through nvidia-ml-py's ``pynvml``: the GPUs of this box and each process's memory there.

The one module that touches ``pynvml``. It is imported, and NVML started, on first use,
never at import; NVML then stays open for the life of the process. CUDA is never touched.

- :class:`NvmlProbe` reads every GPU (or MIG device) with its memory and compute processes,
  in PCI bus order, as the inherited ``CUDA_VISIBLE_DEVICES`` leaves them visible.
- :func:`process_usage` reads one device's per-process list, by UUID, cheaply enough to be
  sampled every few milliseconds while a test runs.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import os
import platform
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Final, TypeVar

from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.gpus.model import Gpu, GpuInventory, GpuProcess

__all__ = [
    "FROM_ENVIRONMENT",
    "NvmlProbe",
    "per_process_unavailable_reason",
    "pid_exists",
    "process_usage",
]

_T = TypeVar("_T")

# NVML return codes (nvml.h). They are part of the C ABI, so comparing with these numbers
# works with every nvidia-ml-py release, including ones that lack a newer constant.
_NVML_ERROR_UNINITIALIZED: Final = 1
_NVML_ERROR_INVALID_ARGUMENT: Final = 2
_NVML_ERROR_NOT_SUPPORTED: Final = 3
_NVML_ERROR_NO_PERMISSION: Final = 4
_NVML_ERROR_NOT_FOUND: Final = 6
_NVML_ERROR_DRIVER_NOT_LOADED: Final = 9
_NVML_ERROR_LIBRARY_NOT_FOUND: Final = 12
_NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
_NVML_ERROR_LIB_RM_VERSION_MISMATCH: Final = 18
_NVML_ERROR_ARGUMENT_VERSION_MISMATCH: Final = 25
_NVML_DEVICE_MIG_ENABLE: Final = 1

# What NVML's terse text means for someone reading the pytest header.
_NVML_HINTS: Final = {
    _NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 is missing: no NVIDIA driver is installed here",
    _NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel module is not loaded",
    _NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "driver/library version mismatch: the loaded kernel module and libnvidia-ml differ, "
        "usually after a driver upgrade; reboot or reload the nvidia kernel module"
    ),
    _NVML_ERROR_NO_PERMISSION: "this account may not open the GPU device files /dev/nvidia*",
}


class _FromEnvironment(enum.Enum):
    TOKEN = "CUDA_VISIBLE_DEVICES at probe time"


FROM_ENVIRONMENT: Final = _FromEnvironment.TOKEN
"""Default of ``NvmlProbe(visible=...)``: read ``CUDA_VISIBLE_DEVICES`` each time ``probe()`` runs."""


# --- NVML's lifetime -------------------------------------------------------------------------

# NVML is started once per process and kept open until exit, not once per probe: nvmlInit
# is reference counted inside the library (other users in the process are unaffected),
# and while one client holds it the driver keeps its per-GPU state loaded. Without
# persistence mode, every fresh start re-initialises each GPU, which takes seconds on big
# boxes, and the ledger polls free memory often. ``_nvml_started`` is the module through
# which we hold our one reference; a different module object (a test's fake) starts anew.
_nvml_lock = threading.Lock()
_nvml_started: ModuleType | None = None
# Device handles by UUID, valid for the current start only: nvmlDeviceGetHandleByUUID walks
# every device, and a sampler reads one device's processes every few milliseconds.
_handles: dict[str, Any] = {}


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuShareError(f"pynvml (nvidia-ml-py) cannot be imported: {exc}") from None
    return pynvml


def _start_nvml(nvml: ModuleType) -> None:
    global _nvml_started
    with _nvml_lock:
        if _nvml_started is not nvml:
            nvml.nvmlInit()
            _nvml_started = nvml
            _handles.clear()


def _forget_nvml() -> None:
    """Drop our claim without calling NVML, which someone else shut down under us."""
    global _nvml_started
    with _nvml_lock:
        _nvml_started = None


def _forget_nvml_in_child() -> None:
    global _nvml_lock, _nvml_started
    _nvml_started = None
    # The child may inherit the lock held by a thread that does not exist there.
    _nvml_lock = threading.Lock()


def _shutdown_nvml() -> None:
    global _nvml_started
    with _nvml_lock:
        nvml, _nvml_started = _nvml_started, None
    if nvml is not None:
        # At interpreter exit there is nobody left to tell.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


atexit.register(_shutdown_nvml)
if hasattr(os, "register_at_fork"):
    # NVML state does not survive fork reliably; a child starts its own reference.
    os.register_at_fork(after_in_child=_forget_nvml_in_child)


def _with_nvml(nvml: Any, read: Callable[[Any], _T]) -> _T:
    """Start NVML (once per process) and ``read(nvml)``; NVMLError propagates.

    When someone in this process called nvmlShutdown once too often, NVML is started again,
    once.
    """
    for attempt in (1, 2):
        try:
            _start_nvml(nvml)
            return read(nvml)
        except nvml.NVMLError as exc:
            if exc.value != _NVML_ERROR_UNINITIALIZED or attempt == 2:
                raise
            _forget_nvml()
    raise AssertionError("unreachable")  # pragma: no cover


# --- NVML's words and per-process figures ------------------------------------------------------


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is a process of our PID namespace, as ``/proc`` shows it.

    NVML lists host PIDs; one we cannot see means another PID namespace (or a ``/proc`` that
    hides other accounts' processes). Without ``/proc`` (not Linux) nothing can be matched,
    which leads to the safe side.
    """
    return os.path.exists(f"/proc/{pid}")


def per_process_unavailable_reason() -> str | None:
    """Why this platform gives no per-process GPU memory at all, else None.

    Under WSL2 the driver lists no per-process figures (or no processes), whatever the
    process does; an empty list there must not read as "uses nothing".
    """
    release = platform.uname().release.lower()
    if "microsoft" in release or "wsl" in release:
        return "WSL2 does not report per-process GPU memory"
    return None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_error_text(exc: BaseException) -> str:
    """NVML's own words for ``exc``, and what they mean where NVML is terse."""
    code = getattr(exc, "value", None)
    try:
        text = str(exc)
    except Exception:
        text = ""
    text = text or f"NVML error {code}"
    hint = _NVML_HINTS.get(code) if isinstance(code, int) else None
    return f"{text} ({hint})" if hint else text


def _list_mismatch(nvml: Any) -> type[BaseException]:
    # pynvml turns "function not found" for the unversioned process-list call into its own
    # NVMLLibraryMismatchError, which is not an NVMLError.
    mismatch: type[BaseException] = getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError)
    return mismatch


def _process_list(nvml: Any, handle: Any) -> dict[int, int | None]:
    usage: dict[int, int | None] = {}
    for info in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        pid = int(info.pid)
        # pynvml turns NVML_VALUE_NOT_AVAILABLE into None.
        used = None if info.usedGpuMemory is None else int(info.usedGpuMemory)
        if pid in usage:
            # One process on several compute instances of a device is listed once per instance.
            before = usage[pid]
            used = None if before is None or used is None else before + used
        usage[pid] = used
    return usage


def process_usage(uuid: str) -> dict[int, int | None]:
    """Bytes each compute process uses on the GPU (or MIG device) ``uuid``, by host PID.

    None for a process whose figure NVML withholds (``usedGpuMemory`` unavailable); a process
    listed once per compute instance is summed. Raises :class:`GpuShareError` with NVML's own
    words when the list cannot be read. Starts NVML lazily, once per process; looks each
    UUID's handle up once per start of NVML.
    """
    nvml = _pynvml()

    def read(n: Any) -> dict[int, int | None]:
        handle = _handles.get(uuid)
        if handle is None:
            handle = _handles[uuid] = n.nvmlDeviceGetHandleByUUID(uuid)
        return _process_list(n, handle)

    try:
        return _with_nvml(nvml, read)
    except nvml.NVMLError as exc:
        raise GpuShareError(_nvml_error_text(exc)) from None
    except _list_mismatch(nvml) as exc:
        raise GpuShareError(f"this NVML library cannot list processes: {exc}") from None


# --- the probe -------------------------------------------------------------------------------


@dataclass
class _Physical:
    """One physical GPU as CUDA_VISIBLE_DEVICES can name it, and the devices it gives."""

    uuid: str
    pci: tuple[int, int, int]
    devices: tuple[Gpu, ...]
    # (GPU instance id, compute instance id) of each MIG device, for ``MIG-GPU-<uuid>/gi/ci``.
    mig_ids: dict[str, tuple[int, int]] = field(default_factory=dict)


_ORDINAL_RE = re.compile(r"\s*([+-]?)(\d+)")
_OLD_MIG_RE = re.compile(r"MIG-(GPU-[^/]+)/(\d+)/(\d+)")


def _unique(matches: Sequence[Any]) -> Any | None:
    return matches[0] if len(matches) == 1 else None


def _resolve_entry(
    entry: str, kind: str, physical: Sequence[_Physical]
) -> tuple[str, tuple[Gpu, ...]] | None:
    """What one CUDA_VISIBLE_DEVICES entry names: a key for duplicates and its devices."""
    if kind == "GPU-":
        if not entry.startswith("GPU-"):
            return None
        gpu = _unique([p for p in physical if p.uuid.startswith(entry)])
        return None if gpu is None else (gpu.uuid, gpu.devices)
    if kind == "MIG-":
        if not entry.startswith("MIG-"):
            return None
        old = _OLD_MIG_RE.fullmatch(entry)
        if old:
            parent = _unique([p for p in physical if p.uuid.startswith(old.group(1))])
            if parent is None:
                return None
            ids = (int(old.group(2)), int(old.group(3)))
            dev = _unique([d for d in parent.devices if parent.mig_ids.get(d.uuid) == ids])
        else:
            dev = _unique([d for p in physical for d in p.devices if d.uuid.startswith(entry)])
        return None if dev is None else (dev.uuid, (dev,))
    match = _ORDINAL_RE.match(entry)
    if match is None or (match.group(1) == "-" and int(match.group(2)) != 0):
        return None
    ordinal = int(match.group(2))
    if ordinal >= len(physical):
        return None
    return physical[ordinal].uuid, physical[ordinal].devices


def _select_visible(spec: str | None, physical: Sequence[_Physical]) -> list[Gpu]:
    """The devices ``CUDA_VISIBLE_DEVICES=spec`` leaves visible, in its order.

    This follows CUDA as its documentation and PyTorch's model of it (``torch.cuda.
    _parse_visible_devices`` and its tests) describe it: unset shows every
    GPU, an empty value none; the list is of one kind, chosen by its first entry
    (integers, ``GPU-`` UUIDs or unique prefixes of them, ``MIG-`` UUIDs or
    ``MIG-GPU-<uuid>/<gi>/<ci>``); an integer is read like strtoul (``1gpu`` is 1, ``-0``
    is 0); the first invalid, ambiguous, out-of-range or other-kind entry hides itself and
    all after it; a GPU named twice hides every GPU.
    """
    if spec is None:
        return [dev for p in physical for dev in p.devices]
    entries = spec.split(",")
    kind = next((k for k in ("GPU-", "MIG-") if entries[0].startswith(k)), "")
    chosen: list[Gpu] = []
    seen: set[str] = set()
    for entry in entries:
        found = _resolve_entry(entry, kind, physical)
        if found is None:
            break
        key, devices = found
        if key in seen:
            return []
        seen.add(key)
        chosen.extend(devices)
    return chosen


class NvmlProbe:
    """The GPUs of this box as NVML (nvidia-ml-py's ``pynvml``) reports them.

    ``pynvml`` is imported and NVML started on the first :meth:`probe`, never at import;
    NVML then stays open for the life of the process (see ``_start_nvml``). CUDA is never
    touched.

    - Devices are keyed by UUID and come in PCI bus order. A GPU in MIG mode gives its MIG
      devices (``MIG-...`` UUIDs, their own memory, names such as
      ``NVIDIA A100-SXM4-40GB MIG 1g.5gb``) instead of itself.
    - ``visible`` is the inherited ``CUDA_VISIBLE_DEVICES``: :data:`FROM_ENVIRONMENT` (the
      default) reads it at each probe, None means unset (every GPU), a string is applied
      as CUDA applies it (see ``_select_visible``). Integer entries count GPUs in PCI bus
      order, which is CUDA's order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on a box
      with one GPU (CUDA's default, FASTEST_FIRST, may differ): prefer UUIDs. An integer or
      ``GPU-`` UUID that names a GPU in MIG mode gives all its MIG devices, although a
      CUDA process itself uses only one MIG device (give each worker one ``MIG-`` UUID). GPUs
      that NVML cannot identify (no handle, UUID or PCI address) take no integer.
    - ``Gpu.index`` is the position in the visible list.
    - Memory comes from ``nvmlDeviceGetMemoryInfo`` v2 where the driver has it, else v1;
      ``free`` is the same in both. ``used_bytes`` is ``total - free``, so it includes the
      memory the driver reserves (v2 reports that apart from ``used``).
    - ``processes`` lists compute processes only (graphics contexts stay inside ``used``,
      counted as strangers'), one entry per process (summed over compute instances). It is
      None where the figures cannot be matched to our processes: NVML withholds a process's
      memory (``usedGpuMemory`` None, as in WSL2 and some containers), the list cannot be
      read, or a PID it reports is not a process here (``pid_exists``: we run in another PID
      namespace than the driver sees, or ``/proc`` hides other accounts' processes).
    - Failures never raise: when NVML cannot be used at all the inventory is empty and
      ``error`` quotes NVML; a GPU that cannot be read goes to ``unusable`` and the others
      stay.
    """

    def __init__(
        self,
        visible: str | _FromEnvironment | None = FROM_ENVIRONMENT,
        *,
        pid_exists: Callable[[int], bool] = pid_exists,
    ) -> None:
        self.visible = visible
        self._pid_exists = pid_exists

    def probe(self) -> GpuInventory:
        try:
            return self._probe()
        except Exception as exc:  # the contract is "never raises"; say what broke instead
            return GpuInventory(
                gpus=(), source="NVML", error=f"reading NVML failed: {type(exc).__name__}: {exc}"
            )

    def _probe(self) -> GpuInventory:
        try:
            nvml = _pynvml()
        except GpuShareError as exc:
            return GpuInventory(gpus=(), source="NVML", error=str(exc))
        try:
            return _with_nvml(nvml, self._read)
        except nvml.NVMLError as exc:
            return GpuInventory(gpus=(), source="NVML", error=_nvml_error_text(exc))

    def _read(self, nvml: Any) -> GpuInventory:
        spec = (
            os.environ.get("CUDA_VISIBLE_DEVICES")
            if isinstance(self.visible, _FromEnvironment)
            else self.visible
        )
        try:
            details = [f"driver {_text(nvml.nvmlSystemGetDriverVersion())}"]
        except nvml.NVMLError:
            details = []
        if spec is not None:
            details.append(f"CUDA_VISIBLE_DEVICES={spec!r}")
        source = f"NVML ({', '.join(details)})" if details else "NVML"
        count = nvml.nvmlDeviceGetCount()
        unusable: list[str] = []
        physical = [p for i in range(count) if (p := self._read_gpu(nvml, i, unusable)) is not None]
        physical.sort(key=lambda p: p.pci)
        gpus = tuple(replace(gpu, index=n) for n, gpu in enumerate(_select_visible(spec, physical)))
        return GpuInventory(gpus=gpus, source=source, unusable=tuple(unusable))

    def _read_gpu(self, nvml: Any, i: int, unusable: list[str]) -> _Physical | None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            unusable.append(f"GPU {i}: {_nvml_error_text(exc)}")
            return None
        label = f"GPU {i} ({uuid})"
        try:
            pci = nvml.nvmlDeviceGetPciInfo(handle)
            bus = (int(pci.domain), int(pci.bus), int(pci.device))
        except nvml.NVMLError as exc:
            unusable.append(f"{label}: {_nvml_error_text(exc)}")
            return None
        try:
            name = _text(nvml.nvmlDeviceGetName(handle))
            if not self._mig_enabled(nvml, handle):
                return _Physical(uuid, bus, (self._device(nvml, handle, uuid, name),))
            max_mig = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
        except nvml.NVMLError as exc:
            unusable.append(f"{label}: {_nvml_error_text(exc)}")
            return _Physical(uuid, bus, ())
        gpu = _Physical(uuid, bus, ())
        devices: list[Gpu] = []
        slots = 0
        for m in range(max_mig):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, m)
            except nvml.NVMLError as exc:
                # MIG slots are sparse: an empty one is "not found", not a failure.
                if exc.value not in (_NVML_ERROR_NOT_FOUND, _NVML_ERROR_INVALID_ARGUMENT):
                    unusable.append(f"{label} MIG device {m}: {_nvml_error_text(exc)}")
                    slots += 1
                continue
            slots += 1
            try:
                mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
            except nvml.NVMLError as exc:
                unusable.append(f"{label} MIG device {m}: {_nvml_error_text(exc)}")
                continue
            try:
                devices.append(self._device(nvml, mig, mig_uuid, self._mig_name(nvml, mig, name)))
            except nvml.NVMLError as exc:
                unusable.append(f"{label} MIG device {m} ({mig_uuid}): {_nvml_error_text(exc)}")
                continue
            # Only the old MIG-GPU-<uuid>/<gi>/<ci> spelling needs these ids.
            with contextlib.suppress(nvml.NVMLError):
                gpu.mig_ids[mig_uuid] = (
                    int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
                    int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
                )
        if not slots:
            unusable.append(f"{label}: MIG mode is enabled but the GPU has no MIG device")
        gpu.devices = tuple(devices)
        return gpu

    @staticmethod
    def _mig_enabled(nvml: Any, handle: Any) -> bool:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError as exc:
            if exc.value in (_NVML_ERROR_NOT_SUPPORTED, _NVML_ERROR_FUNCTION_NOT_FOUND):
                return False
            raise
        return int(current) == _NVML_DEVICE_MIG_ENABLE

    @staticmethod
    def _mig_name(nvml: Any, mig: Any, parent_name: str) -> str:
        try:
            name = _text(nvml.nvmlDeviceGetName(mig))
        except nvml.NVMLError:
            return f"{parent_name} MIG"
        # NVML names MIG devices "<GPU name> MIG <profile>"; keep the GPU in sight if not.
        return name if "MIG" in name else f"{parent_name} MIG {name}"

    def _device(self, nvml: Any, handle: Any, uuid: str, name: str) -> Gpu:
        total, free = self._memory(nvml, handle)
        return Gpu(
            index=-1,
            uuid=uuid,
            name=name,
            total_bytes=total,
            free_bytes=free,
            used_bytes=total - free,
            processes=self._processes(nvml, handle),
        )

    @staticmethod
    def _memory(nvml: Any, handle: Any) -> tuple[int, int]:
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                return int(info.total), int(info.free)
            except nvml.NVMLError as exc:
                # Drivers before 510 lack the v2 call; MIG devices may refuse it.
                if exc.value not in (
                    _NVML_ERROR_NOT_SUPPORTED,
                    _NVML_ERROR_FUNCTION_NOT_FOUND,
                    _NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
                ):
                    raise
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)

    def _processes(self, nvml: Any, handle: Any) -> tuple[GpuProcess, ...] | None:
        try:
            usage = _process_list(nvml, handle)
        except (nvml.NVMLError, _list_mismatch(nvml)):
            return None
        processes = []
        for pid, used in usage.items():
            if used is None or not self._pid_exists(pid):
                return None
            processes.append(GpuProcess(pid=pid, used_bytes=used))
        return tuple(processes)
