"""xdist's side of memory-aware dispatch (pytest_gpushare.dispatch.scheduling) with stand-in
workers: what it sends, takes back and reports, beside xdist's own LoadScheduling."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScheduling

from pytest_gpushare.dispatch.needs import INPUT_KEY, write_needs
from pytest_gpushare.dispatch.order import MarkedNeed
from pytest_gpushare.dispatch.scheduling import STEAL_AFTER_S, MemoryScheduling, SessionFacts
from pytest_gpushare.units import GiB, MemRequest

G = "GPU-0"
IDS = [f"t.py::test[{i}]" for i in range(40)]


class Config:
    """The little of pytest's config that the schedulers read."""

    def __init__(self, workers: int) -> None:
        self.values = {"tx": [f"{workers}*popen"], "maxschedchunk": None}
        self.pluginmanager = self

    def getvalue(self, name: str) -> Any:
        return self.values[name]

    getoption = getvalue

    def get_plugin(self, name: str) -> None:
        return None

    def get_verbosity(self) -> int:
        return 0


class Node:
    """A stand-in xdist worker: records what it is sent."""

    def __init__(self, wid: str, needs_path: Path | None = None) -> None:
        self.gateway = type("Gateway", (), {"id": wid, "spec": None})()
        self.workerinput = {} if needs_path is None else {INPUT_KEY: {"needs_path": str(needs_path)}}
        self.sent: list[list[int]] = []
        self.steals: list[list[int]] = []
        self.shutting_down = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.append(list(indices))

    def send_steal(self, indices: list[int]) -> None:
        self.steals.append(list(indices))

    def shutdown(self) -> None:
        self.shutting_down = True


def facts(waiting: Mapping[str, float] | None = None, clock: float = 100.0) -> SessionFacts:
    """The session: one 24GiB GPU; ``waiting`` (read at each call) as the broker would answer."""
    return SessionFacts(
        usable={G: 23 * GiB},
        totals={G: 24 * GiB},
        context_bytes=GiB // 2,
        home=lambda node: G,
        durations=dict.fromkeys(IDS, 0.001),  # short tests: queues go deeper than two
        waiting=lambda: dict(waiting or {}),  # a copy of the caller's dict, as it is now
        clock=lambda: clock,
    )


def start(sched: Any, nodes: list[Node], ids: list[str]) -> None:
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, ids)
    sched.schedule()


