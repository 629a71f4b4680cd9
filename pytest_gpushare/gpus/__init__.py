"""The GPUs of this box: one seam (:class:`~pytest_gpushare.gpus.model.GpuProbe`), two probes.

:class:`~pytest_gpushare.gpus.nvml.NvmlProbe` asks NVML through ``pynvml`` (nvidia-ml-py),
started lazily; :class:`~pytest_gpushare.gpus.simulated.SimulatedProbe` answers from
``--gpushare-simulate``. :mod:`~pytest_gpushare.gpus.visible` says what this process can see
(``CUDA_VISIBLE_DEVICES``, other PIDs). Importing this package imports neither ``pynvml`` nor
NVML's module.
"""

from __future__ import annotations

from pytest_gpushare.gpus.model import Gpu, GpuInventory, GpuProbe, GpuProcess
from pytest_gpushare.gpus.simulated import SimulatedProbe

__all__ = ["Gpu", "GpuInventory", "GpuProbe", "GpuProcess", "SimulatedProbe", "probe_for"]


def probe_for(simulate: str | None, source: str = "--gpushare-simulate") -> GpuProbe:
    """The probe for a session: simulated GPUs when ``simulate`` is set, else NVML.

    ``simulate="none"`` means no GPU at all, even where NVML would find some. A bad spec
    raises :class:`SettingError` naming ``source``.
    """
    if simulate is not None:
        return SimulatedProbe(simulate, source)
    from pytest_gpushare.gpus.nvml import NvmlProbe

    return NvmlProbe()
