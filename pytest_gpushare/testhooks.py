"""The lease around each GPU test, and :func:`lease`.

plugin.py registers one :class:`LeaseHooks` per session in ``pytest_configure``, in every
process that runs tests, unless the invocation never plans (``--help``, ``--markers``,
``--version``). A GPU test (:func:`~pytest_gpushare.fixtures.gpu_role`) has its lease taken in
``pytest_runtest_setup``, before any fixture of the test runs, and given back after its
teardown in every outcome (the ``pytest_runtest_protocol`` wrapper is the safety net for
interrupts; a crashed process is covered by the ledger's liveness locks). What the plugin
holds for one test is one :class:`~pytest_gpushare.fixtures.ItemState` under
:data:`~pytest_gpushare.fixtures.STATE_KEY`, set and cleared by that
``pytest_runtest_protocol`` wrapper; its :class:`~pytest_gpushare.entries.LeaseEntry` travels
to the controller on the test's setup report (while it runs) and teardown report.

Under a session broker a test's lease may go on to the worker's next test (``nextitem``) when
that test asks for exactly the same (the same need, placement and role) and the broker has not
asked for the memory back: no round trip between the two. For each test the lease still begins
and ends as before: its own record (taken when it starts, waited 0 s), its observation and cap,
the lease hooks, its summary line.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, cast

import pytest

from pytest_gpushare.entries import REPORT_ATTR, LeaseEntry, compact_observation, setup_entry, teardown_entry
from pytest_gpushare.errors import GpuShareError, LeaseCancelled, LeaseTimeout, NeverFits, SettingError
from pytest_gpushare.fixtures import STATE_KEY, ItemState, Role
from pytest_gpushare.needs import TestNeeds
from pytest_gpushare.session import (
    WorkerOutput,
    begin_gpu_work,
    broker_input,
    get_settings,
    is_worker,
    note_env,
    runs_workers,
    session_id,
    worker_id,
)
from pytest_gpushare.workers import framework_defaults, home_gpu

# The runtime (and with it the ledger), enforce and observe are imported where the first GPU
# test needs them: a run without GPU tests, and --collect-only, never load them.
if TYPE_CHECKING:
    from pytest_gpushare import observe
    from pytest_gpushare.runtime import GpuLeases, GpuNeed, Grant, Runtime

__all__ = ["LeaseHooks", "active_hooks", "lease"]


class LeaseHooks:
    """This process's leases: the runtime, made on first use, and the hooks around each test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._runtime: Runtime | None = None
        self._making = threading.Lock()
        self._watch: observe.Watch | None = None
        self._enforce_said = False
        self.needs = TestNeeds(config)
        #: ``lease()`` blocks no GPU could serve (their fallback), for the summary.
        self._blocks_not_run: list[LeaseEntry] = []
        _ACTIVE.append(self)

    @property
    def runtime(self) -> Runtime:
        """This process's one runtime, made on first use (under a lock: threads that call
        ``lease()`` at once share it, and so one ledger owner)."""
        if self._runtime is None:
            with self._making:
                if self._runtime is None:
                    self._runtime = self._make_runtime()
        return self._runtime

    def _make_runtime(self) -> Runtime:
        from pytest_gpushare.runtime import Runtime

        config = self.config
        s = get_settings(config)
        return Runtime(
            plan=begin_gpu_work(config),
            session=session_id(config),
            worker=worker_id(config),
            ledger_dir=s.ledger_dir,
            ledger_source=s.sources.get("ledger_dir"),
            context_bytes=s.context_mem_bytes,
            policy=s.policy,
            timeout=s.timeout_s,
            home=home_gpu(config),
            default_mem=s.default_mem,
            pluginmanager=config.pluginmanager,
            broker=broker_input(config),
        )

    @property
    def watch(self) -> observe.Watch:
        if self._watch is None:
            from pytest_gpushare import observe

            s = get_settings(self.config)
            self._watch = observe.Watch(s.observe_interval_s, release_cached=s.framework_defaults)
        return self._watch

    def block_entries(self) -> list[LeaseEntry]:
        """This process's ``lease()`` blocks: they belong to no test report."""
        entries = list(self._blocks_not_run)
        if self._runtime is None:
            return entries
        return entries + [
            LeaseEntry(test_id=r.test_id, lease=r.to_dict(), outcome="lease()", fallback=None)
            for r in self._runtime.records
            if r.block
        ]

    # -- which tests are GPU tests ------------------------------------------------------------

    def role(self, item: pytest.Item) -> Role | None:
        return self.needs.role(item)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Once the run's tests are known (deselection done): GPU work begins only if one of them
        is a GPU test. The single process then applies the frameworks' defaults (xdist workers
        got them in their spec environment)."""
        if self.config.getoption("collectonly", False):
            return  # nothing runs: nothing to plan for
        roles = {self.role(item) for item in items}
        if roles <= {None}:
            return
        plan = begin_gpu_work(self.config, own_tests="ours" in roles)
        if not is_worker(self.config) and not runs_workers(self.config):
            defaults = framework_defaults(self.config, plan)
            for key, value in defaults.items():
                os.environ.setdefault(key, value)
            note_env(self.config, defaults)

    # -- one test: the state's lifetime -----------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        state = item.stash[STATE_KEY] = ItemState()
        try:
            result = yield
        except BaseException:
            # KeyboardInterrupt or an internal error can skip the teardown hook: give it back
            # here, and what was kept for the next test too.
            self._release(item, None)
            if self._runtime is not None:
                self._runtime.drop_carried()
            raise
        finally:
            grant = state.grant
            if grant is not None and not grant.released:  # the teardown hook did not run
                self._release(item, nextitem)
            del item.stash[STATE_KEY]
        return result

    # -- taking the lease ---------------------------------------------------------------------

    # A plain implementation, registered after pytest's own: it runs after every wrapper's
    # first half (logging, capture) and after the skipping plugin's tryfirst check (a skipped
    # test never waits for memory), and before the runner's implementation sets up fixtures.
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        state = item.stash.get(STATE_KEY, None)
        problem = None if state is None else self._take(item, state)
        if problem is not None:
            pytest.fail(f"gpushare: {problem}", pytrace=False)

    def _take(self, item: pytest.Item, state: ItemState) -> str | None:
        """Lease what ``item`` needs; a one-line problem when the test must fail instead."""
        role = self.role(item)
        if role is None:
            return None
        try:
            need, anywhere = self.needs.need(item)
        except SettingError as exc:
            return str(exc)
        if role == "guest":
            self._take_as_guest(item, state, need)
            return None
        rt = self.runtime
        if not rt.plan.gpus:
            self._not_run(state, need, _no_gpu_reason(rt))
            return None
        try:
            grant = rt.acquire(need, item.nodeid, anywhere=anywhere)
        except NeverFits as exc:
            self._not_run(state, need, exc.reason)
        except LeaseCancelled as exc:
            # -x, --maxfail or Ctrl-C stopped the session while the test waited: it did not run.
            raise pytest.skip.Exception(f"gpushare: {exc}", _use_item_location=True) from None
        except LeaseTimeout as exc:
            return str(exc)
        except GpuShareError as exc:
            return f"cannot lease GPU memory: {exc}"
        else:
            state.grant = grant
            self._observe_begin(state, grant)
        return None

    def _take_as_guest(self, item: pytest.Item, state: ItemState, need: GpuNeed) -> None:
        """A bare marker the suite registered itself: leased where a GPU can serve it; where none
        can, it runs as the suite intends, without a lease (never skipped, failed or moved)."""
        state.guest = True
        rt = self.runtime
        if not rt.plan.gpus:
            return
        try:
            state.grant = rt.acquire(need, item.nodeid, anywhere=False)
        except GpuShareError as exc:
            rt.log.append(f"{item.nodeid}: runs without a lease (the suite's own gpu marker): {exc}")
        else:
            self._watch_begin(state.grant)

    def _not_run(self, state: ItemState, need: GpuNeed, why: str) -> None:
        """No GPU can ever serve this test: skip, run on CPU, or fail, per --gpushare-fallback."""
        mode = get_settings(self.config).fallback
        state.grant = _cpu_grant(need, mode)
        if mode == "skip":
            # Reported at the test's own location, as a skip marker would be.
            raise pytest.skip.Exception(
                f"gpushare: {why} (--gpushare-fallback=skip)", _use_item_location=True
            )
        if mode == "fail":
            pytest.fail(f"gpushare: {why} (--gpushare-fallback=fail)", pytrace=False)

    def _observe_begin(self, state: ItemState, grant: Grant) -> None:
        """Cap (``--gpushare-enforce``) then measure the test; the cap's empty_cache comes first
        so the measuring baseline is taken after it."""
        if get_settings(self.config).enforce:
            from pytest_gpushare.enforce import enforce

            result = enforce(grant.gpus)
            if isinstance(result, str):
                if not self._enforce_said:
                    self.runtime.log.append(f"--gpushare-enforce: {result}")
                    self._enforce_said = True
            else:
                state.enforcement = result
                self.runtime.log.extend(result.notes)
        self._watch_begin(grant)

    def _watch_begin(self, grant: Grant) -> None:
        """Measure the test where it holds a real GPU: on simulated ones there is nothing to measure,
        and the controller says so itself (observe is then never imported)."""
        if grant.observable:
            self.watch.begin(grant.gpus)

    # -- lease() blocks -----------------------------------------------------------------------

    def block_grant(self, need: GpuNeed, label: str) -> Grant:
        """The grant of a ``lease()`` block, following ``--gpushare-fallback`` where no GPU can
        ever serve it; every other failure is one line (``pytest.fail``), never a raw exception."""
        try:
            rt = self.runtime
            if not rt.plan.gpus:
                return self._block_not_run(need, label, _no_gpu_reason(rt))
            return rt.acquire(need, label, anywhere=True, block=True)
        except NeverFits as exc:
            return self._block_not_run(need, label, exc.reason)
        except LeaseCancelled as exc:
            pytest.skip(f"gpushare: {exc}")
        except LeaseTimeout as exc:
            _fail(str(exc))
        except (GpuShareError, pytest.UsageError) as exc:  # an unusable ledger folder, a bad setting
            _fail(f"cannot lease GPU memory: {exc}")

    def _block_not_run(self, need: GpuNeed, label: str, why: str) -> Grant:
        mode = get_settings(self.config).fallback
        self._blocks_not_run.append(LeaseEntry(test_id=label, outcome="lease()", fallback=mode))
        if mode == "skip":
            pytest.skip(f"gpushare: {why} (--gpushare-fallback=skip)")
        if mode == "fail":
            _fail(f"{why} (--gpushare-fallback=fail)")
        return _cpu_grant(need, mode)

    # -- giving it back -----------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._release(item, nextitem)

    def _release(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """Give the test's lease back, or keep it for ``nextitem`` where that test asks for the
        same (:meth:`Runtime.release`); a lease kept for this test that it did not take goes
        back unless ``nextitem`` asks for the same."""
        rt = self._runtime
        if rt is None:
            return
        state = item.stash.get(STATE_KEY, None)
        grant = None if state is None else state.grant
        if state is None or grant is None or grant.released:
            then = self.needs.asks(nextitem, rt, guest=state is not None and state.guest)
            rt.drop_carried(unless=then)
            return
        try:
            if grant.record is not None:
                self._observe_end(state, grant)
        finally:
            then = None if grant.need is None else self.needs.asks(nextitem, rt, guest=state.guest)
            rt.release(grant, then=then)

    def _observe_end(self, state: ItemState, grant: Grant) -> None:
        if state.enforcement is not None:
            self.runtime.log.extend(state.enforcement.restore())
        if grant.observable:
            state.observed = [compact_observation(o) for o in self.watch.end()]

    # -- what the controller learns -----------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, Any]:
        rep = yield
        state = item.stash.get(STATE_KEY, None)
        grant = None if state is None else state.grant
        if grant is not None and call.when == "call" and rep.failed and call.excinfo is not None:
            from pytest_gpushare.enforce import annotate_oom

            declared = max((g.mem for g in grant.gpus), default=0)
            note = annotate_oom(call.excinfo.value, declared)
            if note:
                rep.sections.append(("gpushare", note))
        if state is not None and rep.outcome != "passed" and state.outcome is None:
            state.outcome = "error" if call.when != "call" and rep.failed else rep.outcome
        if state is not None and grant is not None:
            if call.when == "setup" and grant.record is not None:
                # The controller learns what the test holds before it runs: if its worker dies,
                # the summary knows the lease it lost.
                setattr(rep, REPORT_ATTR, setup_entry(grant.record))
            elif call.when == "teardown":
                setattr(rep, REPORT_ATTR, self._entry(state, grant))
        return rep

    def _entry(self, state: ItemState, grant: Grant) -> LeaseEntry:
        """The teardown half of the test's entry for the controller (its ``test_id`` is the
        report's node id; :func:`~pytest_gpushare.entries.teardown_entry` says what it leaves
        to the setup half)."""
        log = list(self._runtime.log) if self._runtime is not None else []
        if self._runtime is not None:
            self._runtime.log.clear()
        released_at = None if grant.record is None else grant.record.released_at
        return teardown_entry(state.outcome, grant.fallback, state.observed, released_at, log)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if is_worker(self.config):
            output = cast(WorkerOutput, self.config.workeroutput)  # type: ignore[attr-defined]
            output["gpushare_blocks"] = self.block_entries()

    def pytest_unconfigure(self) -> None:
        if self._runtime is not None:
            problem = self._runtime.close()
            if problem:
                tr = self.config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None:
                    tr.write_line(f"gpushare: {problem}")
        if self in _ACTIVE:
            _ACTIVE.remove(self)


def _cpu_grant(need: GpuNeed, fallback: str) -> Grant:
    """The grant of a test (or block) that runs on the CPU for lack of a GPU."""
    from pytest_gpushare.runtime import GpuLease, Grant

    return Grant(None, [GpuLease.cpu()] * need.count, None, fallback=fallback)


def _no_gpu_reason(rt: Runtime) -> str:
    inv = rt.plan.inventory
    if inv.error:
        return f"no GPU: NVML failed: {inv.error}"
    return f"no GPU ({inv.source})"


def _fail(message: str) -> NoReturn:
    """Fail the running test (or the fixture that leases) with one line, no traceback."""
    pytest.fail(f"gpushare: {message}", pytrace=False)


# --- lease() ------------------------------------------------------------------------------------

#: The lease hooks of the sessions active in this process (pytester can nest one in another).
_ACTIVE: list[LeaseHooks] = []


def active_hooks() -> LeaseHooks:
    """The lease hooks of this process's (innermost) session."""
    if not _ACTIVE:
        raise GpuShareError("pytest_gpushare.lease() needs a pytest session with pytest-gpushare active")
    return _ACTIVE[-1]


