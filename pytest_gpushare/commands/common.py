"""What every ``gpushare`` command shares: its settings flags, its usage errors, and pytest's view.

Flags are the plugin's without the ``gpushare-`` part; the plugin's spelling works too.
:func:`take_settings` reads them, :func:`add_settings_help` lists them in ``--help``, and
:func:`pytest_view` reads the settings (and plan) through pytest's own configuration, so a
command gives the answer a test session in the same folder would, naming each flag as typed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.planner import Plan
from pytest_gpushare.settings import OPTION_NAMES, Option, Settings, parse_bool
from pytest_gpushare.settings.pytest_options import FLAG_SPELLINGS

__all__ = [
    "CommandParser",
    "FlagSpellings",
    "SettingsArgs",
    "UsageError",
    "add_settings_help",
    "pytest_view",
    "take_settings",
]


class UsageError(Exception):
    """A bad command line of a ``gpushare`` command; the caller prints it as one line."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, and takes
    no abbreviations (``--sim`` for ``--simulate`` would slip past :func:`take_settings`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class SettingsArgs:
    """A command line with the plugin's settings taken out (:func:`take_settings`).

    ``plugin_args`` are those settings as pytest's options for the plugin (``--gpushare-x=V``;
    a flag given as false: ``-o gpushare_x=off``, which also counts as command line); ``rest`` is
    everything else in its order; ``spellings`` maps each setting's ini name to the flag as typed
    (``--safety``), so that errors and the header name what the user wrote.
    """

    plugin_args: list[str]
    rest: list[str]
    spellings: dict[str, str]


def _setting_flags(only: Collection[str] | None) -> dict[str, Option]:
    """Every spelling of the settings' flags (``--safety``, ``--gpushare-safety``) -> option."""
    options = [o for o in OPTION_NAMES if only is None or o.name in only]
    return {flag: o for o in options for flag in (o.short_flag, o.flag)}


def take_settings(args: Sequence[str], *, only: Collection[str] | None = None) -> SettingsArgs:
    """Take the settings' flags out of ``args``, in either spelling (``--safety 2GiB``,
    ``--gpushare-safety=2GiB``), up to a ``--`` (what follows it is not ours to read).

    ``only`` limits them to these ini names; other flags stay in ``rest``. A value flag takes the
    next argument even when it starts with ``-`` (``--safety -3GiB`` is a negative size, which
    the setting refuses, not a missing value). Raises :class:`SettingError` naming the flag as
    typed for a value flag with no value, and for a true/false flag given a word that is neither.
    """
    args = list(args)
    cut = args.index("--") if "--" in args else len(args)
    flags = _setting_flags(only)
    taken: list[str] = []
    rest: list[str] = []
    spellings: dict[str, str] = {}
    i = 0
    while i < cut:
        typed, sep, value = args[i].partition("=")
        option = flags.get(typed)
        i += 1
        if option is None:
            rest.append(args[i - 1])
            continue
        spellings[option.name] = typed
        if option.is_flag:
            on = True if not sep else parse_bool(value, typed)
            taken += [option.flag] if on else ["-o", f"{option.name}=off"]
            continue
        if not sep:
            if i >= cut or args[i] in flags:
                raise SettingError(f"{typed}: expects a value ({option.metavar})")
            value, i = args[i], i + 1
        taken.append(f"{option.flag}={value}")
    return SettingsArgs(taken, rest + args[cut:], spellings)


def add_settings_help(
    parser: argparse.ArgumentParser, *, only: Collection[str] | None = None, helps: Mapping[str, str] = {}
) -> None:
    """List the settings a command takes in its ``--help``, each by its short spelling.

    :func:`take_settings` reads them before the parser sees the command line; these entries are
    there to be shown. ``helps`` replaces a setting's help text (ini name -> text).
    """
    group = parser.add_argument_group(
        "settings",
        "The plugin's settings; each flag also works as --gpushare-NAME, and the GPUSHARE_* "
        "environment and the ini file count as for pytest here.",
    )
    for option in OPTION_NAMES:
        if only is not None and option.name not in only:
            continue
        text = helps.get(option.name) or f"{option.help} (default: {option.default_text}; env {option.env})"
        # argparse %-formats help texts ("N%" would break it).
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "dest": f"shown_{option.name}"}
        if option.is_flag:
            group.add_argument(option.short_flag, action="store_true", **kwargs)
        else:
            group.add_argument(option.short_flag, metavar=option.metavar, **kwargs)


class FlagSpellings:
    """A plugin that makes the settings name each flag as the user typed it (``--safety``)."""

    def __init__(self, spellings: Mapping[str, str]) -> None:
        self.spellings = dict(spellings)

    @pytest.hookimpl(tryfirst=True)
    def pytest_load_initial_conftests(self, early_config: pytest.Config) -> None:
        # Before anything can resolve the settings: conftests' hooks, xdist's worker count.
        early_config.stash[FLAG_SPELLINGS] = self.spellings


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


def pytest_view(settings: SettingsArgs, *, want_plan: bool) -> tuple[Settings, Plan | None]:
    """The settings (and plan) ``pytest`` would use in this folder with these settings flags
    (``rest`` is the command's own business): the same ini file, initial conftests and their
    hooks (reservations, probes) as a test session.

    Raises :class:`SettingError` with pytest's one-line message when they are not usable.
    """
    view = _ConfigView(want_plan)
    saved = dict(os.environ)  # what a session sets up for its tests (CUDA_DEVICE_ORDER) is not ours
    try:
        code = pytest.main(
            ["-p", "no:cacheprovider", *settings.plugin_args],
            plugins=[FlagSpellings(settings.spellings), view],
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if view.settings is None:
        raise SettingError(view.error or f"the settings could not be read (pytest exit code {int(code)})")
    return view.settings, view.plan
