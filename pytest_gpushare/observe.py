"""What a GPU test really uses: NVML's per-process figures and PyTorch's allocator.

- :class:`Sampler` reads this process's memory on the leased GPUs from NVML's per-process list
  (:func:`pytest_gpushare.gpus.nvml.process_usage`): once when the test starts, from a light
  daemon thread every ``interval_s`` while it runs, once when it ends.
- :class:`Watch` is one process's observer around each GPU test: the sampler, PyTorch's own
  peak where the test's process already uses torch, the CUDA context kept apart from the test,
  the allocator's cache released after the test. It yields one
  :class:`~pytest_gpushare.observations.GpuObservation` per GPU;
  :mod:`~pytest_gpushare.observations` says what they mean.

Nothing here imports pytest or torch, and nothing initialises CUDA: torch is asked through
:mod:`~pytest_gpushare.torch_cuda`, only where this process already started CUDA with it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus import nvml, visible
from pytest_gpushare.observations import NOT_MEASURABLE, GpuObservation, on_simulated
from pytest_gpushare.threads import daemon_thread
from pytest_gpushare.torch_cuda import initialised_cuda, release_cached, torch_peak_start, torch_peak_stop

__all__ = [
    "DEFAULT_INTERVAL_S",
    "LeasedDevice",
    "NvmlPeak",
    "Sampler",
    "Watch",
    "split_context",
]

DEFAULT_INTERVAL_S: Final = 0.05
"""Seconds between samples while a test runs; the start and end samples are always taken."""


# --- the sampler ---------------------------------------------------------------------------


_WITHHELD: Final = "NVML gives no per-process figure (usedGpuMemory unavailable)"


class _Reading(NamedTuple):
    """One read of the process list, as it concerns our process."""

    kind: str  # "seen" | "absent" | "ambiguous" | "unavailable"
    used_bytes: int
    reason: str | None = None


def _interpret(usage: Mapping[int, int | None], pid: int, pid_exists: Callable[[int], bool]) -> _Reading:
    if pid in usage:
        used_bytes = usage[pid]
        if used_bytes is None:
            return _Reading("unavailable", 0, _WITHHELD)
        return _Reading("seen", used_bytes)
    # Absent: we hold nothing there, unless NVML lists host PIDs we cannot see (another
    # PID namespace), in which case our own entry may be among them under another number.
    if any(used is None for used in usage.values()):
        return _Reading("ambiguous", 0, _WITHHELD)
    if any(not pid_exists(p) for p in usage):
        return _Reading(
            "ambiguous", 0, "NVML lists processes this PID namespace cannot see (container or WSL2)"
        )
    return _Reading("absent", 0)


@dataclass
class _Track:
    baseline_bytes: int | None = None
    peak_bytes: int = 0
    samples: int = 0
    seen: bool = False
    ambiguous: str | None = None
    failed: str | None = None

    def add(self, reading: _Reading) -> None:
        self.samples += 1
        if reading.kind == "unavailable":
            self.failed = self.failed or reading.reason
            return
        if reading.kind == "ambiguous":
            self.ambiguous = reading.reason
        self.seen = self.seen or reading.kind == "seen"
        if self.baseline_bytes is None:
            self.baseline_bytes = reading.used_bytes
        self.peak_bytes = max(self.peak_bytes, reading.used_bytes)


@dataclass(frozen=True)
class NvmlPeak:
    """What the sampler saw of this process on one GPU over one test.

    ``baseline_bytes`` is the process's usage when the test started, ``peak_bytes`` the
    highest usage seen (both absolute, context included). Both are None when the GPU was
    not measurable, and ``reason`` says why.
    """

    uuid: str
    baseline_bytes: int | None
    peak_bytes: int | None
    samples: int
    reason: str | None = None

    @property
    def measurable(self) -> bool:
        return self.reason is None


class Sampler:
    """Samples this process's memory on some GPUs while a test runs.

    ``start(uuids, pid)`` reads each GPU once (the baseline) and starts a daemon thread that
    reads them every ``interval_s`` (0: no thread, only the start and stop readings);
    ``stop()`` stops it, reads once more and returns one :class:`NvmlPeak` per GPU.

    A GPU is "not measurable" when a reading gives no figure for our process
    (``usedGpuMemory`` None), NVML fails, the platform hides per-process figures (WSL2),
    or our process never appears while the list holds processes this PID namespace cannot
    see. Our process absent from a list of visible processes means it holds nothing there.
    A spike shorter than ``interval_s`` can fall between readings; PyTorch's own peak
    (see :class:`Watch`) covers that for torch allocations.
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        usage: Callable[[str], Mapping[int, int | None]] = nvml.process_usage,
        pid_exists: Callable[[int], bool] = visible.pid_exists,
        unavailable: str | None = None,
        detect_platform: bool = True,
    ) -> None:
        valid = isinstance(interval_s, (int, float)) and not isinstance(interval_s, bool)
        if not (valid and math.isfinite(interval_s) and interval_s >= 0):
            raise SettingError(f"observe interval: must be a number of seconds >= 0: {interval_s!r}")
        self.interval_s = float(interval_s)
        self._usage = usage
        self._pid_exists = pid_exists
        self.unavailable = unavailable or (
            visible.per_process_unavailable_reason() if detect_platform else None
        )
        self._run: _Run | None = None
        self.stop_timeout_s = 5.0

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.thread is not None

    def _read(self, uuid: str, pid: int) -> _Reading:
        if self.unavailable:
            return _Reading("unavailable", 0, self.unavailable)
        try:
            usage = self._usage(uuid)
        except Exception as exc:  # a sampler must not fail a test; say why it could not measure
            return _Reading("unavailable", 0, f"NVML: {exc}")
        return _interpret(usage, pid, self._pid_exists)

    def sample(self, uuid: str, pid: int | None = None) -> int | None:
        """Bytes ``pid`` (default: this process) uses on ``uuid`` now, or None when unknown."""
        reading = self._read(uuid, os.getpid() if pid is None else pid)
        return reading.used_bytes if reading.kind in ("seen", "absent") else None

    def _sample_all(self, run: _Run) -> None:
        for uuid, track in run.tracks.items():
            reading = self._read(uuid, run.pid)
            with run.lock:
                track.add(reading)

    def _loop(self, run: _Run) -> None:
        while not run.stop.wait(self.interval_s):
            self._sample_all(run)

    def start(self, uuids: Iterable[str], pid: int | None = None) -> None:
        """Take the baseline of ``pid`` (default: this process) on ``uuids`` and start sampling."""
        if self._run is not None:
            self.stop()
        run = _Run(os.getpid() if pid is None else pid, {uuid: _Track() for uuid in dict.fromkeys(uuids)})
        self._run = run
        if not run.tracks:
            return
        self._sample_all(run)
        if self.unavailable or self.interval_s == 0:
            return
        # Each run has its own thread, stop event and tracks: a thread stuck in NVML past
        # stop() can never write into the next test's figures.
        run.thread = daemon_thread(self._loop, "gpushare-observe", run)
        run.thread.start()

    def stop(self) -> dict[str, NvmlPeak]:
        """Stop sampling, read once more, and return what each GPU showed."""
        run, self._run = self._run, None
        if run is None:
            return {}
        if run.thread is not None:
            run.stop.set()
            run.thread.join(timeout=self.stop_timeout_s)
            if run.thread.is_alive():
                # An NVML call that hangs must not hang the test; the figures are not trusted.
                with run.lock:
                    for track in run.tracks.values():
                        track.failed = track.failed or f"NVML did not answer within {self.stop_timeout_s:g}s"
                return {uuid: _peak(uuid, t) for uuid, t in run.tracks.items()}
        self._sample_all(run)
        with run.lock:
            return {uuid: _peak(uuid, t) for uuid, t in run.tracks.items()}


