"""What the controller (or the single pytest process) shows and keeps of the session.

The header (the VRAM analysis, which ``gpushare plan`` prints too), the lines naming tests that
wait for memory, the terminal summary, the JSON report, and the history of observed peaks in
pytest's cache (read back at planning by :func:`pytest_gpushare.session.read_history`).
plugin.py registers one :class:`Collector` per session in ``pytest_configure``, in the
controller only, unless the invocation never plans.

Where the VRAM analysis goes (SPEC "Coexisting"): in the header for ``-n auto`` (the plan made
the worker count) and for xdist workers on a box with GPUs (the plan pinned them); in a single
process right after collection, once GPU tests are known to exist; otherwise nowhere, and the
header has at most one line (:func:`brief_lines`). The ``gpushare`` summary section appears only
when GPU tests or ``lease()`` blocks ran.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_gpushare import ledger, report
from pytest_gpushare import observations as advice
from pytest_gpushare.entries import REPORT_ATTR, LeaseEntry, kept, merged_entry
from pytest_gpushare.ollama import attribute_held
from pytest_gpushare.planner import Plan
from pytest_gpushare.session import (
    MAIN_WORKER,
    env_set,
    get_plan,
    get_settings,
    gpu_work_begun,
    has_own_tests,
    never_plans,
    ollama_status,
    runs_workers,
    session_id,
    suite_gpu_marker,
)
from pytest_gpushare.threads import daemon_thread
from pytest_gpushare.units import format_size
from pytest_gpushare.workers import planned_count, worker_line, xdist_default_count

__all__ = ["Collector", "WaitWatcher", "brief_lines", "header", "plan_lines", "report_header"]

#: A test that still waits hears about it again this often at most.
WAIT_REPEAT_S = 30.0


# --- the header ----------------------------------------------------------------------------------


def header(config: pytest.Config, workers: report.WorkerLine | None = None) -> list[str]:
    """The VRAM analysis block."""
    plan = get_plan(config)
    s = get_settings(config)
    extra = ollama_lines(config, plan) if plan.gpus else []
    ledger_dir = s.ledger_dir or f"{ledger.ledger_dir_for(None)} (this account's private folder)"
    if not s.ledger_dir:
        extra += report.foreign_lines(_foreign_processes(plan))
    extra += coexist_notes(config)
    line = workers or worker_line(config, plan)
    return report.header_lines(plan, line, ledger=ledger_dir, extra=extra)


def marker_note(config: pytest.Config) -> str | None:
    """The line that says a suite's own ``gpu`` marker is left to the suite (SPEC "Coexisting")."""
    if get_settings(config).adopt_marker or suite_gpu_marker(config) is None:
        return None
    return (
        "this suite registers its own gpu marker: bare @pytest.mark.gpu tests are leased the default "
        "memory where a GPU can serve them, never skipped, failed or moved to the CPU "
        "(gpushare_adopt_marker = true makes them gpushare's)"
    )


def coexist_notes(config: pytest.Config) -> list[str]:
    """What the plugin set in this process's environment, and whether the suite's own ``gpu``
    marker is left to it (SPEC "Coexisting")."""
    env = env_set(config)
    notes = [f"set {report.env_text(env)}"] if env else []
    marker = marker_note(config)
    return [*notes, marker] if marker else notes


def brief_lines(config: pytest.Config) -> list[str]:
    """The header of a run that has not (yet) used the box: at most one line, of
    :func:`coexist_notes`."""
    notes = coexist_notes(config)
    return [f"gpushare: {'; '.join(notes)}"] if notes else []


def report_header(config: pytest.Config) -> list[str]:
    """What ``pytest_report_header`` shows: the VRAM analysis where the plan decided something
    already (``-n auto``'s count, or xdist workers to pin on a box with GPUs), else
    :func:`brief_lines`."""
    if never_plans(config):
        return []
    if planned_count(config) or (runs_workers(config) and get_plan(config).gpus):
        config.stash[SHOWN_KEY] = True
        return header(config)
    return brief_lines(config)


#: The VRAM analysis was printed (in the header, or after collection).
SHOWN_KEY = pytest.StashKey[bool]()


def plan_lines(config: pytest.Config) -> list[str]:
    """What ``gpushare plan`` prints: the header as ``pytest -n auto`` would show it here."""
    if never_plans(config):
        return []
    count = get_plan(config).worker_count(xdist_default_count(config))
    return header(config, report.WorkerLine("auto", count.workers, count))


def ollama_lines(config: pytest.Config, plan: Plan) -> list[str]:
    """The header's Ollama lines: address, answer, models, the hold, and what to worry about."""
    status = ollama_status(config)
    s = get_settings(config)
    held = attribute_held(status, plan.inventory.gpus)
    reserve_set = bool(s.ollama_reserve.default or any(s.ollama_reserve.per_index.values()))
    return report.ollama_lines(
        status, plan, reserve_set=reserve_set, held_by_gpu=held.by_gpu, attribution_note=held.note
    )


