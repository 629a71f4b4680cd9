"""File-locked lease ledgers shared by every process and session on the box: the facade.

Everything outside this package uses only the names below. Inside, calls go one way, from the
bottom up: :mod:`.folder` (where the ledgers live, safe opening, atomic I/O, locks),
:mod:`.records` (what a ledger and an owner's holdings file contain), :mod:`.liveness` (who owns
a lease and whether that process lives), :mod:`.access` (one locked pass over a ledger: load,
repair, reclaim the dead, save), :mod:`.admission` (the pure rules: who may take memory now) and
:mod:`.handle` (the :class:`Ledger` a process opens, with acquire and release) on top.
"""

from __future__ import annotations

from pytest_gpushare.ledger.admission import LedgerGpu, Need, ledger_gpus
from pytest_gpushare.ledger.folder import default_ledger_dir, ledger_dir_for, prepare_ledger_dir
from pytest_gpushare.ledger.handle import Lease, Ledger, read_status, waiting_lines
from pytest_gpushare.ledger.liveness import Owner
from pytest_gpushare.ledger.records import CONTEXT

__all__ = [
    "CONTEXT",
    "Lease",
    "Ledger",
    "LedgerGpu",
    "Need",
    "Owner",
    "default_ledger_dir",
    "ledger_dir_for",
    "ledger_gpus",
    "prepare_ledger_dir",
    "read_status",
    "waiting_lines",
]
