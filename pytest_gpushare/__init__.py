"""pytest-gpushare: VRAM-aware ``-n auto`` and per-GPU memory leases for shared GPU boxes.

The public names are imported on first use (PEP 562), so importing a pure module such as
``pytest_gpushare.units`` loads no pytest, filelock, requests, pynvml or ledger code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpushare.lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pytest_gpushare.errors import GpuShareError, LeaseTimeout, LedgerError, NeverFits, SettingError
    from pytest_gpushare.gpus.model import Gpu, GpuInventory, GpuProcess
    from pytest_gpushare.planner import Reservation
    from pytest_gpushare.runtime import GpuLease
    from pytest_gpushare.testhooks import lease

#: public name -> the module that defines it
_HOMES = {
    "Gpu": "pytest_gpushare.gpus.model",
    "GpuInventory": "pytest_gpushare.gpus.model",
    "GpuLease": "pytest_gpushare.runtime",
    "GpuProcess": "pytest_gpushare.gpus.model",
    "GpuShareError": "pytest_gpushare.errors",
    "LeaseTimeout": "pytest_gpushare.errors",
    "LedgerError": "pytest_gpushare.errors",
    "NeverFits": "pytest_gpushare.errors",
    "Reservation": "pytest_gpushare.planner",
    "SettingError": "pytest_gpushare.errors",
    "lease": "pytest_gpushare.testhooks",
}

__all__ = [
    "Gpu",
    "GpuInventory",
    "GpuLease",
    "GpuProcess",
    "GpuShareError",
    "LeaseTimeout",
    "LedgerError",
    "NeverFits",
    "Reservation",
    "SettingError",
    "__version__",
    "lease",
]

__getattr__, __dir__ = lazy_exports(globals(), _HOMES)
