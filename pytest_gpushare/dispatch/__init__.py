"""Memory-aware dispatch: which test each xdist worker gets under ``--dist load``.

xdist's load scheduler hands tests to workers blind to memory: a worker whose test waits for
memory holds the tests queued behind it. Here the controller sends each worker only tests that
fit beside what the other workers may hold, larger and longer first (docs/concepts/dispatch.rst).

From the bottom up: :mod:`.order` (what a test takes, which goes first), :mod:`.fit` (what each
worker may hold, and when), :mod:`.queues` (what each worker was sent), :mod:`.dispatcher` (the
decisions), :mod:`.plan` (how many workers run GPU tests; these five are pure), :mod:`.needs`
(the file in which a worker reports its tests' needs) and :mod:`.scheduling` (xdist's scheduler,
imported only where xdist runs; ``pytest_gpushare.workers`` makes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpushare.lazy import lazy_exports

if TYPE_CHECKING:
    from pytest_gpushare.dispatch.dispatcher import LOOKAHEAD_S, STARVE_S, Dispatcher
    from pytest_gpushare.dispatch.order import NO_GPU, Demand, MarkedNeed

#: public name -> the module that defines it. Imported on first use (PEP 562): a worker writes
#: its needs file (:mod:`.needs`, :mod:`.order`) and never loads the dispatcher.
_HOMES = {
    "LOOKAHEAD_S": "pytest_gpushare.dispatch.dispatcher",
    "STARVE_S": "pytest_gpushare.dispatch.dispatcher",
    "Dispatcher": "pytest_gpushare.dispatch.dispatcher",
    "NO_GPU": "pytest_gpushare.dispatch.order",
    "Demand": "pytest_gpushare.dispatch.order",
    "MarkedNeed": "pytest_gpushare.dispatch.order",
}

__all__ = ["LOOKAHEAD_S", "NO_GPU", "STARVE_S", "Demand", "Dispatcher", "MarkedNeed"]

__getattr__, __dir__ = lazy_exports(globals(), _HOMES)
