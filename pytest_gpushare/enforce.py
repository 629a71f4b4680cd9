"""Holding a test to its lease: PyTorch caps, out-of-memory errors explained, framework defaults.

- :func:`enforce` caps this process's PyTorch allocator on each leased device at the lease
  (``torch.cuda.set_per_process_memory_fraction``), so an over-user fails itself instead of
  a neighbour; the :class:`Enforcement` it returns lifts the caps after the test.
- :func:`annotate_oom` puts the out-of-memory error an over-user gets (PyTorch, JAX/XLA,
  CuPy, bare CUDA) next to what the test declared.
- :func:`framework_env` is what a worker's environment needs so that JAX and TensorFlow take
  memory as they need it instead of most of the GPU at once.

Nothing here imports torch or initialises CUDA: torch is used only when it is already in
``sys.modules`` (:mod:`~pytest_gpushare.torch_cuda`), and a cap waits for the test's own
initialisation of CUDA.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pytest_gpushare.observe import LeasedDevice
from pytest_gpushare.torch_cuda import imported_cuda, torch_in_use
from pytest_gpushare.units import GiB, MiB, format_size

__all__ = [
    "UNAVAILABLE_NO_TORCH",
    "Cap",
    "Enforcement",
    "annotate_oom",
    "cap_fraction",
    "enforce",
    "framework_env",
]

UNAVAILABLE_NO_TORCH: Final = "enforcement unavailable: PyTorch not in use in this process"


# --- caps ------------------------------------------------------------------------------------


def cap_fraction(held: int, lease: int, total: int) -> tuple[float | None, str | None]:
    """The fraction of the device's ``total`` that lets a process holding ``held`` take ``lease`` more.

    Returns ``(fraction, note)``: a fraction in (0, 1], with a note when it had to be
    clamped to 1.0; or ``(None, why)`` when no valid fraction exists.
    """
    if not total or total <= 0:
        return None, f"the device's total memory is unknown ({total!r})"
    fraction = (held + lease) / total
    if not math.isfinite(fraction) or fraction <= 0:
        return None, (
            f"fraction ({format_size(held)} held + {format_size(lease)} leased) / {format_size(total)} "
            f"= {fraction:g} is not in (0, 1]"
        )
    if fraction > 1:
        return 1.0, (
            f"the {format_size(held)} this process holds plus the {format_size(lease)} lease exceed the "
            f"device's {format_size(total)}: capped at the whole device (fraction 1.0)"
        )
    return fraction, None


@dataclass(frozen=True)
class Cap:
    """One device capped for a test: the fraction set, and the one to restore."""

    device: str
    fraction: float
    previous: float
    held_bytes: int
    lease_bytes: int
    total_bytes: int


@dataclass
class Enforcement:
    """The caps set for one test; call it (or :meth:`restore`) after the test.

    ``deferred``: CUDA was not initialised when the test started; the caps are set when the
    test initialises it (through torch's own queue of calls run at initialisation), or
    never, if it does not.
    """

    cuda: Any
    caps: list[Cap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deferred: bool = False
    restored: bool = False

    def __call__(self) -> list[str]:
        return self.restore()

    def restore(self) -> list[str]:
        """Lift the caps (to the fraction each device had before); returns what failed."""
        global _pending
        if self.restored:
            return []
        self.restored = True
        with _pending_lock:
            if _pending is not None and _pending[0] is self:
                _pending = None
        problems = []
        for cap in self.caps:
            try:
                self.cuda.set_per_process_memory_fraction(cap.previous, cap.device)
            except Exception as exc:
                problems.append(f"restoring the memory fraction of {cap.device} failed: {exc}")
        return problems

    def describe(self) -> str:
        parts = [
            f"{c.device} at {format_size(c.fraction * c.total_bytes)} (fraction {c.fraction:.4f})"
            for c in self.caps
        ]
        text = "capped " + ", ".join(parts) if parts else "no cap set"
        if self.deferred and not self.caps:
            text = "cap waits for CUDA's initialisation"
        return "; ".join([text, *self.notes])


def _device_total(cuda: Any, dev: str) -> int:
    try:
        return int(cuda.get_device_properties(dev).total_memory)
    except Exception:
        return int(cuda.mem_get_info(dev)[1])


def _current_fraction(cuda: Any, dev: str) -> float:
    getter = getattr(cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    if callable(getter):
        with contextlib.suppress(Exception):
            value = float(getter(dev))
            if 0 < value <= 1:
                return value
    return 1.0


def _set_caps(cuda: Any, leases: Sequence[LeasedDevice]) -> tuple[list[Cap], list[str]]:
    caps: list[Cap] = []
    notes: list[str] = []
    try:
        cuda.empty_cache()
    except Exception as exc:
        notes.append(f"empty_cache failed: {exc}")
    for lease in leases:
        dev = lease.device
        try:
            held = int(cuda.memory_reserved(dev))
            total = _device_total(cuda, dev)
            fraction, why = cap_fraction(held, lease.mem, total)
            if fraction is None:
                notes.append(f"{dev} not capped: {why}")
                continue
            if why:
                notes.append(f"{dev}: {why}")
            previous = _current_fraction(cuda, dev)
            cuda.set_per_process_memory_fraction(fraction, dev)
            caps.append(Cap(dev, fraction, previous, held, lease.mem, total))
        except Exception as exc:
            notes.append(f"{dev} not capped: {type(exc).__name__}: {exc}")
    return caps, notes


# One cap may wait for CUDA's initialisation at a time (the running test's); the hook queued
# in torch runs once, at initialisation, and applies whatever is pending then.
_pending_lock = threading.Lock()
_pending: tuple[Enforcement, list[LeasedDevice]] | None = None
_hook_queued_in: object | None = None


def _apply_pending() -> None:
    """Run by torch while it initialises CUDA: it must never raise (that would fail the init)."""
    global _pending
    with _pending_lock:
        pending, _pending = _pending, None
    if pending is None:
        return
    enf, leases = pending
    try:
        caps, notes = _set_caps(enf.cuda, leases)
        enf.caps.extend(caps)
        enf.notes.extend(notes)
    except Exception as exc:  # pragma: no cover - _set_caps already catches per device
        enf.notes.append(f"cap at CUDA initialisation failed: {exc}")


def enforce(leases: Sequence[LeasedDevice]) -> Enforcement | str:
    """Cap this process's PyTorch allocator on each leased CUDA device at the lease.

    After ``empty_cache()``, each device gets ``set_per_process_memory_fraction((held +
    lease) / total)``, where ``held`` is what torch still reserves there (wider-scoped
    fixtures' tensors) and ``total`` the device's memory; a fraction above 1 is clamped
    (with a note), one not above 0 is refused (with a note). An over-user then fails itself
    with torch's out-of-memory error instead of failing a neighbour.

    Where torch is imported but CUDA not yet initialised, nothing is initialised here: the
    cap is queued to be set when the test initialises CUDA. Returns the
    :class:`Enforcement` to restore after the test, or a reason string when there is
    nothing to enforce with (no torch in this process, no CUDA device leased).
    """
    global _pending, _hook_queued_in
    cuda = imported_cuda()
    if cuda is None:
        return UNAVAILABLE_NO_TORCH
    targets = [
        lease
        for lease in leases
        if not lease.is_cpu and lease.device.startswith("cuda") and not getattr(lease, "simulated", False)
    ]
    if not targets:
        return "enforcement unavailable: no CUDA device leased (CPU fallback or simulated GPUs)"
    if torch_in_use():
        caps, notes = _set_caps(cuda, targets)
        return Enforcement(cuda, caps, notes)
    lazy_call = getattr(cuda, "_lazy_call", None)
    if not callable(lazy_call):
        return "enforcement unavailable: PyTorch has not initialised CUDA in this process yet"
    enf = Enforcement(cuda, deferred=True)
    with _pending_lock:
        _pending = (enf, targets)
        queue = _hook_queued_in is not cuda
        _hook_queued_in = cuda
    if queue:
        # Outside the lock: torch runs the call at once if CUDA started in the meantime.
        try:
            lazy_call(_apply_pending)
        except Exception as exc:
            enf.restore()
            return f"enforcement unavailable: cannot wait for CUDA's initialisation: {exc}"
    return enf


# --- out-of-memory errors ------------------------------------------------------------------

_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|B|KiB|MiB|GiB|TiB)\b"
_UNIT_BYTES: Final = {"bytes": 1, "b": 1, "kib": 2**10, "mib": MiB, "gib": GiB, "tib": 2**40}
_TORCH_OOM = re.compile(r"CUDA out of memory\. Tried to allocate " + _SIZE)
_TORCH_GPU = re.compile(r"\bGPU (\d+)\b")
_TORCH_THIS_PROCESS = re.compile(r"this process has " + _SIZE + r" memory in use")
_TORCH_ALLOWED = re.compile(_SIZE + r" allowed;")
_TORCH_ALLOCATED = re.compile(
    r"(?:Of the allocated memory " + _SIZE + r" is allocated by PyTorch)|(?:" + _SIZE + r" already allocated)"
)
_JAX_OOM = re.compile(r"Out of memory while trying to allocate (\d+) bytes")
_CUPY_OOM = re.compile(r"Out of memory allocating ([\d,]+) bytes \(allocated so far: ([\d,]+) bytes\)")
_ANY_OOM = re.compile(
    r"CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|CUDA error: out of memory|"
    r"CUBLAS_STATUS_ALLOC_FAILED|RESOURCE_EXHAUSTED: Out of memory",
    re.IGNORECASE,
)


def _bytes(match: re.Match[str] | None, group: int = 1) -> int | None:
    if match is None or match.group(group) is None:
        return None
    return round(float(match.group(group)) * _UNIT_BYTES[match.group(group + 1).lower()])


def _texts(exc_or_text: BaseException | str) -> list[str]:
    if isinstance(exc_or_text, str):
        return [exc_or_text]
    texts: list[str] = []
    seen: set[int] = set()
    exc: BaseException | None = exc_or_text
    while exc is not None and id(exc) not in seen and len(texts) < 10:
        seen.add(id(exc))
        with contextlib.suppress(Exception):
            texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return texts


def annotate_oom(exc_or_text: BaseException | str, declared_bytes: int) -> str | None:
    """One line that puts an out-of-memory error next to the test's declaration, or None.

    Reads PyTorch's ``CUDA out of memory. Tried to allocate ...`` (current and older
    wordings, including the ``allowed`` part a memory fraction adds), JAX/XLA's
    ``RESOURCE_EXHAUSTED: Out of memory while trying to allocate N bytes``, CuPy's
    ``Out of memory allocating N bytes``, and bare CUDA out-of-memory codes; follows
    ``__cause__``/``__context__``.
    """
    declared = f"gpushare: declared {format_size(declared_bytes)}"
    for text in _texts(exc_or_text):
        torch_oom = _TORCH_OOM.search(text)
        if torch_oom:
            tried = _bytes(torch_oom)
            gpu = _TORCH_GPU.search(text, torch_oom.end())
            where = f" on GPU {gpu.group(1)}" if gpu else ""
            details = []
            held = _bytes(_TORCH_THIS_PROCESS.search(text))
            if held is not None:
                details.append(f"this process held {format_size(held)}")
            allocated = _TORCH_ALLOCATED.search(text)
            by_torch = _bytes(allocated) if allocated and allocated.group(1) else _bytes(allocated, 3)
            if by_torch is not None:
                details.append(f"PyTorch had allocated {format_size(by_torch)}")
            allowed = _bytes(_TORCH_ALLOWED.search(text))
            if allowed is not None:
                details.append(f"its cap was {format_size(allowed)}")
            tail = f" ({'; '.join(details)})" if details else ""
            return f"{declared}, tried to allocate {format_size(tried or 0)} more{where}{tail}"
        jax_oom = _JAX_OOM.search(text)
        if jax_oom:
            return f"{declared}, tried to allocate {format_size(int(jax_oom.group(1)))} more (JAX/XLA)"
        cupy_oom = _CUPY_OOM.search(text)
        if cupy_oom:
            tried_b = int(cupy_oom.group(1).replace(",", ""))
            so_far = int(cupy_oom.group(2).replace(",", ""))
            return (
                f"{declared}, tried to allocate {format_size(tried_b)} more "
                f"(CuPy had allocated {format_size(so_far)})"
            )
        if _ANY_OOM.search(text):
            return f"{declared}; the test ran out of GPU memory"
    return None


# --- framework defaults for workers --------------------------------------------------------


def framework_env(
    environ: Mapping[str, str], *, jax_preallocate_off: bool = True, tf_allow_growth: bool = True
) -> dict[str, str]:
    """Environment to add to a worker so frameworks take memory as they need it, not at once.

    - ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: JAX otherwise grabs 75% of the GPU at its
      first use, whatever the test's lease;
    - ``TF_FORCE_GPU_ALLOW_GROWTH=true``: TensorFlow otherwise maps nearly all of it.

    Only what ``environ`` does not set already (a user's own value, even empty, wins); each
    one off by its flag.
    """
    wanted: dict[str, str] = {}
    if jax_preallocate_off:
        wanted["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if tf_allow_growth:
        wanted["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return {k: v for k, v in wanted.items() if k not in environ}
