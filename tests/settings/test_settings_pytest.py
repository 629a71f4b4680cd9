"""Settings through pytest itself: ini files of every kind, native TOML values, ``-o``,
``addopts``, ``--help`` and exit code 4.

The pytester runs load ``add_options`` from a conftest and block the installed plugin
(``-p no:gpushare``), so they test :mod:`pytest_gpushare.settings` alone.
"""

from __future__ import annotations

import json

import pytest
from settings_support import clear_gpushare_environment

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings import OPTION_NAMES, Settings
from pytest_gpushare.settings.pytest_options import resolve_settings
from pytest_gpushare.units import GiB, MiB, PerGpuSizes


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_gpushare_environment(monkeypatch)


CONFTEST = """
import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings.pytest_options import add_options, resolve_settings


def pytest_addoption(parser):
    add_options(parser)


def pytest_configure(config):
    try:
        resolve_settings(config)
    except SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
"""

# The installed plugin registers the same options; these runs test this module on its own.
NO_PLUGIN = ("-p", "no:gpushare")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


def _settings(pytester: pytest.Pytester, *args: str) -> Settings:
    # parseconfig, not parseconfigure: the conftest's pytest_configure would raise first.
    return resolve_settings(pytester.parseconfig(*NO_PLUGIN, *args))


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("pytest.ini", "[pytest]\ngpushare_safety = 2GiB\n"),
        ("tox.ini", "[pytest]\ngpushare_safety = 2GiB\n"),
        ("setup.cfg", "[tool:pytest]\ngpushare_safety = 2GiB\n"),
        ("pytest.toml", '[pytest]\ngpushare_safety = "2GiB"\n'),
        ("pyproject.toml", '[tool.pytest]\ngpushare_safety = "2GiB"\n'),
        ("pyproject.toml", '[tool.pytest.ini_options]\ngpushare_safety = "2 GiB"\n'),
    ],
)
def test_every_kind_of_ini_file(project: pytest.Pytester, filename: str, text: str) -> None:
    (project.path / filename).write_text(text)
    settings = _settings(project)
    assert settings.safety_bytes == 2 * GiB
    assert settings.sources["safety_bytes"] == f"gpushare_safety in {filename}"


@pytest.mark.parametrize(
    ("filename", "text", "value"),
    [
        # [tool.pytest.ini_options] hands every value over as text.
        ("pyproject.toml", "[tool.pytest.ini_options]\ngpushare_worker_mem = 9\n", "'9'"),
        ("pyproject.toml", "[tool.pytest]\ngpushare_worker_mem = 9.5\n", "9.5"),
        ("pytest.toml", "[pytest]\ngpushare_worker_mem = 9\n", "9"),
        ("pytest.ini", "[pytest]\ngpushare_worker_mem = 9\n", "'9'"),
    ],
)
def test_a_bare_number_for_a_size_is_refused_naming_the_key(
    project: pytest.Pytester, filename: str, text: str, value: str
) -> None:
    # It would mean 9 bytes, and the header would plan floor(49.0GiB / 9B) workers.
    (project.path / filename).write_text(text)
    with pytest.raises(SettingError) as info:
        _settings(project)
    assert str(info.value) == (
        f"gpushare_worker_mem in {filename}: a size needs a unit such as GiB or MiB "
        f"(a bare number would mean bytes): {value}"
    )


def test_native_toml_values_of_every_kind(project: pytest.Pytester) -> None:
    (project.path / "pytest.toml").write_text(
        "[pytest]\n"
        "gpushare_reserve = 0\n"
        "gpushare_workers_per_gb = 0.25\n"
        "gpushare_max_workers = 3\n"
        "gpushare_timeout = 30\n"
        "gpushare_enforce = true\n"
        'gpushare_ollama = "off"\n'
        'gpushare_simulate = "2x24GiB"\n'
    )
    settings = _settings(project)
    assert settings.reserve == PerGpuSizes(0)
    assert settings.workers_per_gb == 0.25
    assert settings.max_workers == 3
    assert settings.timeout_s == 30.0
    assert settings.enforce is True
    assert settings.ollama == "off"
    assert settings.simulate == "2x24GiB"


