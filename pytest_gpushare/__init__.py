"""pytest-gpushare: VRAM-aware ``-n auto`` and per-GPU memory leases for shared GPU boxes."""

from __future__ import annotations

from pytest_gpushare.errors import GpuShareError, LeaseTimeout, LedgerError, NeverFits, SettingError
from pytest_gpushare.fixtures import GpuLease, lease
from pytest_gpushare.planner import Reservation

__version__ = "0.1.0"

__all__ = [
    "GpuLease",
    "GpuShareError",
    "LeaseTimeout",
    "LedgerError",
    "NeverFits",
    "Reservation",
    "SettingError",
    "__version__",
    "lease",
]
