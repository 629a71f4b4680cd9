"""What this process can see: the devices ``CUDA_VISIBLE_DEVICES`` leaves (as CUDA reads it),
and the PIDs of this namespace."""

from __future__ import annotations

import os

import pytest
from fake_pynvml import FakeGpu, install_fake_pynvml
from nvml_support import ALL_PIDS, M1, M2, A, B, C, mig_box, probe, two_gpus, uuids

from pytest_gpushare.gpus.nvml import NvmlProbe
from pytest_gpushare.gpus.visible import FROM_ENVIRONMENT, pid_exists

# --- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(None, [A, B, C], id="unset: every GPU"),
        pytest.param("", [], id="empty: no GPU"),
        pytest.param("2,0", [C, A], id="indices in their order"),
        pytest.param(" 1", [B], id="index with leading space"),
        pytest.param("1gpu,+2", [B, C], id="indices read like strtoul"),
        pytest.param("-0", [A], id="minus zero is zero"),
        pytest.param("1,3,0", [B], id="index out of range hides the rest"),
        pytest.param("0,-1,1", [A], id="negative index hides the rest"),
        pytest.param("0,,1", [A], id="empty entry hides the rest"),
        pytest.param("0,1,0", [], id="a GPU named twice hides every GPU"),
        pytest.param(f"{B},{A}", [B, A], id="full UUIDs"),
        pytest.param("GPU-bb,GPU-ab", [B, C], id="unique UUID prefixes"),
        pytest.param("GPU-bb,GPU-a,GPU-aaaa", [B], id="ambiguous prefix hides the rest"),
        pytest.param("GPU-bb,GPU-ffff,GPU-aaaa", [B], id="unknown UUID hides the rest"),
        pytest.param(f"{B},0", [B], id="an index after UUIDs hides the rest"),
        pytest.param(f"0,{B}", [A], id="a UUID after indices hides the rest"),
        pytest.param(f"{A},{A[:12]}", [], id="one GPU named twice by UUID"),
        pytest.param("bbbbbbbb", [], id="a UUID without GPU- is no UUID"),
        pytest.param(f"{B} ", [], id="UUID with trailing space matches nothing"),
    ],
)
def test_cuda_visible_devices_is_applied_as_cuda_does(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, expected: list[str]
) -> None:
    install_fake_pynvml(
        monkeypatch,
        [FakeGpu(A), FakeGpu(B, bus_id="00000000:02:00.0"), FakeGpu(C, bus_id="00000000:03:00.0")],
    )
    inv = probe(visible)
    assert uuids(inv) == expected
    assert [g.index for g in inv.gpus] == list(range(len(expected)))


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(M2, [M2], id="MIG UUID"),
        pytest.param(f"{M2},{M1}", [M2, M1], id="MIG UUIDs in their order"),
        pytest.param("MIG-1111", [M1], id="MIG UUID prefix"),
        pytest.param(f"MIG-{B}/9/0", [M2], id="old MIG-GPU-uuid/gi/ci spelling"),
        pytest.param(f"MIG-{B}/5/0,{M1}", [], id="old spelling of a MIG device that does not exist"),
        pytest.param(f"{M1},{A}", [M1], id="a GPU UUID after MIG UUIDs hides the rest"),
        pytest.param("1", [M1, M2], id="index of a GPU in MIG mode gives its MIG devices"),
        pytest.param(B, [M1, M2], id="UUID of a GPU in MIG mode gives its MIG devices"),
        pytest.param(f"{M1},MIG-1", [], id="a MIG device named twice hides every GPU"),
    ],
)
def test_cuda_visible_devices_names_mig_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[str]
) -> None:
    install_fake_pynvml(monkeypatch, mig_box())
    assert uuids(probe(visible)) == expected


def test_cuda_visible_devices_is_read_from_the_environment_at_probe_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    nvml = NvmlProbe(pid_exists=ALL_PIDS.__contains__)
    assert nvml.visible is FROM_ENVIRONMENT
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    first = nvml.probe()
    assert uuids(first) == [B]
    assert first.gpus[0].index == 0
    assert first.source == "NVML (driver 575.51.03, CUDA_VISIBLE_DEVICES='1')"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert uuids(nvml.probe()) == [A, B]


def test_explicit_none_means_every_gpu_whatever_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert uuids(NvmlProbe(None).probe()) == [A, B]


def test_the_default_pid_check_sees_this_process_and_not_an_unused_pid() -> None:
    assert pid_exists(os.getpid())
    assert not pid_exists(2**31 - 1)
