"""What a GPU test really uses: the sampler on a fake NVML, torch through a stand-in module."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from conftest import wait_until
from fake_pynvml import NVML_ERROR_GPU_IS_LOST, FakeGpu, FakeNvml
from fake_torch import FakeLease, install_fake_torch

from pytest_gpushare.errors import SettingError
from pytest_gpushare.observations import NOT_MEASURABLE, GpuObservation, observation_record
from pytest_gpushare.observe import Sampler, Watch, split_context
from pytest_gpushare.torch_cuda import release_cached, torch_peak_start, torch_peak_stop
from pytest_gpushare.units import GiB, MiB

PID = os.getpid()
A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
NO_SUCH_PID = 2**22 + 12345  # above Linux's pid_max ceiling: never a process here
Processes = list[tuple[int, int | None]]


def wait_reads(fake: FakeNvml, more: int) -> None:
    target = fake.process_reads + more
    wait_until(lambda: fake.process_reads >= target, f"{more} more reads of the process list")


class Schedule:
    """A process list that changes at each read: ``steps[i]`` at read i, the last one after."""

    def __init__(self, *steps: Processes) -> None:
        self.steps = steps
        self.reads = 0

    def __call__(self) -> Processes:
        step = self.steps[min(self.reads, len(self.steps) - 1)]
        self.reads += 1
        return step


@pytest.fixture
def box(fake_nvml: Callable[..., FakeNvml]) -> Callable[..., FakeNvml]:
    return fake_nvml


def sampler(interval_s: float = 0.001) -> Sampler:
    return Sampler(interval_s, detect_platform=False)


def test_the_gpu_modules_import_in_any_order_without_pynvml_or_torch() -> None:
    for first in ("gpus.nvml", "gpus", "gpus.model", "gpus.visible", "observe", "enforce", "torch_cuda"):
        code = (
            f"import sys, pytest_gpushare.{first}\n"
            "from pytest_gpushare.gpus import probe_for\nfrom pytest_gpushare.gpus.nvml import NvmlProbe\n"
            "import pytest_gpushare.observe, pytest_gpushare.enforce, pytest_gpushare.observations\n"
            "import pytest_gpushare.torch_cuda, pytest_gpushare.gpus.visible\n"
            "assert isinstance(probe_for(None), NvmlProbe)\n"
            "print(sorted({'pynvml', 'torch'} & set(sys.modules)))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "[]", first


# --- the sampler ---------------------------------------------------------------------------


def test_sampler_catches_a_spike_that_lasts_one_reading(box: Callable[..., FakeNvml]) -> None:
    schedule = Schedule([(PID, 100 * MiB)], [(PID, 3 * GiB)], [(PID, 100 * MiB)])
    box([FakeGpu(A, usage=schedule)])
    s = sampler()
    s.start([A])
    # Reading 0 is the baseline at start; reading 1, the spike, is the thread's first.
    wait_until(lambda: schedule.reads >= 4, "the spike and the reading after it")
    peak = s.stop()[A]
    assert peak.measurable
    assert peak.baseline_bytes == 100 * MiB
    assert peak.peak_bytes == 3 * GiB
    assert peak.samples == schedule.reads >= 5
    assert not any(t.name == "gpushare-observe" for t in threading.enumerate())


def test_sampler_follows_usage_that_changes_while_the_test_runs(box: Callable[..., FakeNvml]) -> None:
    usage = {"now": 0}
    fake = box([FakeGpu(A, usage=lambda: [(PID, usage["now"])] if usage["now"] else [])])
    s = sampler()
    s.start([A])
    for step in (GiB, 5 * GiB, 2 * GiB):
        usage["now"] = step
        wait_reads(fake, 2)  # one of them surely began after the change
    peak = s.stop()[A]
    assert (peak.baseline_bytes, peak.peak_bytes) == (0, 5 * GiB)


def test_sampler_with_interval_zero_reads_only_at_start_and_stop(box: Callable[..., FakeNvml]) -> None:
    schedule = Schedule([(PID, GiB)], [(PID, 2 * GiB)])
    box([FakeGpu(A, usage=schedule)])
    s = sampler(0)
    s.start([A])
    assert not s.running
    peak = s.stop()[A]
    assert (peak.baseline_bytes, peak.peak_bytes, peak.samples) == (GiB, 2 * GiB, 2)


def test_sampler_samples_each_gpu(box: Callable[..., FakeNvml]) -> None:
    box([FakeGpu(A, processes=[(PID, GiB)]), FakeGpu(B, processes=[(PID, 2 * GiB)])])
    s = sampler(0)
    s.start([A, B, A])
    peaks = s.stop()
    assert {u: p.peak_bytes for u, p in peaks.items()} == {A: GiB, B: 2 * GiB}


def test_not_measurable_when_nvml_withholds_our_figure(box: Callable[..., FakeNvml]) -> None:
    box([FakeGpu(A, processes=[(PID, None)])])
    s = sampler(0)
    s.start([A])
    peak = s.stop()[A]
    assert not peak.measurable
    assert (peak.baseline_bytes, peak.peak_bytes) == (None, None)
    assert "usedGpuMemory" in (peak.reason or "")


def test_one_withheld_reading_makes_the_whole_test_not_measurable(box: Callable[..., FakeNvml]) -> None:
    schedule = Schedule([(PID, GiB)], [(PID, None)], [(PID, GiB)])
    box([FakeGpu(A, usage=schedule)])
    s = sampler()
    s.start([A])
    # The thread's first reading is the withheld one.
    wait_until(lambda: schedule.reads >= 3, "the withheld reading and the one after it")
    peak = s.stop()[A]
    assert peak.peak_bytes is None
    assert "usedGpuMemory" in (peak.reason or "")


def test_not_measurable_when_our_pid_is_missing_among_processes_we_cannot_see(
    box: Callable[..., FakeNvml],
) -> None:
    # Another PID namespace: NVML lists host PIDs; ours is there under a number we do not know.
    box([FakeGpu(A, processes=[(NO_SUCH_PID, 3 * GiB)])])
    s = sampler(0)
    s.start([A])
    peak = s.stop()[A]
    assert peak.peak_bytes is None
    assert "PID namespace" in (peak.reason or "")


def test_absent_among_visible_processes_means_nothing_used(box: Callable[..., FakeNvml]) -> None:
    box([FakeGpu(A, processes=[(os.getppid(), 3 * GiB)]), FakeGpu(B)])
    s = sampler(0)
    s.start([A, B])
    peaks = s.stop()
    assert [(p.measurable, p.peak_bytes) for p in peaks.values()] == [(True, 0), (True, 0)]


def test_an_early_unmatched_reading_counts_as_zero_once_our_pid_shows_up(
    box: Callable[..., FakeNvml],
) -> None:
    foreign = (NO_SUCH_PID, GiB)
    box([FakeGpu(A, usage=Schedule([foreign], [foreign, (PID, 2 * GiB)]))])
    s = sampler(0)
    s.start([A])
    peak = s.stop()[A]
    assert (peak.baseline_bytes, peak.peak_bytes) == (0, 2 * GiB)


def test_not_measurable_when_nvml_fails(box: Callable[..., FakeNvml]) -> None:
    box([FakeGpu(A, fail={"nvmlDeviceGetComputeRunningProcesses_v3": NVML_ERROR_GPU_IS_LOST})])
    s = sampler(0)
    s.start([A])
    peak = s.stop()[A]
    assert peak.peak_bytes is None
    assert peak.reason == "NVML: GPU is lost"


def test_not_measurable_on_wsl2_without_reading_nvml(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = box([FakeGpu(A, processes=[])])
    monkeypatch.setattr(
        platform, "uname", lambda: SimpleNamespace(release="5.15.153.1-microsoft-standard-WSL2")
    )
    s = Sampler()
    s.start([A])
    assert not s.running
    peak = s.stop()[A]
    assert peak.peak_bytes is None
    assert "WSL2" in (peak.reason or "")
    assert fake.process_reads == 0


def test_a_hung_nvml_call_neither_hangs_the_test_nor_leaks_into_the_next(
    box: Callable[..., FakeNvml],
) -> None:
    release = threading.Event()
    hang = threading.Event()

    def processes() -> Processes:
        if hang.is_set():
            hang.clear()
            release.wait(10)
            return [(PID, 9 * GiB)]  # what the hung call says when it finally returns
        return [(PID, GiB)]

    fake = box([FakeGpu(A, usage=processes)])
    s = sampler()
    s.stop_timeout_s = 0.05
    s.start([A])
    hang.set()
    wait_until(lambda: not hang.is_set(), "the old thread to enter the hung call")
    peak = s.stop()[A]
    assert peak.peak_bytes is None
    assert peak.reason == "NVML did not answer within 0.05s"
    s.stop_timeout_s = 5.0
    s.start([A])
    release.set()
    wait_until(
        lambda: sum(t.name == "gpushare-observe" for t in threading.enumerate()) == 1,
        "the hung thread to end",
    )
    wait_reads(fake, 2)
    peak = s.stop()[A]
    assert (peak.baseline_bytes, peak.peak_bytes) == (GiB, GiB)


def test_sampler_rejects_a_bad_interval() -> None:
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(SettingError, match="observe interval"):
            Sampler(bad)


def test_start_and_stop_cost_little_on_a_trivial_test(box: Callable[..., FakeNvml]) -> None:
    box([FakeGpu(A, processes=[(PID, GiB)])])
    s = Sampler(detect_platform=False)  # the default interval
    rounds = 100
    began = time.perf_counter()
    for _ in range(rounds):
        s.start([A])
        sum(range(100))  # the trivial test
        s.stop()
    per_test = (time.perf_counter() - began) / rounds
    print(f"sampler start+stop on a trivial test: {per_test * 1e6:.0f} us")
    assert per_test < 0.05  # generous: timing goals live in bench/


# --- context and test peaks ------------------------------------------------------------------


def test_split_context() -> None:
    assert split_context(500 * MiB, 3 * GiB, None) == (3 * GiB - 500 * MiB, 500 * MiB, False)
    assert split_context(0, 3 * GiB, 500 * MiB) == (3 * GiB - 500 * MiB, 500 * MiB, True)
    assert split_context(0, 3 * GiB, 0) == (3 * GiB, None, False)
    assert split_context(0, 3 * GiB, None) == (3 * GiB, None, False)
    assert split_context(GiB, 512 * MiB, None) == (0, GiB, False)


def test_the_test_that_creates_the_context_is_not_charged_for_it(box: Callable[..., FakeNvml]) -> None:
    ctx = 480 * MiB
    # Readings: start (no context yet), stop (context + 2GiB), after releasing the cache (context).
    first = Schedule([], [(PID, ctx + 2 * GiB)], [(PID, ctx)])
    gpu = FakeGpu(A, usage=first)
    box([gpu])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.source, obs.context_bytes, obs.context_from_test) == (
        2 * GiB,
        "nvml",
        ctx,
        True,
    )
    assert first.reads == 3
    # The next test starts with the context in place: baseline, no extra reading.
    second = Schedule([(PID, ctx)], [(PID, ctx + GiB)])
    gpu.usage = second
    watch.begin([FakeLease()])
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.baseline_bytes, obs.context_bytes, obs.context_from_test) == (
        GiB,
        ctx,
        ctx,
        False,
    )
    assert second.reads == 2
    assert watch.contexts == {A: ctx}


def test_a_context_made_before_the_first_test_is_its_baseline(box: Callable[..., FakeNvml]) -> None:
    # A conftest initialised CUDA at import: the first test starts with the context in place.
    box([FakeGpu(A, usage=Schedule([(PID, 300 * MiB)], [(PID, 300 * MiB + 3 * GiB)]))])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.context_bytes, obs.context_from_test) == (3 * GiB, 300 * MiB, False)


def test_torch_peak_catches_what_sampling_missed(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = install_fake_torch(monkeypatch)
    torch.allocate("cuda:0", GiB)  # a module fixture's tensor, alive across tests
    box([FakeGpu(A, processes=[(PID, 300 * MiB + GiB)])])  # NVML never sees the spike
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    torch.allocate("cuda:0", 3 * GiB)
    torch.free("cuda:0", 3 * GiB)
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.source, obs.nvml_peak_bytes, obs.torch_peak_bytes) == (
        3 * GiB,
        "torch",
        0,
        3 * GiB,
    )
    assert ("reset_peak_memory_stats", "cuda:0") in torch.calls
    assert torch.calls[-1] == ("empty_cache", None)
    assert torch.devices[0].reserved == GiB  # the cache was released, the fixture's tensor kept
    assert torch.violations == []


def test_nvml_wins_when_it_saw_more_than_torch(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = install_fake_torch(monkeypatch)
    torch.allocate("cuda:0", 1)
    box([FakeGpu(A, usage=Schedule([(PID, 300 * MiB)], [(PID, 300 * MiB + 2 * GiB)]))])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    torch.allocate("cuda:0", GiB)  # plus 1GiB outside torch (CuPy, say), seen only by NVML
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.source, obs.torch_peak_bytes) == (2 * GiB, "nvml", GiB)


def test_nothing_is_asked_of_torch_before_cuda_is_initialised(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = install_fake_torch(monkeypatch, initialized=False)
    box([FakeGpu(A, processes=[])])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    assert torch_peak_start(["cuda:0"]) == {}
    assert torch_peak_stop(["cuda:0"]) == {}
    assert release_cached() is False
    (obs,) = watch.end()
    assert torch.calls == []
    assert torch.violations == []
    assert not torch.initialized
    assert (obs.peak_bytes, obs.source, obs.torch_peak_bytes) == (0, "nvml", None)


def test_a_test_that_starts_cuda_gets_its_torch_peak_from_the_start(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = install_fake_torch(monkeypatch, initialized=False)
    box([FakeGpu(A, processes=[(PID, None)])])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    torch.allocate("cuda:0", 2 * GiB)
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.source) == (2 * GiB, "torch")
    assert "usedGpuMemory" in (obs.note or "") and "PyTorch's allocator only" in (obs.note or "")
    assert torch.violations == []
    assert ("empty_cache", None) in torch.calls


def test_not_measurable_is_never_zero(box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    box([FakeGpu(A, processes=[(NO_SUCH_PID, GiB)])])
    watch = Watch(sampler=sampler(0))
    watch.begin([FakeLease()])
    (obs,) = watch.end()
    assert (obs.peak_bytes, obs.source) == (None, NOT_MEASURABLE)
    assert "PID namespace" in (obs.note or "")
    assert observation_record("t::x", [obs])["observed_bytes"] is None


def test_simulated_and_cpu_leases(box: Callable[..., FakeNvml]) -> None:
    fake = box([FakeGpu(A)])
    watch = Watch(sampler=sampler(0))
    cpu = FakeLease(device="cpu", uuid=None, mem=0, is_cpu=True)
    watch.begin([FakeLease(device="cpu", uuid=B, simulated=True), cpu])
    (obs,) = watch.end()
    assert (obs.uuid, obs.source, obs.peak_bytes) == (B, NOT_MEASURABLE, None)
    assert "simulated" in (obs.note or "")
    assert fake.process_reads == 0


def test_simulated_and_cpu_leases_are_not_measured_at_all(
    box: Callable[..., FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path for trivial tests: no NVML reading, no sampling thread, no torch call."""
    fake = box([FakeGpu(A)])
    torch = install_fake_torch(monkeypatch)
    torch.allocate("cuda:0", GiB)
    watch = Watch(sampler=Sampler(0.001, detect_platform=False))
    threads = threading.active_count()
    watch.begin([FakeLease(device="cpu", uuid=B, simulated=True)])
    assert not watch.sampler.running and threading.active_count() == threads
    (obs,) = watch.end()
    assert (obs.uuid, obs.declared_bytes, obs.source) == (B, FakeLease().mem, NOT_MEASURABLE)
    assert obs.note == "simulated GPU: nothing to measure"
    assert fake.process_reads == 0
    assert torch.calls == []  # not even empty_cache: the test had no CUDA device
    watch.begin([FakeLease(device="cpu", uuid=None, mem=0, is_cpu=True)])
    assert watch.end() == []
    # A real lease after them is measured as before.
    watch.begin([FakeLease()])
    assert watch.sampler.running
    watch.end()
    assert fake.process_reads > 0 and ("empty_cache", None) in torch.calls


def test_an_observation_dict_is_what_asdict_gives() -> None:
    obs = GpuObservation(A, "cuda:0", GiB, 2 * GiB, "nvml", 2 * GiB, GiB, 300 * MiB, 300 * MiB, True, 4, "n")
    assert obs.to_dict() == dataclasses.asdict(obs)
    assert GpuObservation.from_dict(obs.to_dict()) == obs


def test_release_cached_empties_torchs_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch)
    torch.allocate(0, 2 * GiB)
    torch.free(0, 2 * GiB)
    assert release_cached() is True
    assert torch.devices[0].reserved == 0
