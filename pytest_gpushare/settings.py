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
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.gpus.simulated import parse_simulate
from pytest_gpushare.observations import parse_budget_mode
from pytest_gpushare.units import (
    GiB,
    MemRequest,
    MiB,
    PerGpuSizes,
    parse_mem,
    parse_per_gpu_sizes,
    parse_size,
)

__all__ = [
    "CONFIG_FILE_KEYS",
    "CONFIG_FILE_OBJECT",
    "OPTION_NAMES",
    "Layer",
    "Option",
    "Settings",
    "add_options",
    "cli_layer",
    "env_layer",
    "ini_layer",
    "option_for",
    "parse_bool",
    "parse_ollama",
    "read_config_file",
    "resolve",
    "resolve_settings",
]

#: One source's values: ini name -> (raw value, the words that name where it came from).
Layer = Mapping[str, tuple[object, str]]

DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class Settings:
    """Every setting of a session, parsed and checked; see SPEC "Settings" for their meaning.

    ``sources`` maps each field name to where its value came from, in the words errors use
    (``--gpushare-safety``, ``GPUSHARE_SAFETY``, ``gpushare_safety in tox.ini``, ``default``).
    ``notes`` are one-line diagnostics for the header (unknown keys in the config file).
    """

    reserve: PerGpuSizes
    safety_bytes: int
    worker_mem_bytes: int
    workers_per_gb: float | None
    max_workers: int | None
    default_mem: MemRequest
    context_mem_bytes: int
    ollama: str
    ollama_reserve: PerGpuSizes
    fallback: str
    timeout_s: float
    notice_after_s: float
    policy: str
    ledger_dir: str | None
    simulate: str | None
    report: str | None
    config_file: str | None
    enforce: bool
    observe_interval_s: float
    worker_mem_from: str
    framework_defaults: bool
    sources: Mapping[str, str]
    notes: tuple[str, ...] = ()


def _bad(value: object, source: str, why: str) -> SettingError:
    return SettingError(f"{source}: {why}: {value!r}")


# --- parsers: (raw value, source words) -> value; each raises SettingError naming the source ---


def _parse_positive_size(value: object, source: str) -> int:
    return parse_size(value, source, allow_zero=False)


