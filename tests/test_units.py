"""Sizes: parsing every spelling, the error rules, formatting, percentages, per-GPU lists."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.units import (
    GiB,
    KiB,
    MemRequest,
    MiB,
    PerGpuSizes,
    TiB,
    format_size,
    parse_mem,
    parse_per_gpu_sizes,
    parse_size,
)

SOURCE = "--gpushare-safety"


def test_binary_constants() -> None:
    assert (KiB, MiB, GiB, TiB) == (2**10, 2**20, 2**30, 2**40)


# --- parse_size: what is accepted ------------------------------------------------------------

UNIT_SPELLINGS = {
    1: ["B", "b"],
    KiB: ["K", "k", "KB", "kb", "Kb", "KiB", "kib", "KIB"],
    MiB: ["M", "m", "MB", "mb", "MiB", "mib", "MIB"],
    GiB: ["G", "g", "GB", "gb", "GiB", "gib", "GIB", "gIb"],
    TiB: ["T", "t", "TB", "tb", "TiB", "tib", "TIB"],
}


@pytest.mark.parametrize(
    ("unit", "spelling"),
    [(unit, spelling) for unit, spellings in UNIT_SPELLINGS.items() for spelling in spellings],
)
def test_every_unit_spelling_is_binary(unit: int, spelling: str) -> None:
    assert parse_size(f"3{spelling}", SOURCE) == 3 * unit
    assert parse_size(f"3 {spelling}", SOURCE) == 3 * unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9GiB", 9 * GiB),
        ("1GB", GiB),  # as nvidia-smi counts: GB is GiB
        ("1.5 gb", GiB + GiB // 2),
        ("0.5GiB", 512 * MiB),
        (".5G", 512 * MiB),
        ("5.GiB", 5 * GiB),
        ("512M", 512 * MiB),
        ("4096", 4096),
        ("  12 GiB  ", 12 * GiB),
        ("\t2MiB\n", 2 * MiB),
        ("1e3", 1000),
        ("1E1KiB", 10 * KiB),
        ("2.5e-1GiB", GiB // 4),
        ("0", 0),
        ("0GiB", 0),
        ("1.0000001B", 1),
    ],
)
def test_size_strings(text: str, expected: int) -> None:
    assert parse_size(text, SOURCE) == expected


def test_ints_are_bytes_and_exact() -> None:
    assert parse_size(4096, SOURCE) == 4096
    assert parse_size(0, SOURCE) == 0
    big = 2**60 + 1  # beyond a float's 53 bits: not one byte may be lost
    assert parse_size(big, SOURCE) == big
    assert parse_size(10**30, SOURCE) == 10**30


def test_floats_are_bytes_rounded() -> None:
    assert parse_size(1073741824.0, SOURCE) == GiB  # how a native TOML float arrives
    assert parse_size(1.6, SOURCE) == 2
    assert isinstance(parse_size(1.6, SOURCE), int)


def test_fractions_of_a_unit_round_to_whole_bytes() -> None:
    assert parse_size("1.1KiB", SOURCE) == round(1.1 * 1024)
    assert isinstance(parse_size("0.3GiB", SOURCE), int)


# --- parse_size: what is refused, and the message -------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-1GiB", "a size cannot be negative"),
        (" -1", "a size cannot be negative"),
        (-1, "a size cannot be negative"),
        (-0.5, "a size cannot be negative"),
        ("nan", "not a size"),
        ("NaNGiB", "not a size"),
        (math.nan, "a size must be finite"),
        ("inf", "not a size"),
        (math.inf, "a size must be finite"),
        (-math.inf, "a size must be finite"),
        ("1e999", "a size must be finite"),
        ("1e308TiB", "too large"),
        ("", "not a size"),
        ("   ", "not a size"),
        ("GiB", "not a size"),
        ("12 GiB extra", "not a size"),
        ("1,5GiB", "not a size"),
        ("1.2.3GiB", "not a size"),
        ("0x10", "not a size"),
        ("12PiB", "unknown unit 'PiB'"),
        ("12 bytes", "unknown unit 'bytes'"),
        ("3Gi", "unknown unit 'Gi'"),
        (True, "not a size"),
        (None, "not a size"),
        ([1], "not a size"),
        (b"1GiB", "not a size"),
    ],
)
def test_bad_sizes_quote_value_and_source(value: object, why: str) -> None:
    with pytest.raises(SettingError) as info:
        parse_size(value, SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: ")
    assert why in message
    assert message.endswith(f": {value!r}")
    assert "\n" not in message


@pytest.mark.parametrize(
    "source", ["GPUSHARE_RESERVE", "gpushare_reserve in pytest.ini", "the marker on tests/test_x.py::test_y"]
)
def test_message_names_any_source(source: str) -> None:
    with pytest.raises(SettingError) as info:
        parse_size("-3GiB", source)
    assert str(info.value) == f"{source}: a size cannot be negative: '-3GiB'"


@pytest.mark.parametrize("zero", [0, 0.0, "0", "0GiB", "0.0 MiB", "0.4B"])
def test_zero_is_fine_unless_refused(zero: object) -> None:
    assert parse_size(zero, SOURCE) == 0
    with pytest.raises(SettingError, match=r"^--gpushare-worker-mem: must be larger than zero: "):
        parse_size(zero, "--gpushare-worker-mem", allow_zero=False)


@pytest.mark.parametrize("bare", [9, 9.0, "9", " 9 ", "1e9", 2**40])
def test_a_setting_size_needs_a_unit(bare: object) -> None:
    # 9 meant as 9GiB would be 9 bytes: a setting refuses a bare number, in any form.
    assert parse_size(bare, SOURCE) == round(float(bare))  # type: ignore[arg-type]
    with pytest.raises(SettingError) as info:
        parse_size(bare, "gpushare_worker_mem in pyproject.toml", need_unit=True)
    assert str(info.value) == (
        "gpushare_worker_mem in pyproject.toml: a size needs a unit such as GiB or MiB "
        f"(a bare number would mean bytes): {bare!r}"
    )


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (0.0, 0), ("0", 0), ("9B", 9), ("9GiB", 9 * GiB)])
def test_zero_and_sizes_with_a_unit_need_nothing_more(value: object, expected: int) -> None:
    assert parse_size(value, SOURCE, need_unit=True) == expected


def test_every_size_of_a_list_or_a_need_needs_its_unit() -> None:
    with pytest.raises(SettingError, match=r"^X: a size needs a unit .*: '12'$"):
        parse_per_gpu_sizes("1GiB,0:12", "X", need_unit=True)
    with pytest.raises(SettingError, match=r"^X: a size needs a unit .*: 4096$"):
        parse_mem(4096, "X", need_unit=True)
    assert parse_mem("50%", "X", need_unit=True) == MemRequest(percent=50.0)
    assert parse_per_gpu_sizes("0,1:0", "X", need_unit=True) == PerGpuSizes(0, {1: 0})


def test_setting_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_size("x", SOURCE)


# --- format_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (9 * GiB, "9.0GiB"),
        (512 * MiB, "512.0MiB"),
        (GiB + GiB // 2, "1.5GiB"),
        (3 * TiB, "3.0TiB"),
        (2048 * TiB, "2048.0TiB"),
        (KiB, "1.0KiB"),
        (1536, "1.5KiB"),
        (900, "900B"),
        (0, "0B"),
        (1, "1B"),
        (GiB - 1, "1.0GiB"),  # rounds up into the next unit, never "1024.0MiB"
        (MiB - 1, "1.0MiB"),
        (-2 * GiB, "-2.0GiB"),
        (9.0 * GiB, "9.0GiB"),
    ],
)
def test_format_size(n_bytes: float, text: str) -> None:
    assert format_size(n_bytes) == text


@pytest.mark.parametrize("text", ["9.0GiB", "512.0MiB", "1.5KiB", "3.0TiB", "900B"])
def test_format_then_parse_round_trips(text: str) -> None:
    assert format_size(parse_size(text, SOURCE)) == text


# --- parse_mem ------------------------------------------------------------------------------

MARKER = "the marker on tests/test_x.py::test_y"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4GiB", MemRequest(bytes=4 * GiB)),
        (1024, MemRequest(bytes=1024)),
        ("50%", MemRequest(percent=50.0)),
        (" 12.5 % ", MemRequest(percent=12.5)),
        ("100%", MemRequest(percent=100.0)),
        ("0.1%", MemRequest(percent=0.1)),
    ],
)
def test_parse_mem(value: object, expected: MemRequest) -> None:
    assert parse_mem(value, MARKER) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0%", "a percentage must lie in (0, 100]"),
        ("-5%", "a percentage must lie in (0, 100]"),
        ("101%", "a percentage must lie in (0, 100]"),
        ("nan%", "a percentage must lie in (0, 100]"),
        ("inf%", "a percentage must lie in (0, 100]"),
        ("%", "not a percentage"),
        ("half%", "not a percentage"),
        ("5GiB%", "not a percentage"),
        (0, "must be larger than zero"),
        ("0GiB", "must be larger than zero"),
        ("-1GiB", "a size cannot be negative"),
        ("lots", "not a size"),
        (False, "not a size"),
    ],
)
def test_bad_mem(value: object, why: str) -> None:
    with pytest.raises(SettingError) as info:
        parse_mem(value, MARKER)
    assert str(info.value).startswith(f"{MARKER}: {why}")
    assert str(info.value).endswith(repr(value))


def test_mem_request_resolves_against_the_device() -> None:
    assert MemRequest(bytes=3 * GiB).resolve(24 * GiB) == 3 * GiB
    assert MemRequest(percent=50).resolve(24 * GiB) == 12 * GiB
    assert MemRequest(percent=0.1).resolve(100) == 1  # never a zero-byte lease


def test_mem_request_describe() -> None:
    assert MemRequest(bytes=3 * GiB).describe() == "3.0GiB"
    assert MemRequest(percent=12.5).describe() == "12.5%"
    assert MemRequest(percent=50.0).describe() == "50%"


# --- parse_per_gpu_sizes -------------------------------------------------------------------

RESERVE = "--gpushare-reserve"


@pytest.mark.parametrize(
    ("value", "default", "per_index"),
    [
        ("12GiB", 12 * GiB, {}),
        ("0", 0, {}),
        (2 * GiB, 2 * GiB, {}),
        (1.5 * GiB, GiB + GiB // 2, {}),
        ("0:12GiB,1:2GiB", 0, {0: 12 * GiB, 1: 2 * GiB}),
        ("2GiB,0:12GiB", 2 * GiB, {0: 12 * GiB}),
        ("0:12GiB, 2GiB", 2 * GiB, {0: 12 * GiB}),
        (" 3 : 1 GiB ", 0, {3: GiB}),
        ("1:0", 0, {1: 0}),
    ],
)
def test_per_gpu_sizes(value: object, default: int, per_index: dict[int, int]) -> None:
    sizes = parse_per_gpu_sizes(value, RESERVE)
    assert sizes.default == default
    assert dict(sizes.per_index) == per_index


def test_per_gpu_for_index_falls_back_to_the_default() -> None:
    sizes = parse_per_gpu_sizes("1GiB,0:12GiB", RESERVE)
    assert sizes.for_index(0) == 12 * GiB
    assert sizes.for_index(1) == GiB
    assert sizes.for_index(7) == GiB


def test_per_gpu_sizes_are_immutable() -> None:
    sizes = parse_per_gpu_sizes("0:12GiB", RESERVE)
    assert isinstance(sizes.per_index, MappingProxyType)
    with pytest.raises(TypeError):
        sizes.per_index[1] = 5  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty entry in the list"),
        ("1GiB,,0:2GiB", "empty entry in the list"),
        ("0:1GiB,", "empty entry in the list"),
        ("x:1GiB", "GPU index 'x' is not a number"),
        (":1GiB", "GPU index '' is not a number"),
        ("-1:1GiB", "GPU index -1 is negative"),
        ("0:1GiB,0:2GiB", "GPU index 0 is given twice"),
        ("1GiB,2GiB", "more than one size for every GPU"),
        ("0:-1GiB", "a size cannot be negative"),
        ("0:lots", "not a size"),
        ("0:", "not a size"),
        ("-2GiB", "a size cannot be negative"),
        (-1, "a size cannot be negative"),
        (True, "not a size"),
    ],
)
def test_bad_per_gpu_sizes_name_the_source(value: object, why: str) -> None:
    with pytest.raises(SettingError) as info:
        parse_per_gpu_sizes(value, "GPUSHARE_RESERVE")
    assert str(info.value).startswith(f"GPUSHARE_RESERVE: {why}")


@pytest.mark.parametrize(
    ("sizes", "text"),
    [
        (PerGpuSizes(), "0B"),
        (PerGpuSizes(default=12 * GiB), "12.0GiB"),
        (PerGpuSizes(per_index=MappingProxyType({1: 2 * GiB, 0: 12 * GiB})), "0:12.0GiB,1:2.0GiB"),
        (PerGpuSizes(default=GiB, per_index=MappingProxyType({0: 12 * GiB})), "1.0GiB,0:12.0GiB"),
    ],
)
def test_per_gpu_describe(sizes: PerGpuSizes, text: str) -> None:
    assert sizes.describe() == text
    assert parse_per_gpu_sizes(text, RESERVE) == sizes