def _foreign_processes(plan: Plan) -> dict[int, list[int]]:
    """GPU index -> PIDs of other accounts' processes NVML shows there (by /proc ownership)."""
    me = os.getuid()
    found: dict[int, list[int]] = {}
    for g in plan.gpus:
        for proc in g.gpu.processes or ():
            try:
                uid = os.stat(f"/proc/{proc.pid}").st_uid
            except OSError:
                continue
            if uid != me:
                found.setdefault(g.gpu.index, []).append(proc.pid)
    return found


# --- the collection ------------------------------------------------------------------------------


class Collector:
    """The controller's collection of every process's leases, and what it makes of them.

    ``blocks`` gives this process's own ``lease()`` blocks (a run without xdist); workers send
    theirs in ``workeroutput``.
    """

    def __init__(self, config: pytest.Config, blocks: Callable[[], list[LeaseEntry]]) -> None:
        self.config = config
        self._blocks = blocks
        self.collected: list[LeaseEntry] = []
        self.lost: list[str] = []  # tests whose process died holding a lease
        self.crashed: list[str] = []  # workers that died
        #: The setup half of each running GPU test's entry (what it holds), by the worker that
        #: runs it (None: this process) and its node id, until its teardown report.
        self.running: dict[tuple[str | None, str], LeaseEntry] = {}
        #: The GPUs of the lease each worker's last setup report named: a lease it carries on.
        self._gpus: dict[str | None, list[dict[str, Any]]] = {}
        self.started = time.time()
        self._waiter: WaitWatcher | None = None
        self._watch_checked = False
        self._summary: tuple[int, int, dict[str, Any]] | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep a GPU test's entry: its setup half until its teardown half completes it.

        The entry comes off the report once read (trylast: after every other plugin saw the
        report whole): pytest's terminal reporter keeps every report to the end of the run,
        and the entry is kept here once, its repeated strings shared (:func:`kept`)."""
        info = getattr(report, REPORT_ATTR, None)
        if not isinstance(info, dict):
            return
        delattr(report, REPORT_ATTR)
        worker = _worker_of(report)
        entry = kept(cast(LeaseEntry, info), report.nodeid, worker or MAIN_WORKER, self._gpus.get(worker))
        key = (worker, report.nodeid)
        if report.when == "setup":
            self.running[key] = entry
            if "lease" in entry:
                self._gpus[worker] = entry["lease"]["gpus"]
            return
        entry = merged_entry(self.running.pop(key, None), entry)
        entry.setdefault("outcome", report.outcome)
        self.collected.append(entry)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        if error is not None:
            self.crashed.append(f"worker {node.gateway.id} crashed: {error}")
        output = getattr(node, "workeroutput", None) or {}
        self.collected.extend(output.get("gpushare_blocks", []))

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: Any, sched: Any) -> None:
        """A test's worker died under it: only a test that held a lease lost one."""
        entry = self.running.pop((_worker_of(report), crashitem), None)
        if entry is None or "lease" not in entry:
            return
        lease = dict(entry["lease"])
        lease["released_at"] = max(time.time(), lease["taken_at"])  # held until its process died
        self.collected.append(LeaseEntry(test_id=crashitem, outcome="crashed", lease=lease))
        held = ", ".join(f"{format_size(p['bytes'])} on GPU {p['index']}" for p in lease["gpus"])
        self.lost.append(f"{crashitem}: its worker crashed holding {held}; the ledger reclaimed it")

    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        """Once GPU work has begun on a box with GPUs: the thread that prints waiting lines."""
        if self._watch_checked or not gpu_work_begun(self.config):
            return
        self._watch_checked = True
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or not get_plan(self.config).gpus:
            return
        s = get_settings(self.config)
        folder = str(ledger.ledger_dir_for(s.ledger_dir))
        self._waiter = WaitWatcher(tr, folder, session_id(self.config), s.notice_after_s)
        self._waiter.start()

    def pytest_report_collectionfinish(self, config: pytest.Config) -> list[str]:
        """A single process that found GPU tests: the VRAM analysis, after "collected N items"
        (for a suite's own bare markers only where GPUs were found: elsewhere they are none of
        the plugin's business)."""
        if SHOWN_KEY in config.stash or not gpu_work_begun(config) or config.get_verbosity() < 0:
            return []
        if not has_own_tests(config) and not get_plan(config).gpus:
            return []
        config.stash[SHOWN_KEY] = True
        return header(config)

    def summary_data(self) -> dict[str, Any]:
        """The run's summary; computed once for the terminal summary and the JSON report (both
        run at the end of the session), again only if something was collected in between."""
        seen = (len(self.collected), len(self.lost) + len(self.crashed))
        if self._summary is not None and self._summary[:2] == seen:
            return self._summary[2]
        collected = cast(list[dict[str, Any]], self.collected)
        # A run without GPU tests collected nothing: it must not plan (no NVML, no Ollama) here.
        plan = get_plan(self.config) if collected else None
        data = report.summarize(collected, self.lost + self.crashed, time.time(), plan)
        # The "not measurable" rows of tests on simulated GPUs show in the JSON report alone (the
        # terminal leaves them out, report.summary_lines): made only where there is one.
        simulated: frozenset[str] = frozenset()
        if plan is not None and get_settings(self.config).report:
            simulated = frozenset(g.gpu.uuid for g in plan.gpus if g.gpu.simulated)
        records = [
            advice.observation_record(e["test_id"], observed)
            for e in self.collected
            if (observed := e.get("observed") or _on_simulated(e, simulated))
        ]
        data["observed"] = advice.observed_table(records)
        data["observed_records"] = records
        self._summary = (*seen, data)
        return data

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The ``gpushare`` section, in runs where GPU tests or ``lease()`` blocks ran."""
        if not self.collected and not self.lost:
            return
        data = self.summary_data()
        plan = get_plan(self.config)
        lines = report.summary_lines(plan, data)
        if plan.gpus:
            lines += report.spilling_lines(ollama_status(self.config))
        terminalreporter.write_sep("-", "gpushare")
        for line in lines:
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.collected.extend(self._blocks())
        data = self.summary_data()
        self._remember(data["observed_records"])
        path = get_settings(self.config).report
        if path:
            doc = report.json_report(get_plan(self.config), data, self.started, time.time())
            try:
                _write_json(Path(path), doc)
            except OSError as exc:  # checked at start; a disk that filled up since is one line
                tr = self.config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None:
                    tr.write_line(f"gpushare: could not write the report to {path}: {exc.strerror or exc}")

    def _remember(self, records: list[dict[str, Any]]) -> None:
        """Keep this run's per-test peaks in pytest's cache for the next run's worker budget."""
        cache = getattr(self.config, "cache", None)
        if cache is None or not records:
            return
        peaks, context = advice.run_observations(records)
        if peaks:
            merged = advice.merge_history(cache.get(advice.HISTORY_KEY, None), peaks, context, time.time())
            cache.set(advice.HISTORY_KEY, merged)

    def pytest_unconfigure(self) -> None:
        if self._waiter is not None:
            self._waiter.stop()


