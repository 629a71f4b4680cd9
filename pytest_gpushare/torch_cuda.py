"""PyTorch's CUDA allocator, only where this process already uses it.

Nothing here imports torch or initialises CUDA: ``torch.cuda`` is reached through
``sys.modules``, and a call that would start CUDA is made only once
``torch.cuda.is_initialized()``. Every torch call is guarded: a broken or half-imported torch
reads as "not in use", and a failing call leaves its figure out.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "imported_cuda",
    "initialised_cuda",
    "release_cached",
    "torch_in_use",
    "torch_peak_start",
    "torch_peak_stop",
]


def imported_cuda() -> Any | None:
    """``torch.cuda`` when this process imported torch (CUDA may not be started), else None."""
    torch = sys.modules.get("torch")
    return getattr(torch, "cuda", None) if torch is not None else None


def initialised_cuda() -> Any | None:
    """``torch.cuda`` when this process imported torch and started CUDA, else None."""
    cuda = imported_cuda()
    if cuda is None:
        return None
    try:
        return cuda if cuda.is_initialized() else None
    except Exception:  # a half-imported or broken torch is "not in use"
        return None


def torch_in_use() -> bool:
    """Whether torch is imported and has initialised CUDA in this process (never imports it)."""
    return initialised_cuda() is not None


def _cuda_devices(devs: Iterable[str]) -> list[str]:
    return [d for d in dict.fromkeys(devs) if d.startswith("cuda")]


def torch_peak_start(devs: Iterable[str]) -> dict[str, int]:
    """Reset torch's peak statistics on ``devs`` (``"cuda:N"``); returns what each had reserved.

    Empty when torch is not in use. A test that starts CUDA itself needs no reset: its
    peak counts from its own initialisation.
    """
    cuda = initialised_cuda()
    if cuda is None:
        return {}
    base: dict[str, int] = {}
    for dev in _cuda_devices(devs):
        with contextlib.suppress(Exception):
            base[dev] = int(cuda.memory_reserved(dev))
            cuda.reset_peak_memory_stats(dev)
    return base


def torch_peak_stop(devs: Iterable[str], baseline: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bytes torch's allocator reserved at its highest on each of ``devs`` since the start,
    above what it held then (``baseline`` from :func:`torch_peak_start`). Empty when torch
    is not in use."""
    cuda = initialised_cuda()
    if cuda is None:
        return {}
    base = baseline or {}
    peaks: dict[str, int] = {}
    for dev in _cuda_devices(devs):
        with contextlib.suppress(Exception):
            peaks[dev] = max(0, int(cuda.max_memory_reserved(dev)) - base.get(dev, 0))
    return peaks


def release_cached() -> bool:
    """Give torch's cached, unused blocks back to the driver after a GPU test.

    Without this, a worker keeps its previous test's peak reserved and the next lease on the
    GPU no longer matches what is really free. Returns whether torch was in use.
    """
    cuda = initialised_cuda()
    if cuda is None:
        return False
    with contextlib.suppress(Exception):
        cuda.empty_cache()
    return True
