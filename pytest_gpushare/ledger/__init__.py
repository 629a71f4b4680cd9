"""File-locked lease ledgers shared by every process and session on the box: the facade.

Any process that wants GPU memory opens a :class:`Ledger` on the shared ledger folder and calls
:meth:`Ledger.acquire` / :meth:`Ledger.release`. Files in the folder:

* ``gpu-<uuid>.json`` per GPU, guarded by ``gpu-<uuid>.lock`` (kernel flock: a free lock is
  taken at once, a busy one waited for in the kernel, never past the caller's deadline): the
  owners that use the GPU with the usable memory their sessions computed, the bookings (test
  leases and CUDA contexts) and the waiters. Replaced atomically under the lock (a reader never
  sees half a file), framed with a checksum so that damage reads as damage, and with a
  generation number that grows with every write; the payload begins with the sessions that wait
  on the GPU, which a broker reads without the lock to give its spare memory back at once.
* ``live-<key>.lock`` per owning process, flocked for its whole life: a booking or waiter whose
  owner's lock can be taken belongs to a dead process and is reclaimed, with a log line, at the
  next access of any process (``gone-<key>.lock``, the file renamed, tells the others so). Its
  content is what the owner holds, written before a grant reaches a ledger: the source of truth
  that every access holds the ledgers to, and rebuilds a damaged one from. An owner whose file
  is missing or cannot be opened is trusted for a bounded time only; a live owner puts a removed
  file back at once.

What a group member can and cannot do to the others through this folder, and what each failure
looks like, is in docs/concepts/trust-model.rst.

Everything outside this package uses only the names below, imported on first use (PEP 562), so
that a caller of the pure rules and records (``evaluate``, ``place``, ``GpuState``...: the
controller's broker) loads no locks or files.
Inside, calls go one way, from the bottom up: :mod:`.folder` (where the ledgers live, the checked
folder held open) and :mod:`.files` (its files: opened relative to it, read whole, replaced
atomically, junk set aside); :mod:`.procfs` (what the kernel says about locks and processes) and
:mod:`.locks` (the flocks, kernel wait for a busy one); :mod:`.records` (what the files record)
and :mod:`.codec` (those records as framed bytes); :mod:`.liveness` (this process's own lock and
its watch) and :mod:`.probe` (whether another owner lives, and its holdings); :mod:`.views` (the
status document and the lines about it); :mod:`.owners` (a ledger held to the holdings) and
:mod:`.access` (one locked pass: load, repair, reclaim the dead, save); :mod:`.status` (one such
pass over every ledger, for ``gpushare status``); :mod:`.admission` (the pure rules: who may
take memory now); :mod:`.holder` (what this process holds, pressed on every ledger it touches),
:mod:`.passes` (this process's passes and its presence in the folder), :mod:`.signals` (what
is seen without the locks: a ledger written, another session waiting) and :mod:`.handle` (the
:class:`Ledger`) on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpushare.lazy import lazy_exports

if TYPE_CHECKING:
    from pytest_gpushare.ledger.admission import (
        FAIR_AFTER_S,
        Fit,
        LedgerGpu,
        Need,
        candidates,
        choose,
        evaluate,
        ledger_gpus,
        never_fits,
        place,
        waiter_of,
    )
    from pytest_gpushare.ledger.folder import default_ledger_dir, ledger_dir_for, prepare_ledger_dir
    from pytest_gpushare.ledger.handle import Ledger
    from pytest_gpushare.ledger.records import CONTEXT, TEST, Booking, GpuState, Lease, Owner, Waiter
    from pytest_gpushare.ledger.status import read_status
    from pytest_gpushare.ledger.views import holders_text, trust_lines, waiting_lines

#: public name -> the module that defines it
_HOMES = {
    "CONTEXT": "pytest_gpushare.ledger.records",
    "FAIR_AFTER_S": "pytest_gpushare.ledger.admission",
    "TEST": "pytest_gpushare.ledger.records",
    "Booking": "pytest_gpushare.ledger.records",
    "Fit": "pytest_gpushare.ledger.admission",
    "GpuState": "pytest_gpushare.ledger.records",
    "Lease": "pytest_gpushare.ledger.records",
    "Ledger": "pytest_gpushare.ledger.handle",
    "LedgerGpu": "pytest_gpushare.ledger.admission",
    "Need": "pytest_gpushare.ledger.admission",
    "Owner": "pytest_gpushare.ledger.records",
    "Waiter": "pytest_gpushare.ledger.records",
    "candidates": "pytest_gpushare.ledger.admission",
    "choose": "pytest_gpushare.ledger.admission",
    "default_ledger_dir": "pytest_gpushare.ledger.folder",
    "evaluate": "pytest_gpushare.ledger.admission",
    "holders_text": "pytest_gpushare.ledger.views",
    "ledger_dir_for": "pytest_gpushare.ledger.folder",
    "ledger_gpus": "pytest_gpushare.ledger.admission",
    "never_fits": "pytest_gpushare.ledger.admission",
    "place": "pytest_gpushare.ledger.admission",
    "prepare_ledger_dir": "pytest_gpushare.ledger.folder",
    "read_status": "pytest_gpushare.ledger.status",
    "trust_lines": "pytest_gpushare.ledger.views",
    "waiting_lines": "pytest_gpushare.ledger.views",
    "waiter_of": "pytest_gpushare.ledger.admission",
}

__all__ = [
    "CONTEXT",
    "FAIR_AFTER_S",
    "TEST",
    "Booking",
    "Fit",
    "GpuState",
    "Lease",
    "Ledger",
    "LedgerGpu",
    "Need",
    "Owner",
    "Waiter",
    "candidates",
    "choose",
    "default_ledger_dir",
    "evaluate",
    "holders_text",
    "ledger_dir_for",
    "ledger_gpus",
    "never_fits",
    "place",
    "prepare_ledger_dir",
    "read_status",
    "trust_lines",
    "waiter_of",
    "waiting_lines",
]

__getattr__, __dir__ = lazy_exports(globals(), _HOMES)
