"""xdist's scheduler under ``--dist load`` when the session dispatches by memory.

:class:`MemoryScheduling` follows xdist's ``Scheduling`` protocol (``xdist/scheduler/protocol.py``)
and drives the pure :class:`~pytest_gpushare.dispatch.dispatcher.Dispatcher`. Until every
worker's collection is in it hands everything to an xdist ``LoadScheduling`` as well; at
:meth:`~MemoryScheduling.schedule` it decides once:

* **memory**: a local worker reported its tests' needs (:mod:`.needs`), every worker has a home
  GPU, and memory can bind (:func:`~.order.memory_binds`): from then on the dispatcher decides;
* **xdist**: otherwise (no GPU, remote workers, no GPU tests, or room for every worker's largest
  test at once): the ``LoadScheduling`` goes on alone, and the run is xdist's own, in its order.

In memory mode, after every event: a worker whose running test has waited for memory in the
session's broker for :data:`STEAL_AFTER_S` has the tests it has not yet taken in hand taken back
(xdist's ``steal``: all or none), so that other workers run them; then the worker that reported
and every worker that would take more are filled. With nothing pending a worker is told to shut
down (it runs what it has), unless tests may still come back from a steal. Workers that xdist is
shutting down (``-x``, ``--maxfail``, Ctrl-C, a crashed worker's replacement limit) are sent
nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
from xdist.remote import Producer
from xdist.report import report_collection_diff
from xdist.scheduler import LoadScheduling
from xdist.workermanage import WorkerController, parse_tx_spec_config

from pytest_gpushare.dispatch.dispatcher import Dispatcher
from pytest_gpushare.dispatch.lines import Joining
from pytest_gpushare.dispatch.needs import INPUT_KEY, read_needs
from pytest_gpushare.dispatch.order import Demand, MarkedNeed, demand_of, memory_binds
from pytest_gpushare.dispatch.plan import make_plan, rooms_for

__all__ = ["STEAL_AFTER_S", "MemoryScheduling", "SessionFacts"]

#: A worker whose running test has waited this long for memory gives back its queued tests.
STEAL_AFTER_S = 0.5


@dataclass(frozen=True)
class SessionFacts:
    """What the scheduler knows of the session besides xdist.

    ``usable``/``totals``: bytes per GPU uuid (the plan's usable memory, the devices' totals);
    ``context_bytes``: one worker's CUDA context booking; ``home``: a worker's home GPU uuid, None
    when unknown (a worker on another host); ``durations``: seconds per node id from earlier runs;
    ``waiting``: for each worker whose request waits in the session's broker now, when (as
    ``time.monotonic()``) its oldest one started.
    """

    usable: Mapping[str, int]
    totals: Mapping[str, int]
    context_bytes: int
    home: Callable[[Any], str | None]
    durations: Mapping[str, float]
    waiting: Callable[[], Mapping[str, float]]
    clock: Callable[[], float] = time.monotonic


class MemoryScheduling:
    """The memory-aware ``--dist load`` scheduler (see the module docstring)."""

    def __init__(self, config: pytest.Config, log: Producer | None, facts: SessionFacts) -> None:
        self.config = config
        self.log = log.memsched if log is not None else Producer("memsched", enabled=False)
        self.facts = facts
        self._load = LoadScheduling(config, log)
        self._numnodes = len(parse_tx_spec_config(config))
        self._nodes: dict[WorkerController, None] = {}  # in order of arrival
        self._collections: dict[WorkerController, list[str]] = {}
        self._needs: list[MarkedNeed | None] | None = None
        self._core: Dispatcher[str] | None = None
        self._collection: list[str] = []
        self._steal_from: WorkerController | None = None
        self._gpu_homes: Counter[str | None] = Counter()  # the plan's GPU workers per home GPU
        #: How dispatch decided ("memory", or "xdist: <why>"); None before the first schedule().
        self.mode: str | None = None
        #: Seconds each test took (node id), for the next run's order.
        self.durations: dict[str, float] = {}

    @property
    def _xdist(self) -> bool:
        return self._core is None

    # --- the protocol: state -----------------------------------------------------------------

    @property
    def nodes(self) -> list[WorkerController]:
        return self._load.nodes if self._xdist else list(self._nodes)

    @property
    def collection_is_completed(self) -> bool:
        return len(self._collections) >= self._numnodes

    @property
    def tests_finished(self) -> bool:
        if self._core is None:
            return bool(self._load.tests_finished)
        return self.collection_is_completed and self._steal_from is None and self._core.done

    @property
    def has_pending(self) -> bool:
        return bool(self._load.has_pending) if self._core is None else self._core.busy

    # --- the protocol: nodes and collections -------------------------------------------------

    def add_node(self, node: WorkerController) -> None:
        self._nodes[node] = None
        if self._core is None:
            self._load.add_node(node)
            return
        # A replacement worker takes GPU tests where the plan has fewer GPU workers at its home
        # than it chose (one of them died), and once the plan's workers joined (every one does).
        home = self.facts.home(node)
        self._core.add_worker(
            node.gateway.id, home, gpu=self._core.gpu_workers_at(home) < self._gpu_homes[home]
        )

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        ids = list(collection)
        if self._core is None:
            self._load.add_node_collection(node, ids)
        elif ids != self._collection:  # a replacement worker that collected otherwise
            other = next(iter(self._collections))
            self.log(report_collection_diff(self._collection, ids, other.gateway.id, node.gateway.id))
            return
        self._collections[node] = ids
        if self._needs is None and self.mode is None:
            path = getattr(node, "workerinput", {}).get(INPUT_KEY, {}).get("needs_path")
            self._needs = None if path is None else read_needs(path, ids)

    def remove_node(self, node: WorkerController) -> str | None:
        self._nodes.pop(node, None)  # its collection stays counted, as xdist's schedulers count it
        if self._core is None:
            crashitem: str | None = self._load.remove_node(node)
            return crashitem
        if self._steal_from is node:
            self._steal_from = None
        crashed = self._core.remove_worker(node.gateway.id)
        self._check_all()
        return None if crashed is None else self._collection[crashed]

    # --- the protocol: tests -----------------------------------------------------------------

    def schedule(self) -> None:
        assert self.collection_is_completed
        if self.mode is None:
            self.mode = self._decide()
            self.log("dispatch:", self.mode)
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None and self.config.get_verbosity() > 0:
                tr.write_line(f"gpushare: dispatch: {self.mode}")
        if self._core is None:
            self._load.schedule()
        else:
            self._check_all()

    def mark_test_complete(self, node: WorkerController, item_index: int, duration: float = 0) -> None:
        if self._core is None:
            collection = self._load.collection
            if collection is not None:
                self.durations[collection[item_index]] = duration
            self._load.mark_test_complete(node, item_index, duration)
            return
        self.durations[self._collection[item_index]] = duration
        self._core.completed(node.gateway.id, item_index, duration)
        self._after_event(node)

    def mark_test_pending(self, item: str) -> None:
        if self._core is None:
            self._load.mark_test_pending(item)
            return
        self._core.requeue(self._collection.index(item))
        self._check_all()

    def remove_pending_tests_from_node(self, node: WorkerController, indices: Sequence[int]) -> None:
        """A steal's answer: the tests taken back (none when the worker had started one)."""
        if self._core is None:
            self._load.remove_pending_tests_from_node(node, indices)
            return
        if self._steal_from is node:
            self._steal_from = None
        if indices and node in self._nodes:
            self._core.take_back(node.gateway.id, indices)
        self._check_all()

    # --- deciding ----------------------------------------------------------------------------

    def _decide(self) -> str:
        """ "memory" when the dispatcher takes over from here, else why the run stays xdist's."""
        why = self._why_xdist()
        if why is not None:
            return f"xdist: {why}"
        needs = self._needs
        assert needs is not None
        homes = [h for h in map(self.facts.home, self._nodes) if h is not None]
        rooms = rooms_for(self.facts.usable, homes, self.facts.context_bytes)
        if not memory_binds(self._demands(needs, rooms), homes, rooms):
            return "xdist: every worker's largest test fits at once"
        self._collection = next(iter(self._collections.values()))
        durations = [self.facts.durations.get(t) for t in self._collection]
        usable, context = self.facts.usable, self.facts.context_bytes
        plan = make_plan(homes, usable, context, partial(self._demands, needs), durations)
        rooms = rooms_for(usable, [homes[i] for i in plan.gpu], context)
        joining = None
        if plan.threshold is not None:
            full = rooms_for(usable, homes, context)
            joining = Joining(plan.threshold, full, self._demands(needs, full))
        core: Dispatcher[str] = Dispatcher(
            rooms, self._demands(needs, rooms), durations, workers=len(self._nodes), joining=joining
        )
        for i, (node, home) in enumerate(zip(self._nodes, homes, strict=True)):
            core.add_worker(node.gateway.id, home, gpu=i in plan.gpu)
        self._gpu_homes = Counter(homes[i] for i in plan.gpu)
        self._core = core
        return "memory" + plan.describe(len(homes))

    def _why_xdist(self) -> str | None:
        collections = list(self._collections.values())
        if any(c != collections[0] for c in collections):
            return "the workers collected different tests"
        if not collections[0]:
            return "no tests"
        if self._needs is None:
            return "no worker reported its tests' needs"
        if any(self.facts.home(n) is None for n in self._nodes):
            return "a worker without a home GPU"
        if all(n is None for n in self._needs):
            return "no GPU tests"
        return None

    def _demands(self, needs: Sequence[MarkedNeed | None], rooms: Mapping[str, int]) -> list[Demand]:
        known: dict[MarkedNeed | None, Demand] = {}
        out = []
        for need in needs:
            demand = known.get(need)
            if demand is None:
                demand = known[need] = demand_of(need, self.facts.totals, rooms)
            out.append(demand)
        return out

    # --- sending -----------------------------------------------------------------------------

    def _after_event(self, node: WorkerController) -> None:
        waiting = self._steal_if_waiting()
        if node.gateway.id not in waiting:
            self._check(node)
        self._check_all(waiting)

    def _check_all(self, waiting: frozenset[str] | None = None) -> None:
        """Fill every worker that would take more, but those whose test waits for memory: one
        test to each in turn, as xdist's load deals its first tests out, so that a few tests
        are spread over the workers rather than queued behind one another on the first."""
        core = self._core
        assert core is not None
        hungry = set(core.hungry(exclude=self._waiting() if waiting is None else waiting))
        turn = [n for n in self._nodes if n.gateway.id in hungry]
        dealt: dict[WorkerController, list[int]] = {}
        first = True
        while turn and core.pending:
            turn = [n for n in turn if self._deal(n, dealt, refill=not first)]
            first = False
        for node, indices in dealt.items():
            node.send_runtest_some(indices)
        if not core.pending and self._steal_from is None:
            for node in [n for n in self._nodes if n.gateway.id in hungry]:
                self._check(node)  # nothing left to send: it is told to shut down

    def _deal(
        self, node: WorkerController, dealt: dict[WorkerController, list[int]], *, refill: bool
    ) -> bool:
        """One test for ``node`` (into ``dealt``); whether it got one."""
        core = self._core
        assert core is not None
        if node.shutting_down:
            core.close(node.gateway.id)
            return False
        sent = core.fill(node.gateway.id, self.facts.clock(), 1, refill=refill)
        if sent:
            dealt.setdefault(node, []).extend(sent)
        return bool(sent)

    def _check(self, node: WorkerController) -> None:
        core = self._core
        assert core is not None
        wid = node.gateway.id
        if node.shutting_down:
            core.close(wid)
            return
        if core.pending:
            sent = core.fill(wid, self.facts.clock())
            if sent:
                node.send_runtest_some(sent)
        elif self._steal_from is None:
            core.close(wid)
            node.shutdown()

    def _waiting(self) -> frozenset[str]:
        """The workers whose test has waited for memory in the broker for STEAL_AFTER_S."""
        now = self.facts.clock()
        return frozenset(w for w, since in self.facts.waiting().items() if now - since >= STEAL_AFTER_S)

    def _steal_if_waiting(self) -> frozenset[str]:
        """The workers whose running test waits for memory; takes back one's queued tests."""
        core = self._core
        assert core is not None
        waiting = self._waiting()
        if not waiting or self._steal_from is not None:
            return waiting
        takers = [n for n in self._nodes if not n.shutting_down and n.gateway.id not in waiting]
        plan = core.steal_plan(waiting) if takers else None
        if plan is not None:
            wid, indices = plan
            node = next(n for n in self._nodes if n.gateway.id == wid)
            if not node.shutting_down:
                node.send_steal(indices)
                self._steal_from = node
        return waiting
