"""A stand-in for the parts of ``torch`` that ``pytest_gpushare.observe`` and ``enforce`` touch.

It models what matters for measuring and capping a test without a GPU or torch installed:

- ``torch.cuda.is_initialized()`` and lazy initialisation: ``init()`` runs the calls queued by
  ``torch.cuda._lazy_call`` (as torch's ``_lazy_init`` does, with reentrant calls allowed);
- the caching allocator per device: ``allocate``/``free`` move the reserved and allocated
  bytes, ``empty_cache`` gives back what is reserved but unallocated, peaks are kept for
  ``reset_peak_memory_stats``/``max_memory_reserved``;
- ``set_per_process_memory_fraction`` caps what the allocator may reserve
  (``fraction * total``); an allocation past the cap or past the device raises
  ``torch.OutOfMemoryError`` with torch's own message text;
- calls that initialise CUDA in real torch (``reset_peak_memory_stats``,
  ``set_per_process_memory_fraction``, ``get_device_properties``, ``mem_get_info``, ...)
  are recorded in ``FakeTorch.violations`` when made before initialisation, so a test can
  prove the plugin never initialised CUDA.

Every call (but ``is_initialized``) is logged in ``FakeTorch.calls`` as ``(name, device)``.

:class:`FakeLease` is the lease those modules are given (what ``fixtures.GpuLease`` shows them).
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

GiB = 2**30
MiB = 2**20


def torch_size(n_bytes: int) -> str:
    """c10's ``format_size``: two decimals, binary units."""
    if n_bytes <= 1024:
        return f"{n_bytes} bytes"
    if n_bytes <= MiB:
        return f"{n_bytes / 1024:.2f} KiB"
    if n_bytes <= GiB:
        return f"{n_bytes / MiB:.2f} MiB"
    return f"{n_bytes / GiB:.2f} GiB"


@dataclass(frozen=True)
class FakeLease:
    """What ``fixtures.GpuLease`` shows ``observe.Watch`` and ``enforce.enforce``."""

    device: str = "cuda:0"
    uuid: str | None = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    mem: int = 4 * GiB
    is_cpu: bool = False
    simulated: bool = False


@dataclass
class FakeDevice:
    """One CUDA device of the fake process: its total, the allocator's state, its cap."""

    total: int = 24 * GiB
    allocated: int = 0
    reserved: int = 0
    peak_reserved: int = 0
    fraction: float = 1.0
    fraction_set: bool = False


@dataclass
class FakeTorch:
    """The state behind one fake ``torch`` module."""

    devices: dict[int, FakeDevice]
    initialized: bool = False
    has_fraction_getter: bool = True
    has_lazy_call: bool = True
    calls: list[tuple[str, object]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    queued: list[Any] = field(default_factory=list)
    module: types.ModuleType = field(init=False)
    _tls: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        self.module = _build_module(self)

    def index(self, device: object) -> int:
        if device is None:
            return 0
        if isinstance(device, int):
            return device
        text = str(device)
        if not text.startswith("cuda"):
            raise ValueError(f"Expected a cuda device, but got: {text}")
        return int(text.partition(":")[2] or 0)

    def init(self) -> None:
        """What torch's ``_lazy_init`` does: start CUDA, then run the queued calls."""
        if self.initialized or getattr(self._tls, "initializing", False):
            return
        self._tls.initializing = True
        try:
            for call in self.queued:
                call()
        finally:
            self._tls.initializing = False
        self.queued.clear()
        self.initialized = True

    def allocate(self, device: object, n_bytes: int) -> None:
        """A tensor of ``n_bytes`` on ``device`` (initialises CUDA, as a first tensor does)."""
        self.init()
        dev = self.devices[self.index(device)]
        free_cached = dev.reserved - dev.allocated
        grow = max(0, n_bytes - free_cached)
        limit = int(dev.fraction * dev.total) if dev.fraction_set else dev.total
        if dev.reserved + grow > limit:
            allowed = f"{torch_size(limit)} allowed; " if dev.fraction_set else ""
            raise self.module.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {torch_size(n_bytes)}. GPU {self.index(device)} "
                f"has a total capacity of {torch_size(dev.total)} of which "
                f"{torch_size(dev.total - dev.reserved)} is free. {allowed}Including non-PyTorch memory, "
                f"this process has {torch_size(dev.reserved + 300 * MiB)} memory in use. Of the allocated "
                f"memory {torch_size(dev.allocated)} is allocated by PyTorch, and "
                f"{torch_size(dev.reserved - dev.allocated)} is reserved by PyTorch but unallocated. If "
                "reserved but unallocated memory is large try setting "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
            )
        dev.reserved += grow
        dev.allocated += n_bytes
        dev.peak_reserved = max(dev.peak_reserved, dev.reserved)

    def free(self, device: object, n_bytes: int) -> None:
        self.devices[self.index(device)].allocated -= n_bytes


