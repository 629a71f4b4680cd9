"""One resolver for every setting: command line > environment > ini file > config file > default.

The table :data:`OPTION_NAMES` drives everything: the options and ini names that
:func:`add_options` registers, the order in which :func:`resolve` looks for a value, and the
flags of the ``gpushare`` command (which accepts each flag without its ``gpushare-`` part).

Sources, first that is set wins:

1. the command line: ``--gpushare-x`` (``addopts`` and ``PYTEST_ADDOPTS`` arrive as command line),
   then ``-o gpushare_x=...``; the explicit flag beats ``-o`` when both are given;
2. the environment: ``GPUSHARE_X``; an empty value counts as unset;
3. the ini file pytest found (``gpushare_x``); an empty value counts as unset, and native TOML
   numbers and booleans are accepted;
4. the ``gpu_resource_management`` object of the JSON file named by ``--gpushare-config``
   (:data:`CONFIG_FILE_KEYS`);
5. the default.

Only the value that wins is parsed, and a bad one raises :class:`SettingError` whose one-line
message starts with the source (``--gpushare-safety``, ``GPUSHARE_SAFETY``,
``gpushare_safety in tox.ini``, ``-o gpushare_safety``, ``safety_buffer_mb in /x/cfg.json``).
Relative paths are taken from the folder of the ini file when they come from it, else from the
folder pytest was started in. Nothing here starts NVML or contacts the network.

The parts: :mod:`~pytest_gpushare.settings.table` (:class:`Settings`, :data:`OPTION_NAMES`),
:mod:`~pytest_gpushare.settings.parsers` (one parser per kind of value),
:mod:`~pytest_gpushare.settings.config_file`, :mod:`~pytest_gpushare.settings.layers`
(:func:`resolve`) and :mod:`~pytest_gpushare.settings.pytest_options` (``add_options``,
``resolve_settings``), the only one that imports pytest and the only one this package does not
import, so importing the settings loads no pytest.
"""

from __future__ import annotations

from pytest_gpushare.settings.config_file import CONFIG_FILE_KEYS, CONFIG_FILE_OBJECT, read_config_file
from pytest_gpushare.settings.layers import DEFAULT_SOURCE, Layer, cli_layer, env_layer, resolve
from pytest_gpushare.settings.parsers import parse_bool, parse_ollama
from pytest_gpushare.settings.table import OPTION_NAMES, Option, Settings, option_for

__all__ = [
    "CONFIG_FILE_KEYS",
    "CONFIG_FILE_OBJECT",
    "DEFAULT_SOURCE",
    "OPTION_NAMES",
    "Layer",
    "Option",
    "Settings",
    "cli_layer",
    "env_layer",
    "option_for",
    "parse_bool",
    "parse_ollama",
    "read_config_file",
    "resolve",
]
