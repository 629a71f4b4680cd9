"""The environment that shows a process exactly some GPUs, and where CUDA numbers one of them.

Pure: values in, values out; no pytest, no NVML, no CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pytest_gpushare.gpus.model import Gpu

__all__ = ["cuda_ordinal", "cuda_visible_env"]


def cuda_visible_env(gpus: Sequence[Gpu]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` listing ``gpus`` by UUID in this order (``cuda:0`` is the first),
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; empty when any of them is simulated.

    By UUID, the list means the same GPUs whatever the inherited ``CUDA_VISIBLE_DEVICES`` was and
    whatever order CUDA would pick. A simulated GPU has no CUDA device behind it: the process keeps
    the inherited visibility, so a made-up UUID does not hide a real GPU.
    """
    if not gpus or any(g.simulated for g in gpus):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cuda_ordinal(uuid: str, environ: Mapping[str, str]) -> int | None:
    """``N`` of ``cuda:N`` for ``uuid`` where ``environ``'s ``CUDA_VISIBLE_DEVICES`` lists it by
    UUID; None where it does not (the caller falls back to the GPU's index in the session)."""
    listed = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return listed.index(uuid) if uuid in listed else None
