"""Hooks around each GPU test (in the process that runs it) and the controller's collection of
what every process leased (summary section, JSON report, waiting lines).

Registered by plugin.py in ``pytest_configure`` unless the invocation never plans
(``--help``, ``--markers``, ``--version``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from pytest_gpushare import observations as advice
from pytest_gpushare import observe, report
from pytest_gpushare.enforce import Enforcement, annotate_oom, enforce
from pytest_gpushare.errors import GpuShareError, LeaseTimeout, NeverFits, SettingError
from pytest_gpushare.fixtures import _ACTIVE, GpuLease, GpuNeed, Grant, Runtime, need_from_marker
from pytest_gpushare.plugin import get_plan, get_settings, is_worker, ollama_status, session_id
from pytest_gpushare.workers import home_gpu

GRANT_KEY = pytest.StashKey[Grant]()
OBSERVED_KEY = pytest.StashKey[list[dict[str, Any]]]()
OUTCOME_KEY = pytest.StashKey[str]()
ENFORCE_KEY = pytest.StashKey[Enforcement]()
REPORT_ATTR = "gpushare"
WAIT_NOTICE_AFTER_S = 10.0
WAIT_REPEAT_S = 30.0


class LeasePlugin:
    """Per-process lease lifecycle plus, in the controller, the run's collection."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._runtime: Runtime | None = None
        self.collected: list[dict[str, Any]] = []
        self.lost: list[str] = []
        self.started = time.time()
        self._waiter: WaitWatcher | None = None
        self._watch: observe.Watch | None = None
        self._enforce_said = False
        #: Validated markers by their arguments: a module's ``pytestmark`` is the same for each of
        #: its tests. Only good markers are kept; a bad one fails each test naming it.
        self._needs: dict[tuple[Any, ...], GpuNeed] = {}
        _ACTIVE.append(self)
        self._summary: tuple[int, int, dict[str, Any]] | None = None

    # -- this process's runtime -----------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            config = self.config
            s = get_settings(config)
            worker = config.workerinput["workerid"] if is_worker(config) else "main"  # type: ignore[attr-defined]
            self._runtime = Runtime(
                config=config,
                plan=get_plan(config),
                session=session_id(config),
                worker=worker,
                ledger_dir=s.ledger_dir or "",
                context_bytes=s.context_mem_bytes,
                policy=s.policy,
                timeout=s.timeout_s,
                home=home_gpu(),
                default_mem=s.default_mem,
                hook=config.hook,
            )
        return self._runtime

    @property
    def watch(self) -> observe.Watch:
        if self._watch is None:
            s = get_settings(self.config)
            self._watch = observe.Watch(s.observe_interval_s, release_cached=s.framework_defaults)
        return self._watch

    def _observe_begin(self, item: pytest.Item, grant: Grant) -> None:
        """Cap (``--gpushare-enforce``) then measure the test; the cap's empty_cache comes first
        so the measuring baseline is taken after it."""
        if get_settings(self.config).enforce:
            result = enforce(grant.gpus)
            if isinstance(result, str):
                if not self._enforce_said:
                    self.runtime.log.append(f"--gpushare-enforce: {result}")
                    self._enforce_said = True
            else:
                item.stash[ENFORCE_KEY] = result
                self.runtime.log.extend(result.notes)
        self.watch.begin(grant.gpus)

    def _observe_end(self, item: pytest.Item, grant: Grant) -> None:
        cap = item.stash.get(ENFORCE_KEY, None)
        if cap is not None:
            self.runtime.log.extend(cap.restore())
        item.stash[OBSERVED_KEY] = [o.to_dict() for o in self.watch.end()]

    def pytest_unconfigure(self) -> None:
        if self._waiter is not None:
            self._waiter.stop()
        if self._runtime is not None:
            self._runtime.close()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    # -- per test -------------------------------------------------------------------------

    def _need(self, item: pytest.Item) -> tuple[GpuNeed, bool] | None:
        marker = item.get_closest_marker("gpu")
        names = getattr(item, "fixturenames", ())
        takes_fixture = "gpu" in names or "gpus" in names
        if marker is None and not takes_fixture:
            return None
        default = get_settings(self.config).default_mem
        if marker is None:
            return GpuNeed(mem=default), True
        # Types count: True == 1, but mem=True is a bad marker where mem=1 is a good one.
        key = (
            tuple((type(a), a) for a in marker.args),
            tuple(sorted((k, type(v), v) for k, v in marker.kwargs.items())),
        )
        source = f"the marker on {item.nodeid}"
        try:
            need = self._needs.get(key)
        except TypeError:  # an unhashable argument: validated every time
            return need_from_marker(marker.args, dict(marker.kwargs), default, source), takes_fixture
        if need is None:
            need = self._needs[key] = need_from_marker(marker.args, dict(marker.kwargs), default, source)
        return need, takes_fixture

    def _not_run(self, item: pytest.Item, need: GpuNeed, why: str) -> None:
        """No GPU can ever serve this test: skip, run on CPU, or fail, per --gpushare-fallback."""
        mode = get_settings(self.config).fallback
        item.stash[GRANT_KEY] = Grant(None, [GpuLease.cpu()] * need.count, None, fallback=mode)
        if mode == "skip":
            # Reported at the test's own location, as a skip marker would be.
            raise pytest.skip.Exception(
                f"gpushare: {why} (--gpushare-fallback=skip)", _use_item_location=True
            )
        if mode == "fail":
            pytest.fail(f"gpushare: {why} (--gpushare-fallback=fail)", pytrace=False)

    # A plain implementation, registered after pytest's own: it runs after every wrapper's
    # first half (logging, capture) and after the skipping plugin's tryfirst check (a skipped
    # test never waits for memory), and before the runner's implementation sets up fixtures.
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        problem = self._take(item)
        if problem is not None:
            pytest.fail(f"gpushare: {problem}", pytrace=False)

    def _take(self, item: pytest.Item) -> str | None:
        """Lease what ``item`` needs; a one-line problem when the test must fail instead."""
        try:
            found = self._need(item)
        except SettingError as exc:
            return str(exc)
        if found is None:
            return None
        need, anywhere = found
        rt = self.runtime
        if not rt.plan.gpus:
            self._not_run(item, need, _no_gpu_reason(rt))
            return None
        try:
            grant = rt.acquire(need, item.nodeid, anywhere=anywhere)
        except NeverFits as exc:
            self._not_run(item, need, exc.reason)
        except LeaseTimeout as exc:
            return str(exc)
        except GpuShareError as exc:
            return f"cannot lease GPU memory: {exc}"
        else:
            item.stash[GRANT_KEY] = grant
            self._observe_begin(item, grant)
        return None

    def _release(self, item: pytest.Item) -> None:
        grant = item.stash.get(GRANT_KEY, None)
        if grant is None or self._runtime is None or grant.released:
            return
        try:
            if grant.record is not None:
                self._observe_end(item, grant)
        finally:
            self._runtime.release(grant)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._release(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            # KeyboardInterrupt or an internal error can skip the teardown hook: give it back here.
            self._release(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, Any]:
        rep = yield
        grant = item.stash.get(GRANT_KEY, None)
        if grant is not None and call.when == "call" and rep.failed and call.excinfo is not None:
            declared = max((g.mem for g in grant.gpus), default=0)
            note = annotate_oom(call.excinfo.value, declared)
            if note:
                rep.sections.append(("gpushare", note))
        if rep.outcome != "passed" and OUTCOME_KEY not in item.stash:
            item.stash[OUTCOME_KEY] = "error" if call.when != "call" and rep.failed else rep.outcome
        if grant is not None and call.when == "teardown":
            info: dict[str, Any] = {"fallback": grant.fallback}
            info["outcome"] = item.stash.get(OUTCOME_KEY, "passed")
            info["observed"] = item.stash.get(OBSERVED_KEY, [])
            if grant.record is not None:
                info["lease"] = grant.record.to_dict()
            info["log"] = list(self._runtime.log) if self._runtime else []
            if self._runtime:
                self._runtime.log.clear()
            setattr(rep, REPORT_ATTR, info)
        return rep

    # -- controller: collection, waiting lines, summary, JSON -----------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info = getattr(report, REPORT_ATTR, None)
        if isinstance(info, dict):
            entry = dict(info)
            entry["test_id"] = report.nodeid
            entry.setdefault("outcome", report.outcome)
            self.collected.append(entry)

    def _block_entries(self) -> list[dict[str, Any]]:
        """This process's ``lease()`` blocks: they belong to no test report."""
        if self._runtime is None:
            return []
        return [
            {"test_id": r.test_id, "lease": r.to_dict(), "outcome": "lease()", "fallback": None}
            for r in self._runtime.records
            if r.block
        ]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        if error is not None:
            self.lost.append(f"worker {node.gateway.id} crashed: {error}")
        output = getattr(node, "workeroutput", None) or {}
        self.collected.extend(output.get("gpushare_blocks", []))

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: Any, sched: Any) -> None:
        self.lost.append(f"{crashitem}: its worker crashed; its lease was reclaimed by the ledger")

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if is_worker(self.config) or not get_plan(self.config).gpus:
            return
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            self._waiter = WaitWatcher(self, tr)
            self._waiter.start()

    def summary_data(self) -> dict[str, Any]:
        """The run's summary; computed once for the terminal summary and the JSON report (both
        run at the end of the session), again only if something was collected in between."""
        seen = (len(self.collected), len(self.lost))
        if self._summary is not None and self._summary[:2] == seen:
            return self._summary[2]
        data = report.summarize(self.collected, self.lost, time.time())
        observed = [e for e in self.collected if e.get("observed")]
        records = [advice.observation_record(e["test_id"], e["observed"]) for e in observed]
        data["observed"] = advice.observed_table(records)
        data["observed_records"] = records
        self._summary = (*seen, data)
        return data

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if is_worker(self.config):
            return
        data = self.summary_data()
        plan = get_plan(self.config)
        lines = report.summary_lines(plan, data) + report.spilling_lines(ollama_status(self.config))
        terminalreporter.write_sep("-", "gpushare")
        for line in lines:
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if is_worker(self.config):
            self.config.workeroutput["gpushare_blocks"] = self._block_entries()  # type: ignore[attr-defined]
            return
        self.collected.extend(self._block_entries())
        data = self.summary_data()
        self._remember(data["observed_records"])
        path = get_settings(self.config).report
        if not path:
            return
        doc = report.json_report(get_plan(self.config), data, self.started, time.time())
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        os.replace(tmp, target)

    def _remember(self, records: list[dict[str, Any]]) -> None:
        """Keep this run's per-test peaks in pytest's cache for the next run's worker budget."""
        cache = getattr(self.config, "cache", None)
        if cache is None or not records:
            return
        peaks, context = advice.run_observations(records)
        if peaks:
            merged = advice.merge_history(cache.get(advice.HISTORY_KEY, None), peaks, context, time.time())
            cache.set(advice.HISTORY_KEY, merged)


def _no_gpu_reason(rt: Runtime) -> str:
    inv = rt.plan.inventory
    if inv.error:
        return f"no GPU: NVML failed: {inv.error}"
    return f"no GPU ({inv.source})"


class WaitWatcher:
    """Controller thread: prints who waits for memory (workers' setup output is captured).

    It reads the waiters this session has registered in the ledger; a waiter past 10 s gets a
    line saying what it waits for and who holds the GPU, repeated at most every 30 s.
    """

    def __init__(self, plugin: LeasePlugin, terminal: Any, interval: float = 1.0) -> None:
        self.plugin = plugin
        self.terminal = terminal
        self.interval = interval
        self._stop = threading.Event()
        self._last: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="gpushare-waits", daemon=True)

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
        from pytest_gpushare.ledger import read_status, waiting_lines

        rt = self.plugin.runtime
        snapshot = read_status(rt.ledger_folder())
        out: list[str] = []
        for line in waiting_lines(snapshot, session_id=rt.session, min_wait_s=WAIT_NOTICE_AFTER_S):
            key = line.split(" has waited ", 1)[0]
            if now - self._last.get(key, float("-inf")) < WAIT_REPEAT_S:
                continue
            self._last[key] = now
            out.append(line)
        return out