def _parse_float(value: object, source: str) -> float:
    if isinstance(value, bool):
        raise _bad(value, source, "not a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(value, source, "not a number") from None
    else:
        raise _bad(value, source, "not a number")
    if not math.isfinite(number):
        raise _bad(value, source, "must be a finite number")
    return number


def _parse_positive_float(value: object, source: str) -> float:
    number = _parse_float(value, source)
    if number <= 0:
        raise _bad(value, source, "must be larger than zero")
    return number


def _parse_seconds(value: object, source: str) -> float:
    number = _parse_float(value, source)
    if number < 0:
        raise _bad(value, source, "a number of seconds cannot be negative")
    return number


def _parse_count(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(value, source, "not a whole number")
    if isinstance(value, str):
        try:
            value_int = int(value.strip())
        except ValueError:
            raise _bad(value, source, "not a whole number") from None
    else:
        value_int = value
    if value_int < 1:
        raise _bad(value, source, "must be at least 1")
    return value_int


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(value: object, source: str) -> bool:
    """A flag: a bool, or one of ``1/0/true/false/yes/no/on/off`` in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _bad(value, source, "not a flag (use 1/0, true/false, yes/no or on/off)")


def _choice(*choices: str) -> Callable[[object, str], str]:
    def parse(value: object, source: str) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise _bad(value, source, f"use one of {', '.join(choices)}")

    return parse


_parse_fallback = _choice("skip", "cpu", "fail")
_parse_policy = _choice("spread", "pack")

_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Words people write for "no Ollama" that would otherwise pass as a host name.
_OFF_LOOKALIKES = frozenset({"none", "no", "false", "0", "disable", "disabled"})


def parse_ollama(value: object, source: str) -> str:
    """``auto``, ``off``, an ``http(s)://`` URL, or ``host[:port]`` (returned as an http URL)."""
    if not isinstance(value, str):
        raise _bad(value, source, "use auto, off, or a URL such as http://127.0.0.1:11434")
    text = value.strip()
    if text.lower() in ("auto", "off"):
        return text.lower()
    if text.lower() in _OFF_LOOKALIKES:
        raise _bad(value, source, "use off to turn Ollama detection off")
    # OLLAMA_HOST itself may be a bare host[:port]; accept the same here.
    url = text if "://" in text else f"http://{text}"
    why = "not an http(s) URL or host[:port]"
    try:
        parts = urlsplit(url)
        _ = parts.port  # urlsplit checks the port only when asked for it
    except ValueError:
        raise _bad(value, source, why) from None
    host = parts.hostname or ""
    if parts.scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in text):
        raise _bad(value, source, why)
    if ":" not in host and not _HOST_RE.match(host):
        raise _bad(value, source, why)
    return url


def _parse_path(value: object, source: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _bad(value, source, "not a path")
    return os.path.expanduser(value.strip())


def _parse_simulate(value: object, source: str) -> str:
    if not isinstance(value, str):
        raise _bad(value, source, "not a GPU spec (for example 2x24GiB or none)")
    parse_simulate(value, source)
    return value.strip()


# --- the table -------------------------------------------------------------------------------

# What a native TOML value may be (pytest >= 9.2 checks it; the parsers then check the rest).
_TOML_TYPE: Any = str | int | float | bool


@dataclass(frozen=True)
class Option:
    """One setting and every place it can be set.

    ``name`` is the ini name and the argparse ``dest`` (``gpushare_safety``); ``flag`` is the
    command line option (``--gpushare-safety``), ``short_flag`` the ``gpushare`` command's
    spelling (``--safety``), ``env`` the environment variable (``GPUSHARE_SAFETY``).
    ``default`` is raw text run through ``parse`` like any other value (None: unset);
    ``parse(raw, source)`` turns a raw value into the field's value or raises
    :class:`SettingError` naming ``source``.
    """

    field: str
    name: str
    flag: str
    short_flag: str
    env: str
    default: str | None
    default_text: str
    parse: Callable[[object, str], Any]
    metavar: str
    help: str
    is_flag: bool = False
    is_path: bool = False


def _parse_on_off(value: object, source: str) -> bool:
    """A switch that takes a value on the command line too (``--x=off``)."""
    return parse_bool(value, source)


def _option(
    field: str,
    key: str,
    default: str | None,
    parse: Callable[[object, str], Any],
    metavar: str,
    help: str,
    default_text: str | None = None,
) -> Option:
    name = f"gpushare_{key}"
    return Option(
        field=field,
        name=name,
        flag="--" + name.replace("_", "-"),
        short_flag="--" + key.replace("_", "-"),
        env=name.upper(),
        default=default,
        default_text=default_text or default or "unset",
        parse=parse,
        metavar=metavar,
        help=help,
        is_flag=parse is parse_bool,
        is_path=parse is _parse_path,
    )


#: Every setting, in the order ``--help`` shows them. One table drives :func:`add_options`,
#: :func:`resolve` and the ``gpushare`` command.
# fmt: off
OPTION_NAMES: tuple[Option, ...] = (
    #       field                key               default   parse                   metavar
    _option("reserve",           "reserve",        "0",      parse_per_gpu_sizes,    "SIZE[,IDX:SIZE...]",
            "memory held back for other applications: one size for every GPU, or per GPU index"),
    _option("safety_bytes",      "safety",         "1GiB",   parse_size,             "SIZE",
            "safety buffer per GPU"),
    _option("worker_mem_bytes",  "worker_mem",     "3GiB",   _parse_positive_size,   "SIZE",
            "VRAM budget per xdist worker when -n auto counts workers, its CUDA context included"),
    _option("workers_per_gb",    "workers_per_gb", None,     _parse_positive_float,  "FLOAT",
            "at most this many workers per GiB of usable memory"),
    _option("max_workers",       "max_workers",    None,     _parse_count,           "N",
            "upper bound on -n auto"),
    _option("default_mem",       "default_mem",    None,     parse_mem,              "SIZE",
            "mem of a gpu marker that names none (a size or N%)", "the worker mem"),
    _option("context_mem_bytes", "context_mem",    "512MiB", parse_size,             "SIZE",
            "what one process's CUDA context costs on each GPU it touches"),
    _option("ollama",            "ollama",         "auto",   parse_ollama,           "{auto,off,URL}",
            "where to ask Ollama what it holds (auto: OLLAMA_HOST, else http://127.0.0.1:11434)"),
    _option("ollama_reserve",    "ollama_reserve", "0",      parse_per_gpu_sizes,    "SIZE[,IDX:SIZE...]",
            "VRAM that Ollama must keep"),
    _option("fallback",          "fallback",       "skip",   _parse_fallback,        "{skip,cpu,fail}",
            "what a GPU test does when no GPU can ever serve it"),
    _option("timeout_s",         "timeout",        "900",    _parse_seconds,         "SECONDS",
            "how long a test waits for its lease before it fails"),
    _option("policy",            "policy",         "spread", _parse_policy,          "{spread,pack}",
            "most free memory first (spread), or best fit (pack)"),
    _option("ledger_dir",        "ledger_dir",     None,     _parse_path,            "PATH",
            "where the ledgers live; every session that should coordinate uses the same one",
            "the account's own folder"),
    _option("simulate",          "simulate",       None,     _parse_simulate,        "SPEC",
            "pretend the box has these GPUs instead of asking NVML: [Nx]TOTAL[:used=SIZE][:name=TEXT],... "
            "or none"),
    _option("report",            "report",         None,     _parse_path,            "PATH",
            "write the run's VRAM analysis and leases as JSON"),
    _option("config_file",       "config",         None,     _parse_path,            "PATH",
            "a JSON file with a gpu_resource_management object (below the ini file in precedence)"),
    _option("enforce",           "enforce",        "off",    parse_bool,             "",
            "cap each test at its lease where the framework allows it (PyTorch)"),
    _option("observe_interval_s", "observe_interval", "0.05", _parse_seconds,       "SECONDS",
            "how often a GPU test's own VRAM use is sampled through NVML (0: at start and end only)"),
    _option("worker_mem_from",   "worker_mem_from", "p95",   parse_budget_mode,      "{off,p95,max}",
            "when the worker mem is not set: size it from the per-test peaks earlier runs observed"),
    _option("framework_defaults", "framework_defaults", "on", _parse_on_off,         "{on,off}",
            "in workers, where unset: JAX preallocation off, TensorFlow allow-growth on; "
            "torch's cached memory released after each GPU test"),
    _option("notice_after_s",    "notice_after",   "10",     _parse_seconds,         "SECONDS",
            "after this long waiting for memory, a line says what a test waits for and who holds it"),
)
# fmt: on

_BY_NAME: Mapping[str, Option] = MappingProxyType({o.name: o for o in OPTION_NAMES})


def option_for(name: str) -> Option:
    """The option whose ini name, field, flag, ``gpushare`` flag or env var is ``name``."""
    for option in OPTION_NAMES:
        if name in (option.name, option.field, option.flag, option.short_flag, option.env):
            return option
    raise KeyError(name)


# --- the config file -------------------------------------------------------------------------

#: The object of the JSON file that holds our keys.
CONFIG_FILE_OBJECT = "gpu_resource_management"


def _config_number(value: object, source: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(value, source, f"expected {what}")
    if not math.isfinite(value) or value < 0:
        raise _bad(value, source, f"expected {what}")
    return float(value)


def _config_mib(value: object, source: str) -> int:
    return round(_config_number(value, source, "a number of MiB, 0 or more") * MiB)


def _config_worker_gib(value: object, source: str) -> int:
    gib = _config_number(value, source, "a number of GiB larger than 0")
    if round(gib * GiB) == 0:
        raise _bad(value, source, "expected a number of GiB larger than 0")
    return round(gib * GiB)


def _config_workers_per_gb(value: object, source: str) -> float:
    number = _config_number(value, source, "a number larger than 0")
    if number == 0:
        raise _bad(value, source, "expected a number larger than 0")
    return number


def _config_bool(value: object, source: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(value, source, "expected true or false")
    return value


#: The keys read from the ``gpu_resource_management`` object: key -> (ini name of the setting
#: it feeds, converter returning that setting's raw value or None for "leaves it unset").
CONFIG_FILE_KEYS: Mapping[str, tuple[str, Callable[[object, str], object | None]]] = MappingProxyType(
    {
        "ollama_vram_reservation_mb": ("gpushare_ollama_reserve", _config_mib),
        "safety_buffer_mb": ("gpushare_safety", _config_mib),
        "min_vram_per_worker_gb": ("gpushare_worker_mem", _config_worker_gib),
        "max_workers_per_gb": ("gpushare_workers_per_gb", _config_workers_per_gb),
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
        raise _bad(path, named_by, f"cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise _bad(path, named_by, "the config file is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingError(
            f"{path} (from {named_by}): not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(document, dict) or CONFIG_FILE_OBJECT not in document:
        raise SettingError(f"{path} (from {named_by}): no {CONFIG_FILE_OBJECT!r} object at the top level")
    section = document[CONFIG_FILE_OBJECT]
    if not isinstance(section, dict):
        raise _bad(section, f"{CONFIG_FILE_OBJECT} in {path}", "expected a JSON object")
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


# --- resolving -------------------------------------------------------------------------------


def _is_empty(value: object) -> bool:
    # An empty environment variable, ini entry or ``-o name=`` clears the setting at that
    # level (the usual way to undo an inherited value); an empty flag stays an error.
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
        if entry is None or entry[0] is None or (source.empty_is_unset and _is_empty(entry[0])):
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
            option = _BY_NAME[name]
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

    config_option = _BY_NAME["gpushare_config"]
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


# --- pytest ----------------------------------------------------------------------------------


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
        if sep and name.strip() in _BY_NAME:
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
        name: (value, f"-o {name}") for name, value in _overrides(config).items() if not _is_empty(value)
    }
    layer.update(cli_layer({o.name: config.getoption(o.name, None) for o in OPTION_NAMES}))
    return layer


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
