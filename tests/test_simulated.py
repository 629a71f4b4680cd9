"""Simulated GPUs (``--gpushare-simulate``), and the choice between them and NVML."""

from __future__ import annotations

import time

import pytest
from fake_pynvml import install_fake_pynvml
from nvml_support import A, B, two_gpus, uuids

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus import SimulatedProbe, probe_for
from pytest_gpushare.gpus.nvml import NvmlProbe
from pytest_gpushare.gpus.simulated import MAX_SIMULATED_GPUS, parse_simulate
from pytest_gpushare.units import GiB

# --- simulated GPUs ----------------------------------------------------------------------------


def test_simulate_spec_gives_totals_used_and_names() -> None:
    inv = SimulatedProbe(visible=None, spec="24GiB:used=2GiB,2x16GiB:name=RTX 4080").probe()
    assert [(g.index, g.total_bytes, g.used_bytes, g.free_bytes, g.name) for g in inv.gpus] == [
        (0, 24 * GiB, 2 * GiB, 22 * GiB, "Simulated GPU"),
        (1, 16 * GiB, 0, 16 * GiB, "RTX 4080"),
        (2, 16 * GiB, 0, 16 * GiB, "RTX 4080"),
    ]
    assert all(g.simulated and g.processes == () for g in inv.gpus)
    assert inv.source == "simulated (24GiB:used=2GiB,2x16GiB:name=RTX 4080)"


def test_simulated_uuids_are_stable_and_distinct_per_position() -> None:
    first = SimulatedProbe("2x80GiB").probe()
    again = SimulatedProbe("2x80GiB").probe()
    assert uuids(first) == uuids(again)
    assert len(set(uuids(first))) == 2
    assert all(u.startswith("GPU-") and len(u) == len(A) for u in uuids(first))
    assert uuids(SimulatedProbe("80GiB").probe())[0] == uuids(first)[0]


def test_the_inherited_cuda_visible_devices_applies_as_on_real_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    every = uuids(SimulatedProbe("3x24GiB", visible=None).probe())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    inv = SimulatedProbe("3x24GiB").probe()
    assert [(g.index, g.uuid) for g in inv.gpus] == [(0, every[1])]  # its own UUID, a new index
    assert inv.source == "simulated (3x24GiB, CUDA_VISIBLE_DEVICES='1')"
    # By the simulated UUIDs (or unique prefixes of them), in the order given.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{every[2]},{every[0][:12]}")
    assert uuids(SimulatedProbe("3x24GiB").probe()) == [every[2], every[0]]
    # As CUDA reads it: the first entry that names no GPU hides itself and all after it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7,0")
    assert uuids(SimulatedProbe("3x24GiB").probe()) == [every[2]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert SimulatedProbe("3x24GiB").probe().gpus == ()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert uuids(SimulatedProbe("3x24GiB").probe()) == every


def test_a_visibility_that_names_only_real_gpus_is_not_about_the_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker pinned to a real GPU runs a nested session on simulated GPUs (pytester, a script).
    every = uuids(SimulatedProbe("2x24GiB", visible=None).probe())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", A)
    inv = SimulatedProbe("2x24GiB").probe()
    assert uuids(inv) == every
    assert inv.notes == (f"CUDA_VISIBLE_DEVICES={A!r} names real GPUs, none of the simulated ones: ignored",)
    # One simulated UUID makes it about the simulation, with CUDA's reading: the real one hides.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{every[1]},{A}")
    assert uuids(SimulatedProbe("2x24GiB").probe()) == [every[1]]


def test_simulate_none_is_no_gpu() -> None:
    inv = SimulatedProbe("None").probe()
    assert inv.gpus == ()
    assert inv.error is None
    assert "none" in inv.source


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "24GiB,",
        "0GiB",
        "-4GiB",
        "lots",
        "0x24GiB",
        "24GiB:used=30GiB",
        "24GiB:color=red",
        "24GiB:used",
        "24",  # sizes need a unit: 24 bytes is no GPU
        "24GiB:used=2",
    ],
)
def test_a_bad_simulate_spec_names_its_source(spec: str) -> None:
    with pytest.raises(SettingError, match=r"^GPUSHARE_SIMULATE: "):
        parse_simulate(spec, "GPUSHARE_SIMULATE")


@pytest.mark.parametrize(
    ("spec", "count"),
    [
        ("129x24GiB", "129"),
        ("100x24GiB,29x8GiB", "129"),
        (",".join(["24GiB"] * 129), "129"),
        ("100000000x24GiB", "100000000"),
        ("1" + "0" * 5000 + "x24GiB", "more than 128"),  # past int()'s digit limit
    ],
)
def test_more_simulated_gpus_than_any_box_has_is_one_line_error(spec: str, count: str) -> None:
    started = time.monotonic()
    with pytest.raises(SettingError) as info:
        parse_simulate(spec, "GPUSHARE_SIMULATE")
    assert time.monotonic() - started < 1
    message = str(info.value)
    assert message.startswith(f"GPUSHARE_SIMULATE: at most {MAX_SIMULATED_GPUS} simulated GPUs, not {count}")
    assert "\n" not in message and len(message) < 300


def test_the_most_simulated_gpus_are_allowed() -> None:
    assert len(parse_simulate(f"{MAX_SIMULATED_GPUS - 1}x24GiB,8GiB", "x")) == MAX_SIMULATED_GPUS


def test_probe_for_picks_nvml_or_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_pynvml(monkeypatch, two_gpus())
    assert isinstance(probe_for(None), NvmlProbe)
    assert uuids(probe_for(None).probe()) == [A, B]
    assert probe_for("none").probe().gpus == ()
    assert [g.total_bytes for g in probe_for("2x8GiB").probe().gpus] == [8 * GiB, 8 * GiB]
    with pytest.raises(SettingError, match=r"^--gpushare-simulate: "):
        probe_for("8XB")
    with pytest.raises(SettingError, match=r"^gpushare_simulate in pytest.ini: "):
        probe_for("", source="gpushare_simulate in pytest.ini")
