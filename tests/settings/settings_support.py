"""What the settings tests share: resolving from values given per kind of source."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from pytest_gpushare.settings import OPTION_NAMES, Settings, option_for, resolve
from pytest_gpushare.units import GiB, MemRequest, MiB, PerGpuSizes

NAMES = [option.name for option in OPTION_NAMES]
SOURCE_KINDS = ["cli", "-o", "env", "ini"]
ORDER = ["cli", "env", "ini"]


def clear_gpushare_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own GPUSHARE_* variables must not leak into what these tests resolve."""
    for option in OPTION_NAMES:
        monkeypatch.delenv(option.env, raising=False)


def label(kind: str, name: str) -> str:
    """The source words each kind of source uses in errors and ``Settings.sources``."""
    option = option_for(name)
    return {
        "cli": option.flag,
        "-o": f"-o {name}",
        "env": option.env,
        "ini": f"{name} in tox.ini",
    }[kind]


def resolve_from(
    tmp_path: Path,
    *,
    cli: Mapping[str, object] | None = None,
    override: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    ini: Mapping[str, object] | None = None,
    config: Mapping[str, object] | None = None,
) -> Settings:
    """Resolve with values given per kind of source, keyed by ini name.

    ``config`` becomes the ``gpu_resource_management`` object of a JSON file that the ini
    layer names (unless a test names a config file itself).
    """
    command_line = {name: (value, label("-o", name)) for name, value in (override or {}).items()}
    command_line.update({name: (value, label("cli", name)) for name, value in (cli or {}).items()})
    environ = {option_for(name).env: value for name, value in (env or {}).items()}
    ini_layer = {name: (value, label("ini", name)) for name, value in (ini or {}).items()}
    if config is not None:
        path = tmp_path / "performance_config.json"
        path.write_text(json.dumps({"gpu_resource_management": config}))
        ini_layer.setdefault("gpushare_config", (str(path), label("ini", "gpushare_config")))
    return resolve(command_line, environ, ini_layer, ini_dir=str(tmp_path), cwd=str(tmp_path))


SOURCE_KINDS = ["cli", "-o", "env", "ini"]


def by_kind(kind: str, name: str, value: object) -> dict[str, Any]:
    key = {"cli": "cli", "-o": "override", "env": "env", "ini": "ini"}[kind]
    return {key: {name: value}}


# Two good raw values per setting and what each becomes; paths are absolute so that no base
# folder is joined. The config file's own path needs real files: see the tests further down.
GOOD: dict[str, tuple[tuple[object, object], tuple[object, object]]] = {
    "gpushare_reserve": (
        ("1GiB", PerGpuSizes(GiB)),
        ("0:2GiB", PerGpuSizes(0, MappingProxyType({0: 2 * GiB}))),
    ),
    "gpushare_safety": (("2GiB", 2 * GiB), ("512MiB", 512 * MiB)),
    "gpushare_worker_mem": (("4GiB", 4 * GiB), ("1.5 GiB", GiB + GiB // 2)),
    "gpushare_workers_per_gb": (("0.25", 0.25), ("2", 2.0)),
    "gpushare_max_workers": (("3", 3), (" 7 ", 7)),
    "gpushare_default_mem": (("2GiB", MemRequest(bytes=2 * GiB)), ("25%", MemRequest(percent=25.0))),
    "gpushare_context_mem": (("256MiB", 256 * MiB), ("0", 0)),
    "gpushare_ollama": (("off", "off"), ("http://10.0.0.2:11434", "http://10.0.0.2:11434")),
    "gpushare_ollama_reserve": (("12GiB", PerGpuSizes(12 * GiB)), ("1:3GiB", PerGpuSizes(0, {1: 3 * GiB}))),
    "gpushare_fallback": (("cpu", "cpu"), ("FAIL", "fail")),
    "gpushare_timeout": (("10", 10.0), ("0.5", 0.5)),
    "gpushare_notice_after": (("0.2", 0.2), ("30", 30.0)),
    "gpushare_policy": (("pack", "pack"), ("Spread", "spread")),
    "gpushare_ledger_dir": (("/srv/gpushare", "/srv/gpushare"), ("/tmp/ledgers", "/tmp/ledgers")),
    "gpushare_simulate": (("24GiB", "24GiB"), ("2x80GiB:used=1GiB", "2x80GiB:used=1GiB")),
    "gpushare_report": (("/tmp/a.json", "/tmp/a.json"), ("/tmp/b.json", "/tmp/b.json")),
    "gpushare_enforce": (("1", True), ("off", False)),
    "gpushare_dispatch": (("xdist", "xdist"), ("Memory", "memory")),
    "gpushare_adopt_marker": (("true", True), ("0", False)),
    "gpushare_observe_interval": (("0", 0.0), ("0.2", 0.2)),
    "gpushare_worker_mem_from": (("off", "off"), ("MAX", "max")),
    "gpushare_framework_defaults": (("off", False), ("on", True)),
}
