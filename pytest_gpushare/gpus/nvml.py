"""NVML, through nvidia-ml-py's ``pynvml``: the GPUs of this box and each process's memory there.

The one module that touches ``pynvml``. It is imported, and NVML started, on first use,
never at import; NVML then stays open for the life of the process
(:mod:`~pytest_gpushare.gpus.nvml_lifetime`, which bounds how long a start may take). CUDA is
never touched.

- :class:`NvmlProbe` reads every GPU (or MIG device) with its memory and compute processes,
  in PCI bus order, as the inherited ``CUDA_VISIBLE_DEVICES`` leaves them visible.
- :func:`process_usage` reads one device's per-process list, by UUID, cheaply enough to be
  sampled every few milliseconds while a test runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.gpus.model import Gpu, GpuInventory, GpuProcess
from pytest_gpushare.gpus.nvml_lifetime import NVML_INIT_TIMEOUT_S, handles, with_nvml
from pytest_gpushare.gpus.visible import (
    FROM_ENVIRONMENT,
    FromEnvironment,
    PhysicalGpu,
    pid_exists,
    select_visible,
    visible_spec,
)
from pytest_gpushare.units import format_size

__all__ = ["FROM_ENVIRONMENT", "NVML_INIT_TIMEOUT_S", "NvmlProbe", "process_usage"]

# NVML return codes (nvml.h). They are part of the C ABI, so comparing with these numbers
# works with every nvidia-ml-py release, including ones that lack a newer constant.
_NVML_ERROR_INVALID_ARGUMENT: Final = 2
_NVML_ERROR_NOT_SUPPORTED: Final = 3
_NVML_ERROR_NO_PERMISSION: Final = 4
_NVML_ERROR_NOT_FOUND: Final = 6
_NVML_ERROR_DRIVER_NOT_LOADED: Final = 9
_NVML_ERROR_LIBRARY_NOT_FOUND: Final = 12
_NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
_NVML_ERROR_LIB_RM_VERSION_MISMATCH: Final = 18
_NVML_ERROR_ARGUMENT_VERSION_MISMATCH: Final = 25

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


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuShareError(f"pynvml (nvidia-ml-py) cannot be imported: {exc}") from None
    return pynvml


# --- NVML's words and the per-process list ------------------------------------------------------


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


def _refusals(nvml: Any) -> tuple[type[BaseException], type[BaseException]]:
    """What NVML raises when it refuses a call: its NVMLError, and pynvml's own
    NVMLLibraryMismatchError (not an NVMLError) for "function not found" on the unversioned
    process-list call."""
    return nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError)


def _process_list(nvml: Any, handle: Any) -> dict[int, int | None]:
    usage: dict[int, int | None] = {}
    for info in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        pid = int(info.pid)
        # pynvml turns NVML_VALUE_NOT_AVAILABLE into None.
        used_bytes = None if info.usedGpuMemory is None else int(info.usedGpuMemory)
        if pid in usage:
            # One process on several compute instances of a device is listed once per instance.
            before = usage[pid]
            used_bytes = None if before is None or used_bytes is None else before + used_bytes
        usage[pid] = used_bytes
    return usage


def process_usage(uuid: str) -> dict[int, int | None]:
    """Bytes each compute process uses on the GPU (or MIG device) ``uuid``, by host PID.

    None for a process whose figure NVML withholds (``usedGpuMemory`` unavailable); a process
    listed once per compute instance is summed. Raises :class:`GpuShareError` with NVML's own
    words when the list cannot be read, or when NVML's start hung (see ``NVML_INIT_TIMEOUT_S``).
    Starts NVML lazily, once per process; looks each UUID's handle up once per start of NVML.
    """
    nvml = _pynvml()

    def read(n: Any) -> dict[int, int | None]:
        handle = handles.get(uuid)
        if handle is None:
            handle = handles[uuid] = n.nvmlDeviceGetHandleByUUID(uuid)
        return _process_list(n, handle)

    try:
        return with_nvml(nvml, read)
    except nvml.NVMLError as exc:
        raise GpuShareError(_nvml_error_text(exc)) from None
    except _refusals(nvml) as exc:  # the library mismatch
        raise GpuShareError(f"this NVML library cannot list processes: {exc}") from None


# --- the probe -------------------------------------------------------------------------------

_NVML_DEVICE_MIG_ENABLE: Final = 1
# NVML's ways of saying "no" (not failures), each mapped to what it means here.
_MIG_OFF: Final = (0, 0)  # (current, pending) mode: a GPU without MIG support
_NO_MIG_MODE: Final = dict.fromkeys((_NVML_ERROR_NOT_SUPPORTED, _NVML_ERROR_FUNCTION_NOT_FOUND), _MIG_OFF)
_EMPTY_SLOT: Final = object()
# MIG slots are sparse: an empty one is "not found", not a failure.
_NO_MIG_DEVICE: Final = dict.fromkeys((_NVML_ERROR_NOT_FOUND, _NVML_ERROR_INVALID_ARGUMENT), _EMPTY_SLOT)
_ASK_V1: Final = object()
# Drivers before 510 lack the v2 memory call; MIG devices may refuse it.
_NO_MEMORY_V2: Final = dict.fromkeys(
    (_NVML_ERROR_NOT_SUPPORTED, _NVML_ERROR_FUNCTION_NOT_FOUND, _NVML_ERROR_ARGUMENT_VERSION_MISMATCH),
    _ASK_V1,
)


class _Reader:
    """One probe's pass over NVML: every call goes through :meth:`query`.

    ``unusable`` collects what could not be read, as ``"<what>: <NVML's words>"``; ``notes``
    what was read but had to be corrected (:func:`_sane_free`).
    """

    def __init__(self, nvml: Any, pid_exists: Callable[[int], bool]) -> None:
        self.nvml = nvml
        self.pid_exists = pid_exists
        self.unusable: list[str] = []
        self.notes: list[str] = []

    def query(
        self,
        func: Callable[..., Any],
        *args: Any,
        note: str | None = None,
        expected: Mapping[int, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``func(*args, **kwargs)``, or a default where NVML refuses (nvitop's ``nvmlQuery``).

        The one place where an NVML error becomes a value. A code in ``expected`` gives the
        value it maps to (NVML's way of saying "no"); any other error gives None, and with
        ``note`` the line ``"<note>: <NVML's words>"`` goes to ``unusable``.
        """
        try:
            return func(*args, **kwargs)
        except _refusals(self.nvml) as exc:
            code: Any = getattr(exc, "value", None)
            if expected is not None and code in expected:
                return expected[code]
            if note is not None:
                self.unusable.append(f"{note}: {_nvml_error_text(exc)}")
            return None

    def physical_gpu(self, i: int) -> PhysicalGpu | None:
        """GPU ``i`` with its devices (none where they cannot be read); None without UUID or PCI address."""
        nvml = self.nvml
        handle = self.query(nvml.nvmlDeviceGetHandleByIndex, i, note=f"GPU {i}")
        uuid = None if handle is None else self.query(nvml.nvmlDeviceGetUUID, handle, note=f"GPU {i}")
        if uuid is None:
            return None
        uuid = _text(uuid)
        label = f"GPU {i} ({uuid})"
        pci = self.query(nvml.nvmlDeviceGetPciInfo, handle, note=label)
        if pci is None:
            return None
        gpu = PhysicalGpu(uuid, (int(pci.domain), int(pci.bus), int(pci.device)), ())
        name = self.query(nvml.nvmlDeviceGetName, handle, note=label)
        if name is None:  # each failure is in ``unusable`` now: the GPU gives no device
            return gpu
        mig_mode = self.query(nvml.nvmlDeviceGetMigMode, handle, note=label, expected=_NO_MIG_MODE)
        if mig_mode is None:
            return gpu
        current_mode, _pending = mig_mode
        if int(current_mode) == _NVML_DEVICE_MIG_ENABLE:
            gpu.devices = self._mig_devices(gpu, handle, _text(name), label)
        else:
            device = self._device(handle, uuid, _text(name), note=label)
            gpu.devices = () if device is None else (device,)
        return gpu

    def _mig_devices(self, gpu: PhysicalGpu, handle: Any, parent_name: str, label: str) -> tuple[Gpu, ...]:
        """The MIG devices of ``gpu``; their instance ids go to ``gpu.mig_ids``."""
        nvml = self.nvml
        max_count = self.query(nvml.nvmlDeviceGetMaxMigDeviceCount, handle, note=label)
        if max_count is None:
            return ()
        devices: list[Gpu] = []
        slots = 0
        for m in range(int(max_count)):
            where = f"{label} MIG device {m}"
            mig = self.query(
                nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, m, note=where, expected=_NO_MIG_DEVICE
            )
            if mig is _EMPTY_SLOT:
                continue
            slots += 1
            mig_uuid = None if mig is None else self.query(nvml.nvmlDeviceGetUUID, mig, note=where)
            if mig_uuid is None:
                continue
            mig_uuid = _text(mig_uuid)
            device = self._device(
                mig, mig_uuid, self._mig_name(mig, parent_name), note=f"{where} ({mig_uuid})"
            )
            if device is None:
                continue
            devices.append(device)
            # Only the old MIG-GPU-<uuid>/<gi>/<ci> spelling needs these ids.
            gi = self.query(nvml.nvmlDeviceGetGpuInstanceId, mig)
            ci = None if gi is None else self.query(nvml.nvmlDeviceGetComputeInstanceId, mig)
            if ci is not None:
                gpu.mig_ids[mig_uuid] = (int(gi), int(ci))
        if not slots:
            self.unusable.append(f"{label}: MIG mode is enabled but the GPU has no MIG device")
        return tuple(devices)

    def _mig_name(self, mig: Any, parent_name: str) -> str:
        name = self.query(self.nvml.nvmlDeviceGetName, mig)
        if name is None:
            return f"{parent_name} MIG"
        name = _text(name)
        # NVML names MIG devices "<GPU name> MIG <profile>"; keep the GPU in sight if not.
        return name if "MIG" in name else f"{parent_name} MIG {name}"

    def _device(self, handle: Any, uuid: str, name: str, *, note: str) -> Gpu | None:
        """The device behind ``handle``; None (and a line in ``unusable``) without its memory."""
        memory = self._memory_bytes(handle, note)
        if memory is None:
            return None
        total_bytes, free_bytes, correction = memory
        if correction is not None:
            self.notes.append(f"{note}: {correction}")
        return Gpu(
            index=-1,
            uuid=uuid,
            name=name,
            total_bytes=total_bytes,
            free_bytes=free_bytes,
            used_bytes=total_bytes - free_bytes,
            processes=self._processes(handle),
        )

    def _memory_bytes(self, handle: Any, note: str) -> tuple[int, int, str | None] | None:
        """(total, free, correction) bytes: ``nvmlDeviceGetMemoryInfo`` v2 where the driver has it,
        else v1; free made possible by :func:`_sane_free`, which says why when it had to."""
        nvml = self.nvml
        v2 = getattr(nvml, "nvmlMemory_v2", None)
        info: Any = (
            _ASK_V1
            if v2 is None
            else self.query(
                nvml.nvmlDeviceGetMemoryInfo, handle, version=v2, note=note, expected=_NO_MEMORY_V2
            )
        )
        if info is _ASK_V1:
            info = self.query(nvml.nvmlDeviceGetMemoryInfo, handle, note=note)
        if info is None:
            return None
        total = int(info.total)
        # v1's used includes what the driver reserves; v2 reports that apart.
        taken = int(info.used) + int(getattr(info, "reserved", 0))
        return (total, *_sane_free(total, int(info.free), taken))

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...] | None:
        """The compute processes, or None where their figures cannot be matched to ours."""
        usage = self.query(_process_list, self.nvml, handle)
        if usage is None:
            return None
        processes = []
        for pid, used_bytes in usage.items():
            if used_bytes is None or not self.pid_exists(pid):
                return None
            processes.append(GpuProcess(pid=pid, used_bytes=used_bytes))
        return tuple(processes)


