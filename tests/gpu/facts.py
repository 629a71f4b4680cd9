"""What the box is, asked directly rather than through the plugin: NVML (nvidia-ml-py) and the
versions of the software the kit runs with."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from typing import Any

from .box import ROOT


def software_line() -> str:
    """Versions of what the kit ran with, and where."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (
        f"software: python {platform.python_version()}, pytest {version('pytest')}, "
        f"pytest-xdist {version('pytest-xdist')}, nvidia-ml-py {version('nvidia-ml-py')}, "
        f"pytest-gpushare {version('pytest-gpushare')} (commit {commit or 'unknown'}); "
        f"host {platform.node()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )


# --- NVML, asked directly ----------------------------------------------------------------------


class _Asker:
    """One NVML call at a time; an error (or a function this nvidia-ml-py lacks) becomes None."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: list[str] = []

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.nvml, name, None)
        if fn is None:
            self.errors.append(f"{name}: not in this nvidia-ml-py")
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # NVMLError and friends: the text is the fact
            self.errors.append(f"{name}: {exc}")
            return None


def _memory(ask: _Asker, handle: Any, version: int | None) -> dict[str, int] | None:
    info = ask("nvmlDeviceGetMemoryInfo", handle, **({"version": version} if version else {}))
    if info is None:
        return None
    keys = ("total", "reserved", "free", "used") if version else ("total", "free", "used")
    return {k: int(getattr(info, k)) for k in keys}


def _mig(ask: _Asker, handle: Any) -> str:
    mode = ask("nvmlDeviceGetMigMode", handle)
    if mode is None:
        return "not supported"
    return "enabled" if mode[0] == getattr(ask.nvml, "NVML_DEVICE_MIG_ENABLE", 1) else "disabled"


def nvml_facts(nvml: Any) -> dict[str, Any]:
    """What NVML (the ``pynvml`` module given) says of this box, asked directly, not via the plugin.

    Versions, and per GPU its UUID, name, v1 and v2 memory info, MIG mode and compute
    processes (``[[pid, bytes or None]]``); ``errors`` lists the calls that failed.
    """
    ask = _Asker(nvml)
    nvml.nvmlInit()
    try:
        facts: dict[str, Any] = {
            "driver": ask("nvmlSystemGetDriverVersion"),
            "nvml": ask("nvmlSystemGetNVMLVersion"),
            "cuda_driver": ask("nvmlSystemGetCudaDriverVersion"),
            "gpus": [],
        }
        for index in range(ask("nvmlDeviceGetCount") or 0):
            handle = ask("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                continue
            procs = ask("nvmlDeviceGetComputeRunningProcesses", handle) or []
            v2 = getattr(nvml, "nvmlMemory_v2", None)
            facts["gpus"].append(
                {
                    "uuid": ask("nvmlDeviceGetUUID", handle),
                    "name": ask("nvmlDeviceGetName", handle),
                    "v1": _memory(ask, handle, None),
                    "v2": _memory(ask, handle, v2) if v2 else None,
                    "mig": _mig(ask, handle),
                    "processes": [[p.pid, p.usedGpuMemory] for p in procs],
                }
            )
        facts["errors"] = ask.errors
        return facts
    finally:
        nvml.nvmlShutdown()
