"""The JSON config file named by ``--gpushare-config``: its ``gpu_resource_management`` object.

It sits below the ini file in precedence (:mod:`pytest_gpushare.settings`). Its keys have their
own units and types (:data:`CONFIG_FILE_KEYS`); each becomes the raw value of the setting it
feeds, which that setting's parser then checks like any other.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings.parsers import bad_value
from pytest_gpushare.units import GiB, MiB

__all__ = ["CONFIG_FILE_KEYS", "CONFIG_FILE_OBJECT", "read_config_file"]

#: The object of the JSON file that holds our keys.
CONFIG_FILE_OBJECT = "gpu_resource_management"


def _config_number(value: object, source: str, what: str, *, above_zero: bool = False) -> float:
    """A finite JSON number, 0 or more (more than 0 with ``above_zero``); else "expected <what>"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_value(value, source, f"expected {what}")
    if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
        raise bad_value(value, source, f"expected {what}")
    return float(value)


def _config_bytes(unit: int, what: str, *, above_zero: bool = False) -> Callable[[object, str], str]:
    """A converter from a number of ``unit`` (MiB, GiB) to whole bytes, as a size with its unit
    (``"1073741824B"``): the settings take sizes only with a unit."""

    def convert(value: object, source: str) -> str:
        size = round(_config_number(value, source, what) * unit)
        if above_zero and size == 0:  # a size too small to be one byte is no size
            raise bad_value(value, source, f"expected {what}")
        return f"{size}B"

    return convert


def _config_bool(value: object, source: str) -> bool:
    if not isinstance(value, bool):
        raise bad_value(value, source, "expected true or false")
    return value


_config_mib = _config_bytes(MiB, "a number of MiB, 0 or more")

#: The keys read from the ``gpu_resource_management`` object: key -> (ini name of the setting
#: it feeds, converter returning that setting's raw value or None for "leaves it unset").
CONFIG_FILE_KEYS: Mapping[str, tuple[str, Callable[[object, str], object | None]]] = MappingProxyType(
    {
        "ollama_vram_reservation_mb": ("gpushare_ollama_reserve", _config_mib),
        "safety_buffer_mb": ("gpushare_safety", _config_mib),
        "min_vram_per_worker_gb": (
            "gpushare_worker_mem",
            _config_bytes(GiB, "a number of GiB larger than 0", above_zero=True),
        ),
        "max_workers_per_gb": (
            "gpushare_workers_per_gb",
            functools.partial(_config_number, what="a number larger than 0", above_zero=True),
        ),
        # true only confirms the default; false turns detection off.
        "enable_ollama_detection": (
            "gpushare_ollama",
            lambda value, source: None if _config_bool(value, source) else "off",
        ),
        "fallback_to_cpu_when_constrained": (
            "gpushare_fallback",
            lambda value, source: "cpu" if _config_bool(value, source) else None,
        ),
    }
)


def read_config_file(path: str, named_by: str) -> tuple[dict[str, tuple[object, str]], tuple[str, ...]]:
    """Read the ``gpu_resource_management`` object of the JSON file at ``path``.

    Returns the layer it makes (ini name -> (value, ``"<key> in <path>"``)) and one note per
    unknown key. A key whose value is ``null`` counts as absent. ``named_by`` is the source of
    the path, quoted when the file cannot be used.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise bad_value(path, named_by, f"cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise bad_value(path, named_by, "the config file is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingError(
            f"{path} (from {named_by}): not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:  # json.loads recurses once per level of nesting
        raise SettingError(f"{path} (from {named_by}): not valid JSON: nested too deeply") from None
    if not isinstance(document, dict) or CONFIG_FILE_OBJECT not in document:
        raise SettingError(f"{path} (from {named_by}): no {CONFIG_FILE_OBJECT!r} object at the top level")
    section = document[CONFIG_FILE_OBJECT]
    if not isinstance(section, dict):
        raise bad_value(section, f"{CONFIG_FILE_OBJECT} in {path}", "expected a JSON object")
    layer: dict[str, tuple[object, str]] = {}
    notes: list[str] = []
    for key, value in section.items():
        if key not in CONFIG_FILE_KEYS:
            notes.append(f"{path}: unknown key {key!r} in {CONFIG_FILE_OBJECT}, ignored")
            continue
        if value is None:
            continue
        name, convert = CONFIG_FILE_KEYS[key]
        source = f"{key} in {path}"
        converted = convert(value, source)
        if converted is not None:
            layer[name] = (converted, source)
    return layer, tuple(notes)
