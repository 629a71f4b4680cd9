"""``gpushare plan``: the VRAM analysis and worker count ``pytest -n auto`` would use here.

It runs pytest's own configuration (rootdir and ini discovery, ``-c``, initial conftests and
their hooks) with a plugin that prints the analysis in place of running the session.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pytest_gpushare.commands.common import translate_flags

__all__ = ["cmd_plan"]


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


def cmd_plan(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: gpushare plan [--reserve SIZE] [--safety SIZE] [--simulate SPEC] ... [pytest args]\n"
            "Prints what `pytest -n auto` would plan in this folder. Takes every --gpushare-* option\n"
            "of the plugin (with or without the gpushare- prefix) and pytest's -c, --rootdir, -p."
        )
        return 0
    code = pytest.main(translate_flags(args), plugins=[_PlanCommand()])
    return int(code)