def test_bad_native_toml_value_names_the_file(project: pytest.Pytester) -> None:
    (project.path / "pytest.toml").write_text("[pytest]\ngpushare_max_workers = 2.5\n")
    with pytest.raises(
        SettingError, match=r"^gpushare_max_workers in pytest\.toml: not a whole number: 2\.5$"
    ):
        _settings(project)


def test_toml_value_of_a_type_pytest_refuses(project: pytest.Pytester) -> None:
    (project.path / "pytest.toml").write_text("[pytest]\ngpushare_safety = [1, 2]\n")
    with pytest.raises(SettingError, match=r"pytest\.toml: config option 'gpushare_safety'"):
        _settings(project)


def test_a_list_in_ini_options_mode_is_refused_without_a_warning(
    project: pytest.Pytester, recwarn: pytest.WarningsRecorder
) -> None:
    # pytest warns (an error under -W error) when a string option gets a list; we refuse it.
    (project.path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ngpushare_safety = ["1"]\n')
    with pytest.raises(SettingError, match=r"^gpushare_safety in pyproject\.toml: not a size: \['1'\]$"):
        _settings(project)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_command_line_beats_environment_beats_ini(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makeini("[pytest]\ngpushare_safety = 3GiB\ngpushare_policy = pack\ngpushare_timeout = 5\n")
    monkeypatch.setenv("GPUSHARE_SAFETY", "2GiB")
    monkeypatch.setenv("GPUSHARE_POLICY", "spread")
    settings = _settings(project, "--gpushare-safety=1GiB")
    assert (settings.safety_bytes, settings.sources["safety_bytes"]) == (GiB, "--gpushare-safety")
    assert (settings.policy, settings.sources["policy"]) == ("spread", "GPUSHARE_POLICY")
    assert (settings.timeout_s, settings.sources["timeout_s"]) == (5.0, "gpushare_timeout in tox.ini")


def test_dash_o_counts_as_command_line(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.makeini("[pytest]\ngpushare_safety = 3GiB\n")
    monkeypatch.setenv("GPUSHARE_SAFETY", "1GiB")
    settings = _settings(project, "-o", "gpushare_safety=2GiB")
    assert (settings.safety_bytes, settings.sources["safety_bytes"]) == (2 * GiB, "-o gpushare_safety")
    # the explicit flag is the more specific of the two
    settings = _settings(project, "-o", "gpushare_safety=2GiB", "--gpushare-safety", "4GiB")
    assert (settings.safety_bytes, settings.sources["safety_bytes"]) == (4 * GiB, "--gpushare-safety")
    # `-o name=` clears the ini value, and then the environment has its say
    settings = _settings(project, "-o", "gpushare_safety=")
    assert (settings.safety_bytes, settings.sources["safety_bytes"]) == (GiB, "GPUSHARE_SAFETY")


def test_dash_o_bad_value_names_dash_o(project: pytest.Pytester) -> None:
    with pytest.raises(
        SettingError, match=r"^-o gpushare_timeout: a number of seconds cannot be negative: '-1'$"
    ):
        _settings(project, "-o", "gpushare_timeout=-1")


def test_dash_o_turns_enforce_off_over_the_environment(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSHARE_ENFORCE", "yes")
    assert _settings(project).enforce is True
    assert _settings(project, "-o", "gpushare_enforce=0").enforce is False
    assert _settings(project, "--gpushare-enforce").enforce is True
    monkeypatch.setenv("GPUSHARE_ENFORCE", "off")
    assert _settings(project, "--gpushare-enforce").sources["enforce"] == "--gpushare-enforce"


def test_addopts_counts_as_command_line(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.makeini(
        "[pytest]\naddopts = --gpushare-safety=2GiB -o gpushare_policy=pack\n"
        "gpushare_policy = spread\ngpushare_timeout = 5\n"
    )
    monkeypatch.setenv("GPUSHARE_SAFETY", "1GiB")
    monkeypatch.setenv("GPUSHARE_POLICY", "spread")
    monkeypatch.setenv("PYTEST_ADDOPTS", "--gpushare-timeout=7")
    monkeypatch.setenv("GPUSHARE_TIMEOUT", "9")
    settings = _settings(project)
    assert (settings.safety_bytes, settings.sources["safety_bytes"]) == (2 * GiB, "--gpushare-safety")
    assert (settings.policy, settings.sources["policy"]) == ("pack", "-o gpushare_policy")
    assert (settings.timeout_s, settings.sources["timeout_s"]) == (7.0, "--gpushare-timeout")


def test_config_file_named_in_the_ini_file(project: pytest.Pytester) -> None:
    (project.path / "ci").mkdir()
    (project.path / "ci" / "perf.json").write_text(
        json.dumps(
            {"gpu_resource_management": {"safety_buffer_mb": 512, "max_workers_per_gb": 0.5, "typo": 1}}
        )
    )
    project.makeini("[pytest]\ngpushare_config = ci/perf.json\ngpushare_workers_per_gb = 2\n")
    settings = _settings(project)
    assert settings.safety_bytes == 512 * MiB
    assert settings.sources["safety_bytes"] == f"safety_buffer_mb in {project.path / 'ci' / 'perf.json'}"
    assert settings.workers_per_gb == 2.0  # the ini file beats the config file
    assert settings.notes == (
        f"{project.path / 'ci' / 'perf.json'}: unknown key 'typo' in gpu_resource_management, ignored",
    )


def test_bad_flag_is_a_usage_error_in_one_line(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(*NO_PLUGIN, "--gpushare-safety=-1GiB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.errlines if line] == [
        "ERROR: --gpushare-safety: a size cannot be negative: '-1GiB'"
    ]


def test_bad_environment_is_a_usage_error(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSHARE_MAX_WORKERS", "0")
    result = project.runpytest_subprocess(*NO_PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.errlines if line] == [
        "ERROR: GPUSHARE_MAX_WORKERS: must be at least 1: '0'"
    ]


def test_bad_ini_value_is_a_usage_error(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\ngpushare_fallback = gpu\n")
    result = project.runpytest(*NO_PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: gpushare_fallback in tox.ini: use one of skip, cpu, fail: 'gpu'"])


def test_all_options_are_in_one_gpushare_group(project: pytest.Pytester) -> None:
    result = project.runpytest(*NO_PLUGIN, "--help")
    assert result.ret == pytest.ExitCode.OK
    lines = result.outlines
    start = lines.index("GPU memory sharing (pytest-gpushare):")
    end = lines.index("", start)
    group = "\n".join(lines[start:end])
    for option in OPTION_NAMES:
        assert f"  {option.flag}" in group
        assert option.env in group.replace("\n", " ").replace("  ", "")
    assert sum("GPU memory sharing" in line for line in lines) == 1
    outside = "\n".join(lines[:start] + lines[end:])
    assert "--gpushare-" not in outside.split("[pytest] configuration options")[0]


def test_every_ini_name_is_registered(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\n" + "".join(f"{option.name} =\n" for option in OPTION_NAMES))
    project.makepyfile("def test_ok():\n    pass\n")
    result = project.runpytest(*NO_PLUGIN, "--strict-config", "-W", "error")
    assert result.ret == pytest.ExitCode.OK
    assert "Unknown config option" not in result.stdout.str() + result.stderr.str()
    help_text = project.runpytest(*NO_PLUGIN, "--help").stdout.str()
    for option in OPTION_NAMES:
        assert f"  {option.name} (" in help_text


def test_before_pytest_9_2_ini_values_are_strings(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Older pytest refuses union ini types: the options are then plain strings.
    monkeypatch.setattr(pytest, "version_tuple", (9, 1, 0))
    project.makeini("[pytest]\ngpushare_safety = 2GiB\ngpushare_enforce = yes\n")
    settings = _settings(project)
    assert (settings.safety_bytes, settings.enforce) == (2 * GiB, True)
    (project.path / "tox.ini").unlink()
    (project.path / "pytest.toml").write_text("[pytest]\ngpushare_safety = 5\n")
    with pytest.raises(SettingError, match=r"config option 'gpushare_safety' expects a string"):
        _settings(project)
