"""The settings as pytest carries them: its options and ini names, and a session's settings.

:func:`add_options` registers every row of :data:`~pytest_gpushare.settings.OPTION_NAMES`;
:func:`resolve_settings` reads them back from a ``pytest.Config`` and resolves them. The one
module of :mod:`pytest_gpushare.settings` that imports pytest.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings.layers import cli_layer, is_empty, resolve
from pytest_gpushare.settings.table import OPTION_NAMES, OPTIONS_BY_NAME, Settings

__all__ = ["FLAG_SPELLINGS", "add_options", "ini_layer", "resolve_settings"]

#: Ini name -> the flag as its user typed it, where that is not the plugin's own spelling: the
#: ``gpushare`` command passes ``--safety`` on as ``--gpushare-safety`` and puts ``--safety``
#: here, so that errors and the header name what was typed.
FLAG_SPELLINGS = pytest.StashKey[Mapping[str, str]]()

# What a native TOML value may be (pytest >= 9.2 checks it; the parsers then check the rest).
_TOML_TYPE: Any = str | int | float | bool


def _union_ini_types() -> bool:
    # addini accepts a union type such as ``str | int`` from pytest 9.2 on; before that,
    # registering as a string is all there is (native TOML numbers then need quotes).
    major, minor = (int(part) for part in pytest.version_tuple[:2])
    return (major, minor) >= (9, 2)


def add_options(parser: pytest.Parser) -> None:
    """Register every option in one ``gpushare`` group, and every ini name."""
    group = parser.getgroup("gpushare", "GPU memory sharing (pytest-gpushare)")
    union = _union_ini_types()
    for option in OPTION_NAMES:
        ini_type: Any = _TOML_TYPE if union else "string"
        # argparse %-formats help texts ("N%" would break it).
        help_text = f"{option.help} (default: {option.default_text}; env {option.env}, ini {option.name})"
        help_text = help_text.replace("%", "%%")
        if option.is_flag:
            group.addoption(
                option.flag,
                action="store_true",
                dest=option.name,
                default=None,
                help=help_text,
            )
        else:
            group.addoption(
                option.flag,
                action="store",
                dest=option.name,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
        parser.addini(
            option.name,
            f"{option.help} ({option.metavar or 'true/false'}; default: {option.default_text}; "
            f"{option.flag}, {option.env})",
            type=ini_type,
            default=None,
        )


def _overrides(config: pytest.Config) -> dict[str, str]:
    # -o values come as "name=value" strings, last one wins as in pytest's own parsing.
    overrides: dict[str, str] = {}
    for item in getattr(config.option, "override_ini", None) or ():
        name, sep, value = item.partition("=")
        if sep and name.strip() in OPTIONS_BY_NAME:
            overrides[name.strip()] = value
    return overrides


def ini_layer(config: pytest.Config) -> dict[str, tuple[object, str]]:
    """The ini file's values (``-o`` overrides excluded: they count as command line)."""
    overridden = _overrides(config)
    file_name = config.inipath.name if config.inipath is not None else "the ini file"
    layer: dict[str, tuple[object, str]] = {}
    for option in OPTION_NAMES:
        if option.name in overridden:
            continue
        try:
            with warnings.catch_warnings():
                # A list in [tool.pytest.ini_options] reaches a string option with a deprecation
                # warning from pytest (an error under -W error); our parser refuses it anyway.
                warnings.simplefilter("ignore", DeprecationWarning)
                value = config.getini(option.name)
        except pytest.UsageError as exc:
            # pytest's own type check of a native TOML value (a list, a date).
            raise SettingError(str(exc)) from None
        if value is not None:
            layer[option.name] = (value, f"{option.name} in {file_name}")
    return layer


def _command_line(config: pytest.Config) -> dict[str, tuple[object, str]]:
    layer: dict[str, tuple[object, str]] = {
        name: (value, f"-o {name}") for name, value in _overrides(config).items() if not is_empty(value)
    }
    layer.update(cli_layer({o.name: config.getoption(o.name, None) for o in OPTION_NAMES}))
    spellings = config.stash.get(FLAG_SPELLINGS, {})
    return {name: (value, spellings.get(name, source)) for name, (value, source) in layer.items()}


def resolve_settings(config: pytest.Config) -> Settings:
    """Resolve the settings of this pytest session; raises :class:`SettingError`.

    Cheap and free of side effects apart from reading the config file, so it can run from
    the first hook that needs it (``pytest_xdist_auto_num_workers`` comes before
    ``pytest_configure``); callers keep the result in ``config.stash``.
    """
    return resolve(
        _command_line(config),
        os.environ,
        ini_layer(config),
        ini_dir=str(config.inipath.parent) if config.inipath is not None else None,
        cwd=str(config.invocation_params.dir),
    )