def _build_module(box: FakeTorch) -> types.ModuleType:
    torch = types.ModuleType("torch", "Fake torch (tests/fake_torch.py)")
    cuda = types.ModuleType("torch.cuda", "Fake torch.cuda")
    torch.cuda = cuda  # type: ignore[attr-defined]

    class OutOfMemoryError(RuntimeError):
        pass

    OutOfMemoryError.__module__ = "torch"
    torch.OutOfMemoryError = OutOfMemoryError  # type: ignore[attr-defined]
    cuda.OutOfMemoryError = OutOfMemoryError  # type: ignore[attr-defined]

    def initialising(name: str, device: object) -> FakeDevice:
        """A call that starts CUDA in real torch: recorded as a violation when CUDA is off."""
        box.calls.append((name, device))
        if not box.initialized and not getattr(box._tls, "initializing", False):
            box.violations.append(f"{name}({device!r}) would initialise CUDA")
        return box.devices[box.index(device)]

    def is_initialized() -> bool:
        return box.initialized

    def init() -> None:
        box.init()

    def _lazy_call(callable: Any, **kwargs: Any) -> None:
        if box.initialized:
            callable()
        else:
            box.queued.append(callable)

    def reset_peak_memory_stats(device: object = None) -> None:
        dev = initialising("reset_peak_memory_stats", device)
        dev.peak_reserved = dev.reserved

    def max_memory_reserved(device: object = None) -> int:
        box.calls.append(("max_memory_reserved", device))
        # Real torch returns 0 (empty stats) before initialisation, without starting CUDA.
        return box.devices[box.index(device)].peak_reserved if box.initialized else 0

    def memory_reserved(device: object = None) -> int:
        box.calls.append(("memory_reserved", device))
        return box.devices[box.index(device)].reserved if box.initialized else 0

    def empty_cache() -> None:
        box.calls.append(("empty_cache", None))
        if box.initialized:
            for dev in box.devices.values():
                dev.reserved = dev.allocated

    def set_per_process_memory_fraction(fraction: float, device: object = None) -> None:
        dev = initialising("set_per_process_memory_fraction", device)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        dev.fraction = fraction
        dev.fraction_set = True

    def get_per_process_memory_fraction(device: object = None) -> float:
        return initialising("get_per_process_memory_fraction", device).fraction

    def get_device_properties(device: object = None) -> Any:
        dev = initialising("get_device_properties", device)
        return types.SimpleNamespace(total_memory=dev.total, name="Fake GPU")

    def mem_get_info(device: object = None) -> tuple[int, int]:
        dev = initialising("mem_get_info", device)
        return dev.total - dev.reserved, dev.total

    functions = [
        is_initialized,
        init,
        reset_peak_memory_stats,
        max_memory_reserved,
        memory_reserved,
        empty_cache,
        set_per_process_memory_fraction,
        get_device_properties,
        mem_get_info,
    ]
    if box.has_fraction_getter:
        functions.append(get_per_process_memory_fraction)
    if box.has_lazy_call:
        functions.append(_lazy_call)
    for fn in functions:
        setattr(cuda, fn.__name__, fn)
    return torch


def install_fake_torch(
    monkeypatch: pytest.MonkeyPatch,
    devices: dict[int, int] | None = None,
    *,
    initialized: bool = True,
    has_fraction_getter: bool = True,
    has_lazy_call: bool = True,
) -> FakeTorch:
    """Make ``sys.modules["torch"]`` a fake for the rest of the test.

    ``devices`` maps CUDA device indexes to their total bytes (default: one 24GiB device).
    ``initialized=False`` is a process that imported torch but has not started CUDA yet.
    """
    box = FakeTorch(
        devices={i: FakeDevice(total=t) for i, t in (devices or {0: 24 * GiB}).items()},
        initialized=initialized,
        has_fraction_getter=has_fraction_getter,
        has_lazy_call=has_lazy_call,
    )
    monkeypatch.setitem(sys.modules, "torch", box.module)
    monkeypatch.setitem(sys.modules, "torch.cuda", box.module.cuda)
    return box
