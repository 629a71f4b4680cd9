"""``gpushare plan``: the VRAM analysis and worker count ``pytest -n auto`` would use here.

It runs pytest's own configuration (rootdir and ini discovery, ``-c``, initial conftests and
their hooks) with a plugin that prints the analysis in place of running the session.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pytest

from pytest_gpushare.commands.common import CommandParser, FlagSpellings, add_settings_help, take_settings
from pytest_gpushare.errors import SettingError

__all__ = ["cmd_plan"]

EXIT_SETTING = int(pytest.ExitCode.USAGE_ERROR)


class _PlanCommand:
    """Stands in for the test session: prints the analysis once pytest's configuration is ready."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> int:
        from pytest_gpushare.summary import plan_lines

        config._do_configure()  # register markers and ini values the way a run would
        try:
            for line in plan_lines(config):
                print(line)
        finally:
            config._ensure_unconfigure()
        return 0


def _help() -> str:
    parser = CommandParser(
        prog="gpushare plan",
        usage="gpushare plan [settings] [pytest options and paths]",
        description=(
            "Print the VRAM analysis and the worker count that `pytest -n auto` would use in this "
            "folder, and exit. pytest's own configuration is read: rootdir and ini file, -c, -p, "
            "--rootdir, and the initial conftests of the paths given, with their hooks."
        ),
        epilog="exit codes: 0, or 4 for a bad setting (as pytest's usage errors)",
    )
    add_settings_help(parser)
    return parser.format_help()


def cmd_plan(args: Sequence[str]) -> int:
    """``gpushare plan``: print what ``pytest -n auto`` would plan here; returns the exit code."""
    if any(a in ("-h", "--help") for a in args):
        print(_help(), end="")
        return 0
    try:
        settings = take_settings(args)
    except SettingError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)  # as pytest prints its usage errors
        return EXIT_SETTING
    plugins = [FlagSpellings(settings.spellings), _PlanCommand()]
    return int(pytest.main([*settings.plugin_args, *settings.rest], plugins=plugins))
