"""What every ``gpushare`` command shares: flag spellings, its usage errors, and pytest's view.

Flags are the plugin's without the ``gpushare-`` part; the plugin's spelling works too.
:func:`pytest_view` reads the settings (and plan) through pytest's own configuration, so a
command gives the answer a test session in the same folder would.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import NoReturn

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.planner import Plan
from pytest_gpushare.settings import Settings

__all__ = ["CommandParser", "UsageError", "pytest_view", "translate_flags"]


class UsageError(Exception):
    """A bad command line of a ``gpushare`` command; the caller prints it as one line."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _long_flags() -> set[str]:
    from pytest_gpushare.settings import OPTION_NAMES

    return {opt.flag for opt in OPTION_NAMES}


def translate_flags(args: Sequence[str]) -> list[str]:
    """``--simulate 24GiB`` -> ``--gpushare-simulate 24GiB``; pytest's own flags pass through,
    and so does everything after ``--`` (``gpushare run``'s command is not ours to rename)."""
    args = list(args)
    if "--" in args:
        at = args.index("--")
        return _translate(args[:at]) + args[at:]
    return _translate(args)


def _translate(args: Sequence[str]) -> list[str]:
    known = _long_flags()
    out: list[str] = []
    for arg in args:
        name, sep, value = arg.partition("=")
        candidate = "--gpushare-" + name[2:]
        if name.startswith("--") and not name.startswith("--gpushare-") and candidate in known:
            out.append(candidate + sep + value)
        else:
            out.append(arg)
    return out


class _ConfigView:
    """Stands in for the test session and keeps the settings and plan pytest's configuration gives."""

    def __init__(self, want_plan: bool) -> None:
        self.want_plan = want_plan
        self.settings: Settings | None = None
        self.plan: Plan | None = None
        self.error: str | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> int:
        from pytest_gpushare.session import get_plan, get_settings

        try:
            self.settings = get_settings(config)
            self.plan = get_plan(config) if self.want_plan else None
        except pytest.UsageError as exc:
            self.error = str(exc)
            return int(pytest.ExitCode.USAGE_ERROR)
        return 0


def pytest_view(args: Sequence[str], *, want_plan: bool) -> tuple[Settings, Plan | None]:
    """The settings (and plan) ``pytest`` would use in this folder with ``args``: the same ini file,
    initial conftests and their hooks (reservations, probes) as a test session.

    Raises :class:`SettingError` with pytest's one-line message when they are not usable.
    """
    view = _ConfigView(want_plan)
    saved = dict(os.environ)  # what a session sets up for its tests (CUDA_DEVICE_ORDER) is not ours
    try:
        code = pytest.main(["-p", "no:cacheprovider", *args], plugins=[view])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if view.settings is None:
        raise SettingError(view.error or f"the settings could not be read (pytest exit code {int(code)})")
    return view.settings, view.plan
