"""``gpushare plan`` as a user runs it: its help, its one-line errors naming what was typed."""

from __future__ import annotations

import pytest
from cli_support import SIM, CliBox

from pytest_gpushare.settings import OPTION_NAMES


def test_plan_help_lists_every_setting_by_its_short_spelling(cli: CliBox) -> None:
    done = cli.gpushare("plan", "--help")
    assert done.returncode == 0, done.stderr
    for option in OPTION_NAMES:
        assert f"  {option.short_flag}" in done.stdout, option.short_flag
    assert "--gpushare-NAME" in done.stdout
    assert "pytest options and paths" in done.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--safety", "-3GiB"], "ERROR: --safety: a size cannot be negative: '-3GiB'"),
        (["--safety=-1GiB"], "ERROR: --safety: a size cannot be negative: '-1GiB'"),
        (["--gpushare-safety=-1GiB"], "ERROR: --gpushare-safety: a size cannot be negative: '-1GiB'"),
        (["--safety"], "ERROR: --safety: expects a value (SIZE)"),
        (
            ["--enforce=maybe"],
            "ERROR: --enforce: not a flag (use 1/0, true/false, yes/no or on/off): 'maybe'",
        ),
    ],
)
def test_plan_names_a_bad_setting_as_typed_in_one_line(cli: CliBox, args: list[str], line: str) -> None:
    done = cli.gpushare("plan", "--simulate", SIM, *args)
    assert done.returncode == 4
    assert [x for x in done.stderr.splitlines() if x.strip()] == [line]
    assert "usage:" not in done.stdout + done.stderr


def test_plan_takes_the_settings_in_their_short_spelling(cli: CliBox) -> None:
    done = cli.gpushare("plan", "--simulate", SIM, "--worker-mem", "6GiB", "--max-workers=1")
    assert done.returncode == 0, done.stderr
    assert "floor(23.0GiB / 6.0GiB) = 3; max-workers cap 1;" in done.stdout
