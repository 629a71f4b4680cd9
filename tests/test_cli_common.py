"""What every ``gpushare`` command shares: the settings flags in either spelling, the version."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_gpushare import __version__
from pytest_gpushare.commands import main
from pytest_gpushare.commands.common import SettingsArgs, take_settings
from pytest_gpushare.errors import SettingError


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_the_version_in_either_spelling(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    assert capsys.readouterr().out == f"gpushare {__version__}\n"


def test_the_version_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_gpushare", "-V"], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (0, f"gpushare {__version__}\n")


def test_settings_are_taken_in_either_spelling_and_named_as_typed() -> None:
    args = ["--safety", "2GiB", "-c", "x.ini", "--gpushare-reserve=1GiB", "--simulate=24GiB", "tests/"]
    assert take_settings(args) == SettingsArgs(
        plugin_args=["--gpushare-safety=2GiB", "--gpushare-reserve=1GiB", "--gpushare-simulate=24GiB"],
        rest=["-c", "x.ini", "tests/"],
        spellings={
            "gpushare_safety": "--safety",
            "gpushare_reserve": "--gpushare-reserve",
            "gpushare_simulate": "--simulate",
        },
    )


def test_a_value_that_starts_with_a_dash_is_the_value() -> None:
    # "--safety -3GiB" is a negative size, which the setting refuses by name; not a missing value.
    assert take_settings(["--safety", "-3GiB"]).plugin_args == ["--gpushare-safety=-3GiB"]


def test_flags_take_an_explicit_true_or_false() -> None:
    assert take_settings(["--enforce"]).plugin_args == ["--gpushare-enforce"]
    assert take_settings(["--enforce=yes"]).plugin_args == ["--gpushare-enforce"]
    # False must still beat GPUSHARE_ENFORCE=1: -o counts as command line.
    assert take_settings(["--gpushare-enforce=off"]).plugin_args == ["-o", "gpushare_enforce=off"]


def test_nothing_after_a_double_dash_is_read() -> None:
    taken = take_settings(["--mem", "1GiB", "--", "python", "--safety", "x"])
    assert taken.plugin_args == []
    assert taken.rest == ["--mem", "1GiB", "--", "python", "--safety", "x"]


def test_only_the_settings_a_command_takes() -> None:
    taken = take_settings(["--safety", "1GiB", "--simulate", "24GiB"], only=("gpushare_simulate",))
    assert (taken.plugin_args, taken.rest) == (["--gpushare-simulate=24GiB"], ["--safety", "1GiB"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--safety"], "--safety: expects a value (SIZE)"),
        (["--gpushare-safety", "--simulate", "24GiB"], "--gpushare-safety: expects a value (SIZE)"),
        (["--simulate", "--"], "--simulate: expects a value (SPEC)"),
        (
            ["--enforce=maybe"],
            "--enforce: not a flag (use 1/0, true/false, yes/no or on/off): 'maybe'",
        ),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_as_typed(args: list[str], message: str) -> None:
    with pytest.raises(SettingError) as info:
        take_settings(args)
    assert str(info.value) == message