def test_without_needs_the_run_is_xdists_load_scheduling() -> None:
    ours, theirs = [Node("gw0"), Node("gw1")], [Node("gw0"), Node("gw1")]
    mine = MemoryScheduling(Config(2), None, facts())  # type: ignore[arg-type]
    load = LoadScheduling(Config(2), None)  # type: ignore[arg-type]
    start(mine, ours, IDS)
    start(load, theirs, IDS)
    assert mine.mode == "xdist: no worker reported its tests' needs"
    for step in range(12):
        a, b = ours[step % 2], theirs[step % 2]
        index = [i for batch in a.sent for i in batch][step // 2]
        mine.mark_test_complete(a, index, 0.01)
        load.mark_test_complete(b, index, 0.01)
        assert [n.sent for n in ours] == [n.sent for n in theirs]
    assert (mine.tests_finished, mine.has_pending) == (load.tests_finished, load.has_pending)
    assert len(mine.durations) == 12 and set(mine.durations) <= set(IDS)


def memory_run(
    tmp_path: Path, waiting: Mapping[str, float] | None = None
) -> tuple[MemoryScheduling, list[Node]]:
    """Two workers; test 0 needs 14GiB, the others 1GiB: memory binds (two 14GiB would not fit)."""
    needs = [MarkedNeed(MemRequest(bytes=14 * GiB))] + [MarkedNeed(MemRequest(bytes=GiB))] * (len(IDS) - 1)
    write_needs(tmp_path / "needs-gw0.json", IDS, needs)
    nodes = [Node("gw0", tmp_path / "needs-gw0.json"), Node("gw1")]
    sched = MemoryScheduling(Config(2), None, facts(waiting))  # type: ignore[arg-type]
    start(sched, nodes, IDS)
    assert sched.mode == "memory"
    return sched, nodes


def test_a_worker_that_waits_for_memory_gives_back_its_queued_tests(tmp_path: Path) -> None:
    waiting: dict[str, float] = {}
    sched, (gw0, gw1) = memory_run(tmp_path, waiting)
    waiting["gw0"] = 100.0 - STEAL_AFTER_S  # its 14GiB test waits for memory (another session's)
    held = [i for batch in gw0.sent for i in batch]
    assert held[0] == 0  # the 14GiB test first
    first = gw1.sent[0][0]
    sched.mark_test_complete(gw1, first, 0.01)
    assert gw0.steals == [held[2:]] and len(held) > 2
    assert not sched.tests_finished  # the answer is awaited
    sched.remove_pending_tests_from_node(gw0, held[2:])
    # gw1 runs its tests; the ones taken back come to it, the waiting worker is sent nothing
    done = {first}
    for _ in range(len(IDS)):
        sent_to_gw1 = [i for batch in gw1.sent for i in batch]
        if set(held[2:]) <= set(sent_to_gw1):
            break
        index = next(i for i in sent_to_gw1 if i not in done)
        done.add(index)
        sched.mark_test_complete(gw1, index, 0.01)
    assert set(held[2:]) <= {i for batch in gw1.sent for i in batch}
    assert len(gw0.sent) == 1


def run_to_the_end(sched: MemoryScheduling, nodes: list[Node], done: list[int]) -> None:
    """Play xdist: each worker completes its tests in order (it starts one only with the next in
    hand, or once shut down); when the scheduler says the tests are finished, every worker is
    shut down (DSession.triggershutdown) and runs what it holds."""
    for _ in range(10 * len(IDS)):
        for node in nodes:
            sent = [i for batch in node.sent for i in batch if i not in done]
            if len(sent) >= 2 or (sent and node.shutting_down):
                done.append(sent[0])
                sched.mark_test_complete(node, sent[0], 0.01)
                break
        else:
            if not sched.tests_finished or all(n.shutting_down for n in nodes):
                return
            for node in nodes:
                node.shutdown()
    pytest.fail("the run did not end")


def test_a_dead_workers_tests_run_on_the_others_once_each(tmp_path: Path) -> None:
    sched, (gw0, gw1) = memory_run(tmp_path)
    held = [i for batch in gw0.sent for i in batch]
    assert sched.remove_node(gw0) == IDS[held[0]]  # the one it ran is reported as crashed
    replacement = Node("gw2")
    sched.add_node(replacement)
    sched.add_node_collection(replacement, IDS)
    sched.schedule()
    done: list[int] = []
    run_to_the_end(sched, [gw1, replacement], done)
    assert sorted(done) == [i for i in range(len(IDS)) if i != held[0]]


def test_workers_that_xdist_shuts_down_are_sent_nothing(tmp_path: Path) -> None:
    sched, nodes = memory_run(tmp_path)
    for node in nodes:  # -x, --maxfail: xdist shuts every worker down
        node.shutdown()
    before = [list(n.sent) for n in nodes]
    done: list[int] = []
    run_to_the_end(sched, nodes, done)
    assert [n.sent for n in nodes] == before


MIX = [(14, 3.0)] * 5 + [(6, 1.0)] * 15 + [(1, 0.2)] * 40
MIX_IDS = [f"t.py::test[{i}]" for i in range(len(MIX))]


def mix_run(tmp_path: Path) -> tuple[MemoryScheduling, list[Node]]:
    """Issue 14's mix on 21GiB with 7 workers and durations from an earlier run, scheduled."""
    write_needs(tmp_path / "needs.json", MIX_IDS, [MarkedNeed(MemRequest(bytes=g * GiB)) for g, _ in MIX])
    nodes = [Node(f"gw{i}", tmp_path / "needs.json") for i in range(7)]
    session = SessionFacts(
        usable={G: 21 * GiB},
        totals={G: 24 * GiB},
        context_bytes=GiB // 2,
        home=lambda node: G,
        durations={t: s for t, (_, s) in zip(MIX_IDS, MIX, strict=True)},
        waiting=dict,
        clock=lambda: 100.0,
    )
    sched = MemoryScheduling(Config(7), None, session)  # type: ignore[arg-type]
    start(sched, nodes, MIX_IDS)
    return sched, nodes


def test_where_contexts_crowd_the_card_gpu_tests_go_to_fewer_workers(tmp_path: Path) -> None:
    # The plan runs GPU tests on 2 workers (2 CUDA contexts leave room for a 6GiB test beside a
    # 14GiB one) until no test over 1GiB waits, then on all 7.
    sched, nodes = mix_run(tmp_path)
    assert sched.mode == "memory, GPU tests on 2 of 7 workers, all 7 once no test over 1.0GiB waits"
    assert [bool(n.sent) for n in nodes] == [True, True] + [False] * 5
    done: list[int] = []
    run_to_the_end(sched, nodes, done)
    assert sorted(done) == list(range(len(MIX)))
    joined = {i for node in nodes[2:] for batch in node.sent for i in batch}
    assert joined and all(MIX[i][0] == 1 for i in joined)  # the others ran only 1GiB tests


def test_a_crashed_gpu_workers_replacement_takes_its_place_before_the_joining(tmp_path: Path) -> None:
    sched, nodes = mix_run(tmp_path)
    gw0 = nodes[0]
    sched.remove_node(gw0)
    replacement = Node("gw7", tmp_path / "needs.json")
    sched.add_node(replacement)
    sched.add_node_collection(replacement, MIX_IDS)
    sched.schedule()
    sent = [i for batch in replacement.sent for i in batch]
    assert sent and MIX[sent[0]][0] > 1  # a large test: it runs GPU tests as gw0 did
    assert not any(n.sent for n in nodes[2:])  # the others still wait for the joining


@pytest.mark.parametrize("bad", ["", "{}", '{"version": 1, "digest": "x", "classes": [], "tests": []}'])
def test_a_needs_file_of_another_collection_is_no_file(tmp_path: Path, bad: str) -> None:
    from pytest_gpushare.dispatch.needs import read_needs

    path = tmp_path / "needs.json"
    path.write_text(bad)
    assert read_needs(path, IDS) is None
    write_needs(path, IDS[:-1], [None] * (len(IDS) - 1))
    assert read_needs(path, IDS) is None
    write_needs(path, IDS, [None, MarkedNeed(MemRequest(percent=50.0), 2, True, True)] * 20)
    assert read_needs(path, IDS) == [None, MarkedNeed(MemRequest(percent=50.0), 2, True, True)] * 20