def _on_simulated(entry: LeaseEntry, simulated: frozenset[str]) -> list[advice.GpuObservation]:
    """What a GPU test that held simulated GPUs only used on each: nothing to measure (its worker
    did not watch it, and its report said nothing: ``Grant.observable``).
    Nothing for a ``lease()`` block or a test whose worker crashed: nothing observed them."""
    lease = entry.get("lease")
    if lease is None or entry.get("outcome") in _UNOBSERVED or not lease["gpus"]:
        return []
    if not all(g["uuid"] in simulated for g in lease["gpus"]):
        return []
    # "cpu": the device a simulated GPU's GpuLease names (there is no CUDA device behind it).
    return [advice.on_simulated(g["uuid"], "cpu", g["bytes"]) for g in lease["gpus"]]


#: The outcomes of entries that are not a test's own: nothing observed them.
_UNOBSERVED = ("lease()", "crashed")


def _worker_of(report: object) -> str | None:
    """The id of the xdist worker a report came from (xdist's controller sets ``node`` on each
    one it receives); None for a report of this process's own."""
    node = getattr(report, "node", None)
    return None if node is None else str(node.gateway.id)


def _write_json(target: Path, doc: object) -> None:
    """Write ``doc`` whole or not at all: a reader never sees half a report."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, target)


class WaitWatcher:
    """Controller thread: prints who waits for memory (workers' setup output is captured).

    It reads the waiters this session has registered in the ledger; a waiter past
    ``notice_after_s`` (``--gpushare-notice-after``) gets a line saying what it waits for and
    who holds the GPU, repeated at most every :data:`WAIT_REPEAT_S` seconds.
    """

    def __init__(
        self, terminal: Any, folder: str, session: str, notice_after_s: float, interval: float = 1.0
    ) -> None:
        self.terminal = terminal
        self.folder = folder
        self.session = session
        self.notice_after_s = notice_after_s
        self.interval = interval
        self._stop = threading.Event()
        self._last: dict[str, float] = {}
        # Blocks every signal: a Ctrl-C must reach the main thread, which stops the session.
        self._thread = daemon_thread(self._run, "gpushare-waits")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                lines = self.lines(time.time())
            except Exception:  # a broken ledger must not kill the controller; the workers report it
                continue
            for line in lines:
                self.terminal.write_line(line)

    def lines(self, now: float) -> list[str]:
        snapshot = ledger.read_status(self.folder)
        out: list[str] = []
        for line in ledger.waiting_lines(snapshot, session_id=self.session, min_wait_s=self.notice_after_s):
            key = line.split(" has waited ", 1)[0]
            if now - self._last.get(key, float("-inf")) < WAIT_REPEAT_S:
                continue
            self._last[key] = now
            out.append(line)
        return out