def _sane_free(total: int, free: int, taken: int) -> tuple[int, str | None]:
    """Free bytes no larger than ``total``, and what was corrected, or None when nothing was.

    Some drivers report more free memory than the GPU has (``2**64 - 1``: an unsigned -1). Then
    NVML's used figure (``taken``, reserved memory included) gives free where it is possible;
    else the whole GPU counts as used, the safe side. Either way no figure below the probe is
    impossible (a negative used would break the ledger's and the report's arithmetic).
    """
    if free <= total:
        return free, None
    said = f"NVML reported free {format_size(free)} of {format_size(total)}"
    if taken <= total:
        return total - taken, f"{said}; taken as total - used = {format_size(total - taken)}"
    return 0, f"{said} and used {format_size(taken)}; counted as full (the safe side)"


class NvmlProbe:
    """The GPUs of this box as NVML (nvidia-ml-py's ``pynvml``) reports them.

    ``pynvml`` is imported and NVML started on the first :meth:`probe`, never at import;
    NVML then stays open for the life of the process
    (:mod:`~pytest_gpushare.gpus.nvml_lifetime`). CUDA is never touched.

    - Devices are keyed by UUID and come in PCI bus order. A GPU in MIG mode gives its MIG
      devices (``MIG-...`` UUIDs, their own memory, names such as
      ``NVIDIA A100-SXM4-40GB MIG 1g.5gb``) instead of itself.
    - ``visible`` is the inherited ``CUDA_VISIBLE_DEVICES``: :data:`FROM_ENVIRONMENT` (the
      default) reads it at each probe, None means unset (every GPU), a string is applied
      as CUDA applies it (:func:`~pytest_gpushare.gpus.visible.select_visible`). GPUs that
      NVML cannot identify (no handle, UUID or PCI address) take no integer there.
    - ``Gpu.index`` is the position in the visible list.
    - Memory comes from ``nvmlDeviceGetMemoryInfo`` v2 where the driver has it, else v1;
      ``free`` is the same in both. ``used_bytes`` is ``total - free``, so it includes the
      memory the driver reserves (v2 reports that apart from ``used``). Free memory above the
      total is corrected, and said in the inventory's ``notes`` (:func:`_sane_free`).
    - ``nvmlInit`` may take ``init_timeout_s``; past it NVML counts as failed for the rest of the
      process, and later probes fail at once with the same words.
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
        visible: str | FromEnvironment | None = FROM_ENVIRONMENT,
        *,
        pid_exists: Callable[[int], bool] = pid_exists,
        init_timeout_s: float = NVML_INIT_TIMEOUT_S,
    ) -> None:
        self.visible = visible
        self._pid_exists = pid_exists
        self._init_timeout_s = init_timeout_s

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
            return with_nvml(nvml, self._read, self._init_timeout_s)
        except nvml.NVMLError as exc:
            return GpuInventory(gpus=(), source="NVML", error=_nvml_error_text(exc))
        except GpuShareError as exc:  # nvmlInit hung
            return GpuInventory(gpus=(), source="NVML", error=str(exc))

    def _read(self, nvml: Any) -> GpuInventory:
        spec = visible_spec(self.visible)
        reader = _Reader(nvml, self._pid_exists)
        driver = reader.query(nvml.nvmlSystemGetDriverVersion)
        details = [] if driver is None else [f"driver {_text(driver)}"]
        if spec is not None:
            details.append(f"CUDA_VISIBLE_DEVICES={spec!r}")
        source = f"NVML ({', '.join(details)})" if details else "NVML"
        # Without a device count there is nothing to read: that error is the probe's.
        count = nvml.nvmlDeviceGetCount()
        physical = [p for i in range(count) if (p := reader.physical_gpu(i)) is not None]
        physical.sort(key=lambda p: p.pci)
        gpus = tuple(replace(gpu, index=n) for n, gpu in enumerate(select_visible(spec, physical)))
        return GpuInventory(
            gpus=gpus, source=source, unusable=tuple(reader.unusable), notes=tuple(reader.notes)
        )
