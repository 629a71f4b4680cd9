"""Holding a test to its lease: PyTorch caps on a stand-in torch, out-of-memory errors explained."""

from __future__ import annotations

import sys

import pytest
from fake_torch import FakeLease, FakeTorch, install_fake_torch

from pytest_gpushare.enforce import (
    UNAVAILABLE_NO_TORCH,
    Enforcement,
    annotate_oom,
    cap_fraction,
    enforce,
    framework_env,
)
from pytest_gpushare.units import GiB

B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


# --- enforcement -----------------------------------------------------------------------------


def test_cap_fraction() -> None:
    assert cap_fraction(2 * GiB, 4 * GiB, 24 * GiB) == (0.25, None)
    fraction, note = cap_fraction(20 * GiB, 8 * GiB, 24 * GiB)
    assert fraction == 1.0
    assert note and "exceed the device's 24.0GiB" in note and "fraction 1.0" in note
    assert cap_fraction(0, 0, 24 * GiB)[0] is None
    assert "not in (0, 1]" in (cap_fraction(0, 0, 24 * GiB)[1] or "")
    assert cap_fraction(0, GiB, 0)[0] is None


def test_enforce_caps_at_what_the_process_holds_plus_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, {0: 24 * GiB})
    torch.allocate("cuda:0", 3 * GiB)
    torch.free("cuda:0", GiB)  # 2GiB live (a module fixture), 1GiB cached
    enf = enforce([FakeLease(mem=4 * GiB)])
    assert isinstance(enf, Enforcement)
    (cap,) = enf.caps
    assert (cap.device, cap.held_bytes, cap.lease_bytes, cap.fraction) == ("cuda:0", 2 * GiB, 4 * GiB, 0.25)
    names = [name for name, _ in torch.calls]
    assert names.index("empty_cache") < names.index("memory_reserved")
    assert torch.devices[0].fraction == 0.25
    torch.allocate("cuda:0", 4 * GiB)  # exactly the lease: fits
    with pytest.raises(torch.module.OutOfMemoryError) as excinfo:
        torch.allocate("cuda:0", 2 * GiB)
    assert annotate_oom(excinfo.value, 4 * GiB) == (
        "gpushare: declared 4.0GiB, tried to allocate 2.0GiB more on GPU 0 "
        "(this process held 6.3GiB; PyTorch had allocated 6.0GiB; its cap was 6.0GiB)"
    )
    assert enf() == []
    assert torch.devices[0].fraction == 1.0
    assert enf.restore() == []  # once only
    assert torch.violations == []


def test_enforce_restores_the_fraction_the_process_had(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch)
    torch.module.cuda.set_per_process_memory_fraction(0.5, 0)
    enf = enforce([FakeLease(mem=GiB)])
    assert isinstance(enf, Enforcement)
    assert enf.caps[0].previous == 0.5
    enf.restore()
    assert torch.devices[0].fraction == 0.5


def test_enforce_restores_to_one_where_torch_cannot_say(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, has_fraction_getter=False)
    torch.module.cuda.set_per_process_memory_fraction(0.5, 0)
    enf = enforce([FakeLease(mem=GiB)])
    assert isinstance(enf, Enforcement)
    enf.restore()
    assert torch.devices[0].fraction == 1.0


def test_enforce_clamps_past_the_device_and_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, {0: 24 * GiB, 1: 16 * GiB})
    torch.allocate("cuda:0", 20 * GiB)
    enf = enforce([FakeLease(mem=8 * GiB), FakeLease(device="cuda:1", uuid=B, mem=0)])
    assert isinstance(enf, Enforcement)
    assert [(c.device, c.fraction) for c in enf.caps] == [("cuda:0", 1.0)]
    assert any("capped at the whole device" in n for n in enf.notes)
    assert any(n.startswith("cuda:1 not capped") and "not in (0, 1]" in n for n in enf.notes)
    assert not torch.devices[1].fraction_set
    assert enf.describe().startswith("capped cuda:0 at 24.0GiB (fraction 1.0000); cuda:0: the 20.0GiB")


def test_enforce_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert (
        enforce([FakeLease()])
        == UNAVAILABLE_NO_TORCH
        == ("enforcement unavailable: PyTorch not in use in this process")
    )


def test_enforce_with_nothing_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch)
    result = enforce(
        [FakeLease(device="cpu", uuid=None, is_cpu=True), FakeLease(device="cpu", simulated=True)]
    )
    assert isinstance(result, str) and result.startswith("enforcement unavailable: no CUDA device")
    assert torch.calls == []


