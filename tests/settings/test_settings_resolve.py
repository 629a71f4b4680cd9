"""Settings resolved from their sources: command line > environment > ini > config file > default.

These drive :func:`~pytest_gpushare.settings.resolve` directly with one table of good and bad
values per setting, from every kind of source and every pair of them.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from settings_support import (
    GOOD,
    NAMES,
    ORDER,
    SOURCE_KINDS,
    by_kind,
    clear_gpushare_environment,
    label,
    resolve_from,
)

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings import OPTION_NAMES, Settings, cli_layer, env_layer, option_for, resolve
from pytest_gpushare.units import GiB, MemRequest, MiB, PerGpuSizes


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_gpushare_environment(monkeypatch)


# --- the table --------------------------------------------------------------------------------


def test_table_covers_every_field_once() -> None:
    fields = [option.field for option in OPTION_NAMES]
    assert len(fields) == len(set(fields))
    assert set(fields) == set(Settings.__dataclass_fields__) - {"sources", "notes"}


@pytest.mark.parametrize("option", OPTION_NAMES, ids=NAMES)
def test_names_follow_one_convention(option: Any) -> None:
    key = option.name.removeprefix("gpushare_")
    assert option.name == f"gpushare_{key}"
    assert option.flag == "--gpushare-" + key.replace("_", "-")
    assert option.short_flag == "--" + key.replace("_", "-")
    assert option.env == "GPUSHARE_" + key.upper()
    for spelling in (option.name, option.field, option.flag, option.short_flag, option.env):
        assert option_for(spelling) is option


def test_option_for_unknown_name() -> None:
    with pytest.raises(KeyError):
        option_for("gpushare_nonsense")


def test_the_table_holds_the_spec_names() -> None:
    assert [option.flag for option in OPTION_NAMES] == [
        "--gpushare-reserve",
        "--gpushare-safety",
        "--gpushare-worker-mem",
        "--gpushare-workers-per-gb",
        "--gpushare-max-workers",
        "--gpushare-default-mem",
        "--gpushare-context-mem",
        "--gpushare-ollama",
        "--gpushare-ollama-reserve",
        "--gpushare-fallback",
        "--gpushare-timeout",
        "--gpushare-policy",
        "--gpushare-ledger-dir",
        "--gpushare-simulate",
        "--gpushare-report",
        "--gpushare-config",
        "--gpushare-enforce",
        "--gpushare-dispatch",
        "--gpushare-adopt-marker",
        # beyond SPEC's table (issue 6): observed memory
        "--gpushare-observe-interval",
        "--gpushare-worker-mem-from",
        "--gpushare-framework-defaults",
        # beyond SPEC's table: the waiting notice's delay (SPEC: 10 s), so tests need not sit through it
        "--gpushare-notice-after",
    ]


# --- defaults ---------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    settings = resolve_from(tmp_path)
    assert settings.reserve == PerGpuSizes()
    assert settings.safety_bytes == GiB
    assert settings.worker_mem_bytes == 3 * GiB
    assert settings.workers_per_gb is None
    assert settings.max_workers is None
    assert settings.default_mem == MemRequest(bytes=3 * GiB)
    assert settings.context_mem_bytes == 512 * MiB
    assert settings.ollama == "auto"
    assert settings.ollama_reserve == PerGpuSizes()
    assert settings.fallback == "skip"
    assert settings.timeout_s == 900.0
    assert settings.policy == "spread"
    assert settings.ledger_dir is None
    assert settings.simulate is None
    assert settings.report is None
    assert settings.config_file is None
    assert settings.enforce is False
    assert settings.dispatch == "memory"
    assert settings.notes == ()
    assert set(settings.sources) == {option.field for option in OPTION_NAMES}
    assert all(source.startswith("default") for source in settings.sources.values())


def test_default_mem_follows_the_worker_mem(tmp_path: Path) -> None:
    settings = resolve_from(tmp_path, env={"gpushare_worker_mem": "5GiB"})
    assert settings.default_mem == MemRequest(bytes=5 * GiB)
    assert settings.sources["default_mem"] == "default (the worker mem)"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = resolve_from(tmp_path)
    with pytest.raises(AttributeError):
        settings.safety_bytes = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.sources["safety_bytes"] = "x"  # type: ignore[index]


# --- good values from every source -----------------------------------------------------------


def test_good_table_covers_every_option_but_the_config_file() -> None:
    assert set(GOOD) == set(NAMES) - {"gpushare_config"}


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_value_from_each_source(tmp_path: Path, name: str, kind: str) -> None:
    (raw, expected), _ = GOOD[name]
    settings = resolve_from(tmp_path, **by_kind(kind, name, raw))
    field = option_for(name).field
    assert getattr(settings, field) == expected
    assert settings.sources[field] == label(kind, name)


# --- bad values from every source ------------------------------------------------------------

# Per setting: bad raw text and a fragment of the reason. Any text is a path, so the path
# settings only have bad values on the command line (empty) or as native TOML (below).
BAD: dict[str, list[tuple[str, str]]] = {
    "gpushare_reserve": [
        ("-1GiB", "cannot be negative"),
        ("0:1GiB,0:2GiB", "given twice"),
        ("x:1G", "index"),
        ("12", "needs a unit"),
    ],
    "gpushare_safety": [
        ("-1GiB", "cannot be negative"),
        ("lots", "not a size"),
        ("nan", "not a size"),
        ("1073741824", "needs a unit"),
        ("1.5", "needs a unit"),
    ],
    "gpushare_worker_mem": [
        ("0", "larger than zero"),
        ("-3GiB", "cannot be negative"),
        ("inf", "not a size"),
        ("9", "needs a unit"),
        ("9B", "less than 1MiB, surely a unit mistake"),
        ("1023KiB", "less than 1MiB"),
    ],
    "gpushare_workers_per_gb": [
        ("0", "larger than zero"),
        ("-1", "larger than zero"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("many", "not a number"),
    ],
    "gpushare_max_workers": [
        ("0", "at least 1"),
        ("-2", "at least 1"),
        ("2.5", "whole number"),
        ("x", "whole"),
    ],
    "gpushare_default_mem": [
        ("0", "larger than zero"),
        ("0%", "percentage"),
        ("150%", "percentage"),
        ("4", "needs a unit"),
        ("512KiB", "less than 1MiB"),
    ],
    "gpushare_context_mem": [("-1", "cannot be negative"), ("1e999", "finite"), ("512", "needs a unit")],
    "gpushare_ollama": [
        ("ftp://ollama:11434", "not an http(s) URL"),
        ("false", "use off"),
        ("none", "use off"),
        ("host:port", "not an http(s) URL"),
        ("http://", "not an http(s) URL"),
        ("http://ollama box:11434", "not an http(s) URL"),
        ("ollama:99999", "not an http(s) URL"),
    ],
    "gpushare_ollama_reserve": [
        ("-1G", "cannot be negative"),
        ("1GiB,2GiB", "more than one size"),
        ("12", "needs a unit"),
    ],
    "gpushare_fallback": [("gpu", "use one of skip, cpu, fail")],
    "gpushare_timeout": [
        ("-1", "cannot be negative"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("soon", "not a number"),
    ],
    "gpushare_notice_after": [("-1", "cannot be negative"), ("soon", "not a number")],
    "gpushare_policy": [("random", "use one of spread, pack")],
    "gpushare_simulate": [
        ("0GiB", "larger than zero"),
        ("2x", "unknown unit"),
        ("24GiB:foo=1", "unknown GPU option"),
        ("24", "needs a unit"),
    ],
    "gpushare_enforce": [("maybe", "not a flag"), ("2", "not a flag")],
    "gpushare_dispatch": [("load", "use one of memory, xdist")],
    "gpushare_adopt_marker": [("maybe", "not a flag")],
    "gpushare_observe_interval": [("-1", "negative"), ("often", "not a number")],
    "gpushare_worker_mem_from": [("p50", "expected one of off, p95, max")],
    "gpushare_framework_defaults": [("maybe", "not a flag")],
}
BAD_CASES = [(name, raw, why) for name, cases in BAD.items() for raw, why in cases]


def test_bad_table_covers_every_option_with_text_values() -> None:
    assert set(BAD) == set(NAMES) - {"gpushare_config", "gpushare_ledger_dir", "gpushare_report"}


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize(("name", "raw", "why"), BAD_CASES)
def test_bad_value_from_each_source_names_it(
    tmp_path: Path, name: str, raw: str, why: str, kind: str
) -> None:
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, **by_kind(kind, name, raw))
    message = str(info.value)
    assert message.startswith(label(kind, name) + ": ")
    assert why in message
    assert repr(raw.strip()) in message or repr(raw) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name", ["gpushare_ledger_dir", "gpushare_report", "gpushare_config", "gpushare_safety"]
)
def test_an_empty_flag_is_an_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(SettingError, match=f"^{option_for(name).flag}: "):
        resolve_from(tmp_path, cli={name: ""})


@pytest.mark.parametrize("kind", ["env", "ini"])
@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_environment_or_ini_value_counts_as_unset(tmp_path: Path, kind: str, empty: str) -> None:
    settings = resolve_from(tmp_path, **by_kind(kind, "gpushare_safety", empty))
    assert settings.safety_bytes == GiB
    assert settings.sources["safety_bytes"] == "default"
    lower = resolve_from(tmp_path, env={"gpushare_safety": empty}, ini={"gpushare_safety": "3GiB"})
    assert lower.safety_bytes == 3 * GiB


def test_only_the_winning_value_is_parsed(tmp_path: Path) -> None:
    # A bad value that a higher source hides is never used, so it is no error.
    settings = resolve_from(tmp_path, cli={"gpushare_safety": "2GiB"}, env={"gpushare_safety": "-1"})
    assert settings.safety_bytes == 2 * GiB


# --- native TOML values (ini layer) ----------------------------------------------------------

NATIVE_GOOD: list[tuple[str, object, object]] = [
    # A size needs a unit, so the only native number a size takes is zero.
    ("gpushare_safety", 0, 0),
    ("gpushare_safety", 0.0, 0),
    ("gpushare_reserve", 0, PerGpuSizes()),
    ("gpushare_ollama_reserve", 0, PerGpuSizes()),
    ("gpushare_context_mem", 0, 0),
    ("gpushare_workers_per_gb", 0.25, 0.25),
    ("gpushare_workers_per_gb", 1, 1.0),
    ("gpushare_max_workers", 4, 4),
    ("gpushare_timeout", 30, 30.0),
    ("gpushare_timeout", 0.5, 0.5),
    ("gpushare_enforce", True, True),
    ("gpushare_enforce", False, False),
]


@pytest.mark.parametrize(("name", "value", "expected"), NATIVE_GOOD)
def test_native_toml_values(tmp_path: Path, name: str, value: object, expected: object) -> None:
    settings = resolve_from(tmp_path, ini={name: value})
    assert getattr(settings, option_for(name).field) == expected


NATIVE_BAD: list[tuple[str, object, str]] = [
    ("gpushare_safety", -1, "cannot be negative"),
    ("gpushare_safety", True, "not a size"),
    (
        "gpushare_safety",
        1073741824,
        "a size needs a unit such as GiB or MiB (a bare number would mean bytes)",
    ),
    ("gpushare_safety", 2.5, "needs a unit"),
    ("gpushare_reserve", 2 * GiB, "needs a unit"),
    ("gpushare_ollama_reserve", 12, "needs a unit"),
    ("gpushare_worker_mem", 9, "needs a unit"),
    ("gpushare_default_mem", GiB, "needs a unit"),
    ("gpushare_context_mem", 512, "needs a unit"),
    ("gpushare_worker_mem", 0, "larger than zero"),
    ("gpushare_workers_per_gb", False, "not a number"),
    ("gpushare_workers_per_gb", math.inf, "finite"),
    ("gpushare_max_workers", 2.5, "whole number"),
    ("gpushare_max_workers", 0, "at least 1"),
    ("gpushare_max_workers", True, "whole number"),
    ("gpushare_timeout", -5, "cannot be negative"),
    ("gpushare_ollama", 11434, "use auto, off"),
    ("gpushare_fallback", True, "use one of"),
    ("gpushare_policy", 1, "use one of"),
    ("gpushare_dispatch", True, "use one of"),
    ("gpushare_ledger_dir", 5, "not a path"),
    ("gpushare_report", False, "not a path"),
    ("gpushare_config", 1.5, "not a path"),
    ("gpushare_simulate", 24, "not a GPU spec"),
    ("gpushare_enforce", 2, "not a flag"),
]


@pytest.mark.parametrize(("name", "value", "why"), NATIVE_BAD)
def test_bad_native_toml_values(tmp_path: Path, name: str, value: object, why: str) -> None:
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, ini={name: value})
    assert str(info.value) == f"{name} in tox.ini: {str(info.value).split(': ', 2)[1]}: {value!r}"
    assert why in str(info.value)


# --- precedence -------------------------------------------------------------------------------


@pytest.mark.parametrize(("higher", "lower"), list(itertools.combinations(ORDER, 2)))
@pytest.mark.parametrize("name", sorted(GOOD))
def test_precedence_for_each_pair_of_sources(tmp_path: Path, name: str, higher: str, lower: str) -> None:
    (raw_a, expected_a), (raw_b, expected_b) = GOOD[name]
    field = option_for(name).field
    both = {**by_kind(higher, name, raw_a), **by_kind(lower, name, raw_b)}
    settings = resolve_from(tmp_path, **both)
    assert getattr(settings, field) == expected_a
    assert settings.sources[field] == label(higher, name)
    # and the other way round, so neither value wins by accident
    swapped = {**by_kind(higher, name, raw_b), **by_kind(lower, name, raw_a)}
    settings = resolve_from(tmp_path, **swapped)
    assert getattr(settings, field) == expected_b


# --- layers --------------------------------------------------------------------------------------


def test_cli_layer_labels_with_either_spelling() -> None:
    values = {"gpushare_safety": "2GiB", "gpushare_report": None}
    assert cli_layer(values) == {"gpushare_safety": ("2GiB", "--gpushare-safety")}
    assert cli_layer(values, short=True) == {"gpushare_safety": ("2GiB", "--safety")}


def test_env_layer_reads_only_our_variables() -> None:
    environ = {"GPUSHARE_SAFETY": "2GiB", "GPUSHARE_POLICY": "", "GPUSHARE_NONSENSE": "1", "HOME": "/"}
    assert env_layer(environ) == {
        "gpushare_safety": ("2GiB", "GPUSHARE_SAFETY"),
        "gpushare_policy": ("", "GPUSHARE_POLICY"),  # resolve() treats it as unset
    }


def test_resolve_reads_the_environment_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSHARE_SAFETY", "7GiB")
    assert resolve({}, {}, {}, cwd=str(tmp_path)).safety_bytes == GiB
    assert resolve({}, os.environ, {}, cwd=str(tmp_path)).safety_bytes == 7 * GiB


def test_resolving_loads_neither_nvml_nor_pytest(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pytest_gpushare.settings import resolve\n"
        f"resolve({{}}, {{'GPUSHARE_SIMULATE': '2x24GiB'}}, {{}}, cwd={str(tmp_path)!r})\n"
        "assert 'pynvml' not in sys.modules\n"
        "assert 'pytest' not in sys.modules and '_pytest' not in sys.modules, 'pytest loaded'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
