"""The config file (``--gpushare-config``): its keys, where they rank, and what makes it unusable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from settings_support import GOOD, ORDER, by_kind, clear_gpushare_environment, label, resolve_from

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings import CONFIG_FILE_KEYS, option_for, read_config_file, resolve
from pytest_gpushare.units import GiB, MiB, PerGpuSizes


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_gpushare_environment(monkeypatch)


# Per setting the config file feeds: (key, JSON value, what it becomes).
FILE_VALUES: dict[str, tuple[str, object, object]] = {
    "gpushare_ollama_reserve": ("ollama_vram_reservation_mb", 12288, PerGpuSizes(12 * GiB)),
    "gpushare_safety": ("safety_buffer_mb", 256, 256 * MiB),
    "gpushare_worker_mem": ("min_vram_per_worker_gb", 2.5, 2 * GiB + GiB // 2),
    "gpushare_workers_per_gb": ("max_workers_per_gb", 0.5, 0.5),
    "gpushare_ollama": ("enable_ollama_detection", False, "off"),
    "gpushare_fallback": ("fallback_to_cpu_when_constrained", True, "cpu"),
}


def test_file_values_cover_every_config_key() -> None:
    assert {key for key, _, _ in FILE_VALUES.values()} == set(CONFIG_FILE_KEYS)
    assert {name for name, _ in CONFIG_FILE_KEYS.values()} == set(FILE_VALUES)


@pytest.mark.parametrize("name", sorted(FILE_VALUES))
def test_config_file_beats_the_default(tmp_path: Path, name: str) -> None:
    key, value, expected = FILE_VALUES[name]
    settings = resolve_from(tmp_path, config={key: value})
    field = option_for(name).field
    assert getattr(settings, field) == expected
    assert settings.sources[field] == f"{key} in {tmp_path / 'performance_config.json'}"


@pytest.mark.parametrize("higher", ORDER)
@pytest.mark.parametrize("name", sorted(FILE_VALUES))
def test_every_source_beats_the_config_file(tmp_path: Path, name: str, higher: str) -> None:
    key, value, file_expected = FILE_VALUES[name]
    (raw_a, expected_a), (raw_b, expected_b) = GOOD[name]
    raw, expected = (raw_b, expected_b) if expected_a == file_expected else (raw_a, expected_a)
    settings = resolve_from(tmp_path, config={key: value}, **by_kind(higher, name, raw))
    field = option_for(name).field
    assert getattr(settings, field) == expected != file_expected
    assert settings.sources[field] == label(higher, name)


def test_the_example_of_the_spec_as_a_config_file(tmp_path: Path) -> None:
    settings = resolve_from(
        tmp_path,
        config={
            "ollama_vram_reservation_mb": 12288,
            "safety_buffer_mb": 1024,
            "min_vram_per_worker_gb": 3,
            "max_workers_per_gb": 0.25,
            "enable_ollama_detection": True,
            "fallback_to_cpu_when_constrained": False,
        },
    )
    assert settings.ollama_reserve == PerGpuSizes(12 * GiB)
    assert settings.safety_bytes == GiB
    assert settings.worker_mem_bytes == 3 * GiB
    assert settings.workers_per_gb == 0.25
    # true / false here only confirm the defaults
    assert (settings.ollama, settings.sources["ollama"]) == ("auto", "default")
    assert (settings.fallback, settings.sources["fallback"]) == ("skip", "default")
    assert settings.notes == ()


# --- the config file --------------------------------------------------------------------------


def _write(tmp_path: Path, document: object, name: str = "perf.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("kind", ["cli", "env", "ini"])
def test_config_path_from_each_source(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, {"gpu_resource_management": {"safety_buffer_mb": 2048}})
    settings = resolve_from(tmp_path, **by_kind(kind, "gpushare_config", str(path)))
    assert settings.config_file == str(path)
    assert settings.sources["config_file"] == label(kind, "gpushare_config")
    assert settings.safety_bytes == 2 * GiB


def test_config_path_precedence(tmp_path: Path) -> None:
    first = _write(tmp_path, {"gpu_resource_management": {"safety_buffer_mb": 1}}, "first.json")
    second = _write(tmp_path, {"gpu_resource_management": {"safety_buffer_mb": 2}}, "second.json")
    third = _write(tmp_path, {"gpu_resource_management": {"safety_buffer_mb": 3}}, "third.json")
    settings = resolve_from(
        tmp_path,
        cli={"gpushare_config": str(first)},
        env={"gpushare_config": str(second)},
        ini={"gpushare_config": str(third)},
    )
    assert settings.safety_bytes == MiB
    settings = resolve_from(
        tmp_path, env={"gpushare_config": str(second)}, ini={"gpushare_config": str(third)}
    )
    assert settings.safety_bytes == 2 * MiB


def test_relative_paths_from_the_ini_file_start_at_its_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "ci").mkdir(parents=True)
    _write(project / "ci", {"gpu_resource_management": {"safety_buffer_mb": 64}})
    elsewhere = tmp_path / "elsewhere"
    ini = {
        "gpushare_config": ("ci/perf.json", "gpushare_config in tox.ini"),
        "gpushare_report": ("out/report.json", "gpushare_report in tox.ini"),
        "gpushare_ledger_dir": ("../ledgers", "gpushare_ledger_dir in tox.ini"),
    }
    settings = resolve({}, {}, ini, ini_dir=str(project), cwd=str(elsewhere))
    assert settings.config_file == str(project / "ci" / "perf.json")
    assert settings.report == str(project / "out" / "report.json")
    assert settings.ledger_dir == str(tmp_path / "ledgers")
    assert settings.safety_bytes == 64 * MiB


def test_relative_paths_from_command_line_and_environment_start_at_cwd(tmp_path: Path) -> None:
    settings = resolve(
        {"gpushare_report": ("r.json", "--gpushare-report")},
        {"GPUSHARE_LEDGER_DIR": "ledgers"},
        {},
        ini_dir="/somewhere/else",
        cwd=str(tmp_path),
    )
    assert settings.report == str(tmp_path / "r.json")
    assert settings.ledger_dir == str(tmp_path / "ledgers")


def test_home_is_expanded_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = resolve({}, {"GPUSHARE_REPORT": "~/r.json"}, {}, cwd="/")
    assert settings.report == str(tmp_path / "r.json")


def test_unknown_keys_become_one_note_each(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "gpu_resource_management": {"safety_buffer_mb": 100, "gpu_ids": [0], "prefer_mig": True},
            "other_section": {"ignored": "entirely"},
        },
    )
    settings = resolve_from(tmp_path, env={"gpushare_config": str(path)})
    assert settings.safety_bytes == 100 * MiB
    assert settings.notes == (
        f"{path}: unknown key 'gpu_ids' in gpu_resource_management, ignored",
        f"{path}: unknown key 'prefer_mig' in gpu_resource_management, ignored",
    )


def test_unknown_keys_are_no_python_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    resolve_from(tmp_path, config={"mystery": 1})
    assert len(recwarn) == 0


def test_null_counts_as_absent(tmp_path: Path) -> None:
    settings = resolve_from(tmp_path, config={"max_workers_per_gb": None, "safety_buffer_mb": None})
    assert settings.workers_per_gb is None
    assert settings.safety_bytes == GiB
    assert settings.notes == ()


def test_config_file_values_are_checked_even_when_a_higher_source_wins(tmp_path: Path) -> None:
    # The user asked for the file: a broken one is an error, not silently half-read.
    with pytest.raises(SettingError, match=r"^safety_buffer_mb in "):
        resolve_from(tmp_path, cli={"gpushare_safety": "1GiB"}, config={"safety_buffer_mb": -1})


CONFIG_BAD: list[tuple[str, object, str]] = [
    ("ollama_vram_reservation_mb", -1, "expected a number of MiB"),
    ("ollama_vram_reservation_mb", "12GiB", "expected a number of MiB"),
    ("ollama_vram_reservation_mb", True, "expected a number of MiB"),
    ("safety_buffer_mb", -5, "expected a number of MiB"),
    ("safety_buffer_mb", "1024", "expected a number of MiB"),
    ("safety_buffer_mb", [1024], "expected a number of MiB"),
    ("min_vram_per_worker_gb", 0, "larger than 0"),
    ("min_vram_per_worker_gb", -1, "larger than 0"),
    ("min_vram_per_worker_gb", "3", "larger than 0"),
    ("max_workers_per_gb", 0, "larger than 0"),
    ("max_workers_per_gb", -0.5, "larger than 0"),
    ("max_workers_per_gb", "0.25", "larger than 0"),
    ("enable_ollama_detection", "false", "expected true or false"),
    ("enable_ollama_detection", 0, "expected true or false"),
    ("fallback_to_cpu_when_constrained", "yes", "expected true or false"),
    ("fallback_to_cpu_when_constrained", 1, "expected true or false"),
]


def test_config_bad_covers_every_key() -> None:
    assert {key for key, _, _ in CONFIG_BAD} == set(CONFIG_FILE_KEYS)


def test_a_worker_mem_below_a_mib_from_the_config_file_is_refused(tmp_path: Path) -> None:
    # 0.0005 GiB is 512KiB: a unit mistake (MiB meant), never a worker's budget.
    path = tmp_path / "performance_config.json"
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, config={"min_vram_per_worker_gb": 0.0005})
    assert str(info.value).startswith(
        f"min_vram_per_worker_gb in {path}: less than 1MiB, surely a unit mistake"
    )


@pytest.mark.parametrize(("key", "value", "why"), CONFIG_BAD)
def test_bad_config_values_name_key_and_file(tmp_path: Path, key: str, value: object, why: str) -> None:
    path = tmp_path / "performance_config.json"
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, config={key: value})
    assert str(info.value) == f"{key} in {path}: {str(info.value).split(': ', 2)[1]}: {value!r}"
    assert why in str(info.value)


def test_non_finite_json_numbers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "perf.json"
    path.write_text('{"gpu_resource_management": {"safety_buffer_mb": NaN}}')
    with pytest.raises(SettingError, match=r"^safety_buffer_mb in .*perf\.json: expected a number of MiB"):
        resolve_from(tmp_path, env={"gpushare_config": str(path)})


@pytest.mark.parametrize("kind", ["cli", "env", "ini"])
def test_missing_config_file_names_its_source(tmp_path: Path, kind: str) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, **by_kind(kind, "gpushare_config", missing))
    why = "cannot read the config file (No such file or directory)"
    assert str(info.value) == f"{label(kind, 'gpushare_config')}: {why}: {missing!r}"


def test_a_folder_is_no_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=r"^GPUSHARE_CONFIG: cannot read the config file"):
        resolve_from(tmp_path, env={"gpushare_config": str(tmp_path)})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (
            "{not json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2",
        ),
        ("", "not valid JSON"),
        ("[" * 200_000 + "]" * 200_000, "not valid JSON: nested too deeply"),
        ("[]", "no 'gpu_resource_management' object"),
        ('{"other": {}}', "no 'gpu_resource_management' object"),
    ],
)
def test_unusable_config_file_names_the_file(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "perf.json"
    path.write_text(text)
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, cli={"gpushare_config": str(path)})
    assert str(info.value).startswith(f"{path} (from --gpushare-config): {why}")


def test_config_object_must_be_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path, {"gpu_resource_management": [1, 2]})
    with pytest.raises(SettingError) as info:
        resolve_from(tmp_path, env={"gpushare_config": str(path)})
    assert str(info.value) == f"gpu_resource_management in {path}: expected a JSON object: [1, 2]"


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "perf.json"
    path.write_bytes(b'{"gpu_resource_management": {"\xff": 1}}')
    with pytest.raises(SettingError, match=r"^GPUSHARE_CONFIG: the config file is not UTF-8 text"):
        resolve_from(tmp_path, env={"gpushare_config": str(path)})


def test_read_config_file_returns_a_layer(tmp_path: Path) -> None:
    path = _write(tmp_path, {"gpu_resource_management": {"safety_buffer_mb": 10, "x": 1}})
    layer, notes = read_config_file(str(path), "--gpushare-config")
    assert layer == {"gpushare_safety": (f"{10 * MiB}B", f"safety_buffer_mb in {path}")}
    assert len(notes) == 1