def active_runtime() -> Runtime:
    """This process's runtime, made on first use: a ``lease()`` in a fixture may come before
    any GPU test of the session."""
    return active_hooks().runtime


@contextmanager
def lease(
    mem: object = None, count: int = 1, exclusive: bool = False, *, name: str | None = None
) -> Iterator[GpuLeases]:
    """Hold GPU memory for as long as the ``with`` block lives (module/session fixtures).

    Yields a :class:`~pytest_gpushare.runtime.GpuLeases`: the list of :class:`GpuLease`, one
    per device, like the ``gpus`` fixture, that also answers ``device``, ``index``, ``mem``...
    with its first device's, like the ``gpu`` fixture (``with lease(mem="2GiB") as gpu:
    gpu.device``). ``name`` is what ledgers and reports show as the holder (default: the
    calling test's id or ``lease()``).

    Waits like a test would. Where no GPU can ever serve it, it follows
    ``--gpushare-fallback`` as a marker does: ``skip`` skips the tests that need it (with the
    reason), ``cpu`` yields CPU leases, ``fail`` fails them with one line. A wait past
    ``--gpushare-timeout`` and a bad argument fail with one line too.
    """
    from pytest_gpushare.runtime import GpuLeases, need_from_marker

    hooks = active_hooks()
    label = name or os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0] or "lease()"
    try:
        need = need_from_marker(
            (),
            {"mem": mem, "count": count, "exclusive": exclusive},
            get_settings(hooks.config).default_mem,
            f"pytest_gpushare.lease() of {label}",
        )
    except SettingError as exc:
        _fail(str(exc))
    grant = hooks.block_grant(need, f"{label} [lease()]")
    try:
        yield GpuLeases(grant.gpus)
    finally:
        hooks.runtime.release(grant)