@dataclass
class _Run:
    """One test's sampling: the process, its tracks, the thread and how to stop it."""

    pid: int
    tracks: dict[str, _Track]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None


def _peak(uuid: str, t: _Track) -> NvmlPeak:
    reason = t.failed or (t.ambiguous if not t.seen else None)
    if reason is not None or t.baseline_bytes is None:
        return NvmlPeak(uuid, None, None, t.samples, reason or "no reading")
    return NvmlPeak(uuid, t.baseline_bytes, t.peak_bytes, t.samples)


def split_context(baseline: int, peak: int, residual: int | None) -> tuple[int, int | None, bool]:
    """Separate the process's CUDA context from a test's own peak on one GPU.

    ``baseline`` and ``peak`` are the process's absolute usage at the test's start and at
    its highest; ``residual`` what it still holds after the test with the allocator's cache
    released (asked only when the baseline is 0). Returns ``(test_peak, context,
    context_from_test)``:

    - the process already held memory when the test started: that is the context (plus
      whatever wider-scoped fixtures keep), and the test's peak is ``peak - baseline``;
    - it held nothing and still holds something after the test: the test created the
      context, which stays with the process; it is not the test's, so it is taken off;
    - it held nothing before or after: everything seen was the test's.
    """
    if baseline > 0:
        return max(0, peak - baseline), baseline, False
    if not residual:
        return peak, None, False
    context = min(residual, peak)
    return peak - context, context, True


# --- one process's observer ------------------------------------------------------------------