def test_enforce_waits_for_the_test_to_initialise_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, {0: 16 * GiB}, initialized=False)
    enf = enforce([FakeLease(mem=4 * GiB)])
    assert isinstance(enf, Enforcement) and enf.deferred and enf.caps == []
    assert torch.violations == [] and not torch.initialized
    assert enf.describe() == "cap waits for CUDA's initialisation"
    torch.allocate("cuda:0", GiB)  # the test's first tensor starts CUDA
    assert torch.devices[0].fraction == 0.25
    assert [c.fraction for c in enf.caps] == [0.25]
    assert torch.violations == []
    with pytest.raises(torch.module.OutOfMemoryError):
        torch.allocate("cuda:0", 4 * GiB)
    enf.restore()
    assert torch.devices[0].fraction == 1.0


def test_a_waiting_cap_is_dropped_when_the_test_never_starts_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, initialized=False)
    first = enforce([FakeLease(mem=4 * GiB)])
    assert isinstance(first, Enforcement)
    first.restore()
    second = enforce([FakeLease(mem=8 * GiB)])
    assert isinstance(second, Enforcement)
    assert len(torch.queued) == 1  # one hook, whatever the number of tests
    second.restore()
    torch.init()  # a later test that takes no lease starts CUDA: no stale cap
    assert not torch.devices[0].fraction_set
    assert first.caps == second.caps == []


def test_enforce_without_a_way_to_wait_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = install_fake_torch(monkeypatch, initialized=False, has_lazy_call=False)
    result = enforce([FakeLease()])
    assert result == "enforcement unavailable: PyTorch has not initialised CUDA in this process yet"
    assert torch.calls == []


# --- out-of-memory errors --------------------------------------------------------------------


def test_annotate_torch_oom_in_both_wordings() -> None:
    old = (
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 1; 15.90 GiB total capacity; 14.83 GiB "
        "already allocated; 5.75 MiB free; 14.93 GiB reserved in total by PyTorch)"
    )
    assert annotate_oom(old, 4 * GiB) == (
        "gpushare: declared 4.0GiB, tried to allocate 20.0MiB more on GPU 1 (PyTorch had allocated 14.8GiB)"
    )
    other_namespace = (
        "CUDA out of memory. Tried to allocate 1.25 GiB. GPU 0 has a total capacity of 93.02 GiB of which "
        "1.18 GiB is free. Process 2752205 has 91.82 GiB memory in use. Of the allocated memory 90.63 GiB "
        "is allocated by PyTorch, and 120.54 MiB is reserved by PyTorch but unallocated."
    )
    assert annotate_oom(other_namespace, 2 * GiB) == (
        "gpushare: declared 2.0GiB, tried to allocate 1.2GiB more on GPU 0 (PyTorch had allocated 90.6GiB)"
    )


def test_annotate_follows_the_exception_chain() -> None:
    try:
        try:
            raise MemoryError("CUDA out of memory. Tried to allocate 512 bytes")
        except MemoryError as inner:
            raise RuntimeError("model forward failed") from inner
    except RuntimeError as exc:
        outer = exc
    assert annotate_oom(outer, GiB) == "gpushare: declared 1.0GiB, tried to allocate 512B more"


def test_annotate_other_frameworks() -> None:
    jax = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2147483648 bytes."
    assert annotate_oom(jax, GiB) == "gpushare: declared 1.0GiB, tried to allocate 2.0GiB more (JAX/XLA)"
    cupy = "Out of memory allocating 1,073,741,824 bytes (allocated so far: 536,870,912 bytes)."
    assert annotate_oom(cupy, GiB) == (
        "gpushare: declared 1.0GiB, tried to allocate 1.0GiB more (CuPy had allocated 512.0MiB)"
    )
    assert annotate_oom(RuntimeError("CUDA error: out of memory"), GiB) == (
        "gpushare: declared 1.0GiB; the test ran out of GPU memory"
    )
    assert annotate_oom(ValueError("shapes do not match"), GiB) is None


# --- framework defaults ----------------------------------------------------------------------


def test_framework_env_only_fills_what_the_user_left_unset() -> None:
    assert framework_env({}) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
    assert framework_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "TF_FORCE_GPU_ALLOW_GROWTH": ""}) == {}
    assert framework_env({}, jax_preallocate_off=False) == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert framework_env({}, tf_allow_growth=False) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_the_fake_torch_refuses_what_real_torch_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    torch: FakeTorch = install_fake_torch(monkeypatch)
    with pytest.raises(ValueError, match="Invalid fraction"):
        torch.module.cuda.set_per_process_memory_fraction(1.5, 0)
    with pytest.raises(TypeError):
        torch.module.cuda.set_per_process_memory_fraction(1, 0)
