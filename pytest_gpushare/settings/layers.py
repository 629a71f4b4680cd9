"""Resolving: each setting's value from its sources, the first that is set winning.

A source is a :data:`Layer` (ini name -> raw value and the words that name where it came
from): the command line (:func:`cli_layer`), the environment (:func:`env_layer`), the ini
file, the config file (:mod:`~pytest_gpushare.settings.config_file`), and last the default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pytest_gpushare.settings.config_file import read_config_file
from pytest_gpushare.settings.table import OPTION_NAMES, OPTIONS_BY_NAME, Option, Settings
from pytest_gpushare.units import MemRequest

__all__ = ["DEFAULT_SOURCE", "Layer", "cli_layer", "env_layer", "is_empty", "resolve"]

#: One source's values: ini name -> (raw value, the words that name where it came from).
Layer = Mapping[str, tuple[object, str]]

DEFAULT_SOURCE = "default"


def is_empty(value: object) -> bool:
    """Whether ``value`` is blank text.

    An empty environment variable, ini entry or ``-o name=`` clears the setting at that level
    (the usual way to undo an inherited value); an empty flag stays an error.
    """
    return isinstance(value, str) and not value.strip()


@dataclass(frozen=True)
class _Source:
    layer: Layer
    base: str | None  # the folder relative paths start from
    empty_is_unset: bool


def _first(option: Option, sources: Iterable[_Source]) -> tuple[object, str, str | None]:
    """The first set value of ``option``: (raw value, source words, base folder for paths)."""
    for source in sources:
        entry = source.layer.get(option.name)
        if entry is None or entry[0] is None or (source.empty_is_unset and is_empty(entry[0])):
            continue
        return entry[0], entry[1], source.base
    return option.default, DEFAULT_SOURCE, None


def _value(option: Option, raw: object, source: str, base: str | None) -> Any:
    if raw is None:
        return None
    value = option.parse(raw, source)
    if option.is_path and base is not None and not os.path.isabs(value):
        value = os.path.normpath(os.path.join(base, value))
    return value


def cli_layer(values: Mapping[str, object | None], *, short: bool = False) -> dict[str, tuple[object, str]]:
    """A command line layer from ``values`` (ini name -> value, None when not given).

    Sources are the plugin's flags, or the ``gpushare`` command's shorter ones with ``short``.
    """
    layer: dict[str, tuple[object, str]] = {}
    for name, value in values.items():
        if value is not None:
            option = OPTIONS_BY_NAME[name]
            layer[name] = (value, option.short_flag if short else option.flag)
    return layer


def env_layer(environ: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """The environment layer: each setting's ``GPUSHARE_*`` variable that is present."""
    return {o.name: (environ[o.env], o.env) for o in OPTION_NAMES if o.env in environ}


def resolve(
    cli: Layer,
    env: Mapping[str, str],
    ini: Layer,
    *,
    ini_dir: str | None = None,
    cwd: str | None = None,
) -> Settings:
    """Resolve every setting from its sources; the first that is set wins.

    ``cli`` holds the command line, flags and ``-o`` values alike, each with its source (see
    :func:`cli_layer`); ``env`` is the environment (``os.environ``); ``ini`` holds the ini
    file's values (``{"gpushare_safety": ("2GiB", "gpushare_safety in tox.ini")}``). Empty
    strings from ``env`` and ``ini`` count as unset; an empty command line value is an error.
    Relative paths from ``ini`` are taken from ``ini_dir``, others from ``cwd`` (default: the
    current folder). The config file named by ``gpushare_config`` is read here.
    Raises :class:`SettingError` naming the source of the first bad value.
    """
    cwd = os.getcwd() if cwd is None else cwd
    layers = [
        _Source(cli, cwd, empty_is_unset=False),
        _Source(env_layer(env), cwd, empty_is_unset=True),
        _Source(ini, ini_dir or cwd, empty_is_unset=True),
    ]

    config_option = OPTIONS_BY_NAME["gpushare_config"]
    raw, source, base = _first(config_option, layers)
    config_file = _value(config_option, raw, source, base)
    notes: tuple[str, ...] = ()
    if config_file is not None:
        file_layer, notes = read_config_file(config_file, source)
        layers.append(_Source(file_layer, None, empty_is_unset=False))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTION_NAMES:
        raw, source, base = _first(option, layers)
        values[option.field] = _value(option, raw, source, base)
        sources[option.field] = source
    if values["default_mem"] is None:
        values["default_mem"] = MemRequest(bytes=values["worker_mem_bytes"])
        sources["default_mem"] = f"{DEFAULT_SOURCE} (the worker mem)"
    return Settings(**values, sources=MappingProxyType(sources), notes=notes)
