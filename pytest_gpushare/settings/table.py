"""The settings themselves: :class:`Settings`, and the table :data:`OPTION_NAMES` of every option.

One row per setting says its field, ini name, flags, environment variable, default and parser;
the pytest options, the ``gpushare`` command's flags and :func:`~pytest_gpushare.settings.resolve`
all follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pytest_gpushare.observations import parse_budget_mode
from pytest_gpushare.settings.parsers import (
    parse_bool,
    parse_count,
    parse_default_mem,
    parse_dispatch,
    parse_fallback,
    parse_ollama,
    parse_on_off,
    parse_path,
    parse_policy,
    parse_positive_float,
    parse_seconds,
    parse_setting_size,
    parse_setting_sizes,
    parse_simulate,
    parse_worker_mem,
)
from pytest_gpushare.units import MemRequest, PerGpuSizes

__all__ = ["OPTIONS_BY_NAME", "OPTION_NAMES", "Option", "Settings", "option_for"]


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
    dispatch: str
    adopt_marker: bool
    observe_interval_s: float
    worker_mem_from: str
    framework_defaults: bool
    sources: Mapping[str, str]
    notes: tuple[str, ...] = ()


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
        is_path=parse is parse_path,
    )


#: Every setting, in the order ``--help`` shows them. One table drives :func:`add_options`,
#: :func:`resolve` and the ``gpushare`` command.
# fmt: off
OPTION_NAMES: tuple[Option, ...] = (
    #       field                key               default   parse                   metavar
    _option("reserve",           "reserve",        "0",      parse_setting_sizes,    "SIZE[,IDX:SIZE...]",
            "memory held back for other applications: one size for every GPU, or per GPU index"),
    _option("safety_bytes",      "safety",         "1GiB",   parse_setting_size,     "SIZE",
            "safety buffer per GPU"),
    _option("worker_mem_bytes",  "worker_mem",     "3GiB",   parse_worker_mem,       "SIZE",
            "VRAM budget per xdist worker when -n auto counts workers, its CUDA context included"),
    _option("workers_per_gb",    "workers_per_gb", None,     parse_positive_float,   "FLOAT",
            "at most this many workers per GiB of usable memory"),
    _option("max_workers",       "max_workers",    None,     parse_count,            "N",
            "upper bound on -n auto"),
    _option("default_mem",       "default_mem",    None,     parse_default_mem,      "SIZE",
            "mem of a gpu marker that names none (a size or N%)", "the worker mem"),
    _option("context_mem_bytes", "context_mem",    "512MiB", parse_setting_size,     "SIZE",
            "what one process's CUDA context costs on each GPU it touches"),
    _option("ollama",            "ollama",         "auto",   parse_ollama,           "{auto,off,URL}",
            "where to ask Ollama what it holds (auto: OLLAMA_HOST, else http://127.0.0.1:11434)"),
    _option("ollama_reserve",    "ollama_reserve", "0",      parse_setting_sizes,    "SIZE[,IDX:SIZE...]",
            "VRAM that Ollama must keep"),
    _option("fallback",          "fallback",       "skip",   parse_fallback,         "{skip,cpu,fail}",
            "what a GPU test does when no GPU can ever serve it"),
    _option("timeout_s",         "timeout",        "900",    parse_seconds,          "SECONDS",
            "how long a test waits for its lease before it fails"),
    _option("policy",            "policy",         "spread", parse_policy,           "{spread,pack}",
            "most free memory first (spread), or best fit (pack)"),
    _option("ledger_dir",        "ledger_dir",     None,     parse_path,             "PATH",
            "where the ledgers live; every session that should coordinate uses the same one",
            "the account's own folder"),
    _option("simulate",          "simulate",       None,     parse_simulate,         "SPEC",
            "pretend the box has these GPUs instead of asking NVML: [Nx]TOTAL[:used=SIZE][:name=TEXT],... "
            "or none"),
    _option("report",            "report",         None,     parse_path,             "PATH",
            "write the run's VRAM analysis and leases as JSON"),
    _option("config_file",       "config",         None,     parse_path,             "PATH",
            "a JSON file with a gpu_resource_management object (below the ini file in precedence)"),
    _option("enforce",           "enforce",        "off",    parse_bool,             "",
            "cap each test at its lease where the framework allows it (PyTorch)"),
    _option("dispatch",          "dispatch",       "memory", parse_dispatch,         "{memory,xdist}",
            "under --dist load, dispatch tests by memory, or leave xdist's scheduler"),
    _option("adopt_marker",      "adopt_marker",   "off",    parse_bool,             "",
            "treat a suite's own bare gpu marker as fully ours (fallback included)"),
    _option("observe_interval_s", "observe_interval", "0.05", parse_seconds,        "SECONDS",
            "how often a GPU test's own VRAM use is sampled through NVML (0: at start and end only)"),
    _option("worker_mem_from",   "worker_mem_from", "p95",   parse_budget_mode,      "{off,p95,max}",
            "when the worker mem is not set: size it from the per-test peaks earlier runs observed"),
    _option("framework_defaults", "framework_defaults", "on", parse_on_off,          "{on,off}",
            "in workers, where unset: JAX preallocation off, TensorFlow allow-growth on; "
            "torch's cached memory released after each GPU test"),
    _option("notice_after_s",    "notice_after",   "10",     parse_seconds,          "SECONDS",
            "after this long waiting for memory, a line says what a test waits for and who holds it"),
)
# fmt: on

#: Each option by its ini name.
OPTIONS_BY_NAME: Mapping[str, Option] = MappingProxyType({o.name: o for o in OPTION_NAMES})


def option_for(name: str) -> Option:
    """The option whose ini name, field, flag, ``gpushare`` flag or env var is ``name``."""
    for option in OPTION_NAMES:
        if name in (option.name, option.field, option.flag, option.short_flag, option.env):
            return option
    raise KeyError(name)