class LeasedDevice(Protocol):
    """What the observer reads of a lease (``fixtures.GpuLease`` fits)."""

    @property
    def device(self) -> str: ...
    @property
    def uuid(self) -> str | None: ...
    @property
    def mem(self) -> int: ...
    @property
    def is_cpu(self) -> bool: ...


def _combine(nvml: int | None, torch: int | None) -> tuple[int | None, str]:
    # NVML sees every allocator but may miss a spike between samples; torch's peak is exact
    # for torch: the larger of the two is the better lower bound of what the test used.
    if nvml is None and torch is None:
        return None, NOT_MEASURABLE
    if torch is None or (nvml is not None and nvml >= torch):
        return nvml, "nvml"
    return torch, "torch"


class Watch:
    """One process's observer around each GPU test: ``begin(leases)`` ... ``end()``.

    ``begin`` after the lease is taken (before the test's fixtures), ``end`` after its
    teardown and before the lease is given back. ``end`` also releases torch's cached
    memory. The CUDA context seen on each GPU is remembered for the life of the process
    (``contexts``, by UUID).
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        sampler: Sampler | None = None,
        release_cached: bool = True,
    ) -> None:
        self.sampler = sampler if sampler is not None else Sampler(interval_s)
        self.release_cached = release_cached
        self.contexts: dict[str, int] = {}
        self._leases: list[LeasedDevice] = []
        self._torch_base: dict[str, int] = {}
        self._pid = os.getpid()
        self._measuring = False

    def begin(self, leases: Sequence[LeasedDevice], pid: int | None = None) -> None:
        """Start measuring a test that holds ``leases`` (CPU leases are left out).

        When no lease is on a real GPU (simulated GPUs, CPU fallback) there is nothing to
        measure: no NVML reading, no sampling thread, no torch call, now or at :meth:`end`.
        """
        self._leases = [lease for lease in leases if not lease.is_cpu and lease.uuid]
        measured = [lease for lease in self._leases if not getattr(lease, "simulated", False)]
        self._measuring = bool(measured)
        if not measured:
            return
        self._pid = os.getpid() if pid is None else pid
        self._torch_base = torch_peak_start(lease.device for lease in measured)
        self.sampler.start([lease.uuid for lease in measured if lease.uuid], self._pid)

    def end(self) -> list[GpuObservation]:
        """Stop measuring, release torch's cache; one observation per leased GPU (none twice)."""
        leases, self._leases = self._leases, []
        if not self._measuring:
            return [_simulated(lease) for lease in leases]
        self._measuring = False
        nvml = self.sampler.stop()
        devs = [lease.device for lease in leases]
        torch_peaks = torch_peak_stop(devs, self._torch_base)
        if self.release_cached:  # --gpushare-framework-defaults=off keeps torch's cache
            release_cached()
        return [
            self._observe(lease, nvml.get(lease.uuid or ""), torch_peaks.get(lease.device))
            for lease in leases
        ]

    def _observe(self, lease: LeasedDevice, nvml: NvmlPeak | None, torch: int | None) -> GpuObservation:
        uuid = lease.uuid or ""
        if getattr(lease, "simulated", False):
            return _simulated(lease)
        nvml_peak: int | None = None
        from_test = False
        note = None
        if nvml is not None and nvml.measurable:
            assert nvml.baseline_bytes is not None and nvml.peak_bytes is not None
            residual = None
            if nvml.baseline_bytes == 0 and nvml.peak_bytes > 0:
                residual = self.sampler.sample(uuid, self._pid)
                cuda = initialised_cuda()
                if residual and cuda is not None:
                    # Tensors still alive in wider-scoped fixtures are not the context.
                    with contextlib.suppress(Exception):
                        residual = max(0, residual - int(cuda.memory_reserved(lease.device)))
            nvml_peak, context, from_test = split_context(nvml.baseline_bytes, nvml.peak_bytes, residual)
            if context is not None:
                self.contexts.setdefault(uuid, context)
        else:
            note = nvml.reason if nvml is not None else "not sampled"
        peak, source = _combine(nvml_peak, torch)
        if source == "torch" and note:
            note = f"{note}; the figure is PyTorch's allocator only"
        return GpuObservation(
            uuid=uuid,
            device=lease.device,
            declared_bytes=lease.mem,
            peak_bytes=peak,
            source=source,
            nvml_peak_bytes=nvml_peak,
            torch_peak_bytes=torch,
            baseline_bytes=nvml.baseline_bytes if nvml else None,
            context_bytes=self.contexts.get(uuid),
            context_from_test=from_test,
            samples=nvml.samples if nvml else 0,
            note=note,
        )


def _simulated(lease: LeasedDevice) -> GpuObservation:
    return on_simulated(lease.uuid or "", lease.device, lease.mem)
