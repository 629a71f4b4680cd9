"""The lease around each GPU test, the ``gpu``/``gpus`` fixtures and :func:`lease`.

plugin.py registers this module (its fixtures) and one :class:`LeaseHooks` per session in
``pytest_configure``, in every process that runs tests, unless the invocation never plans
(``--help``, ``--markers``, ``--version``). A GPU test's lease is taken in
``pytest_runtest_setup``, before any fixture of the test runs, and given back after its
teardown in every outcome (the ``pytest_runtest_protocol`` wrapper is the safety net for
interrupts; a crashed process is covered by the ledger's liveness locks). What the plugin
holds for one test is one :class:`ItemState` under :data:`STATE_KEY`, set and cleared by
that ``pytest_runtest_protocol`` wrapper; its :class:`~pytest_gpushare.session.LeaseEntry`
travels to the controller on the test's teardown report.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pytest_gpushare import observe
from pytest_gpushare.enforce import Enforcement, annotate_oom, enforce
from pytest_gpushare.errors import GpuShareError, LeaseTimeout, NeverFits, SettingError
from pytest_gpushare.runtime import GpuLease, GpuNeed, Grant, Runtime, need_from_marker
from pytest_gpushare.session import (
    REPORT_ATTR,
    LeaseEntry,
    WorkerOutput,
    get_plan,
    get_settings,
    is_worker,
    session_id,
    worker_id,
)
from pytest_gpushare.workers import home_gpu

__all__ = ["MARKER_HELP", "STATE_KEY", "ItemState", "LeaseHooks", "gpu", "gpus", "lease"]

MARKER_HELP = (
    "gpu(mem=None, count=1, exclusive=False): the test needs `mem` (a size such as '4GiB', or "
    "'N%' of the device) on each of `count` distinct GPUs; pytest-gpushare leases it for the "
    "test's duration. exclusive=True holds all usable memory of each GPU."
)


@dataclass
class ItemState:
    """What the plugin holds for one test while pytest runs it."""

    grant: Grant | None = None  # None: no GPU test, or not leased (yet)
    enforcement: Enforcement | None = None  # the cap of --gpushare-enforce, undone at release
    observed: list[dict[str, Any]] = field(default_factory=list)  # what it used, per device
    outcome: str | None = None  # the first phase that did not pass: "failed", "skipped", "error"


STATE_KEY = pytest.StashKey[ItemState]()


class LeaseHooks:
    """This process's leases: the runtime, made on first use, and the hooks around each test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._runtime: Runtime | None = None
        self._watch: observe.Watch | None = None
        self._enforce_said = False
        #: Validated markers by their arguments: a module's ``pytestmark`` is the same for each of
        #: its tests. Only good markers are kept; a bad one fails each test naming it.
        self._needs: dict[tuple[Any, ...], GpuNeed] = {}
        _ACTIVE.append(self)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            config = self.config
            s = get_settings(config)
            self._runtime = Runtime(
                plan=get_plan(config),
                session=session_id(config),
                worker=worker_id(config),
                ledger_dir=s.ledger_dir,
                context_bytes=s.context_mem_bytes,
                policy=s.policy,
                timeout=s.timeout_s,
                home=home_gpu(),
                default_mem=s.default_mem,
                pluginmanager=config.pluginmanager,
            )
        return self._runtime

    @property
    def watch(self) -> observe.Watch:
        if self._watch is None:
            s = get_settings(self.config)
            self._watch = observe.Watch(s.observe_interval_s, release_cached=s.framework_defaults)
        return self._watch

    def block_entries(self) -> list[LeaseEntry]:
        """This process's ``lease()`` blocks: they belong to no test report."""
        if self._runtime is None:
            return []
        return [
            LeaseEntry(test_id=r.test_id, lease=r.to_dict(), outcome="lease()", fallback=None)
            for r in self._runtime.records
            if r.block
        ]

    # -- one test: the state's lifetime -----------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        item.stash[STATE_KEY] = ItemState()
        try:
            return (yield)
        finally:
            # KeyboardInterrupt or an internal error can skip the teardown hook: give it back here.
            self._release(item)
            del item.stash[STATE_KEY]

    # -- taking the lease ---------------------------------------------------------------------

    # A plain implementation, registered after pytest's own: it runs after every wrapper's
    # first half (logging, capture) and after the skipping plugin's tryfirst check (a skipped
    # test never waits for memory), and before the runner's implementation sets up fixtures.
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        state = item.stash.get(STATE_KEY, None)
        problem = None if state is None else self._take(item, state)
        if problem is not None:
            pytest.fail(f"gpushare: {problem}", pytrace=False)

    def _need(self, item: pytest.Item) -> tuple[GpuNeed, bool] | None:
        """What ``item`` needs and whether it takes ``gpu``/``gpus``; None for no GPU test."""
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

    def _take(self, item: pytest.Item, state: ItemState) -> str | None:
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
            self._not_run(state, need, _no_gpu_reason(rt))
            return None
        try:
            grant = rt.acquire(need, item.nodeid, anywhere=anywhere)
        except NeverFits as exc:
            self._not_run(state, need, exc.reason)
        except LeaseTimeout as exc:
            return str(exc)
        except GpuShareError as exc:
            return f"cannot lease GPU memory: {exc}"
        else:
            state.grant = grant
            self._observe_begin(state, grant)
        return None

    def _not_run(self, state: ItemState, need: GpuNeed, why: str) -> None:
        """No GPU can ever serve this test: skip, run on CPU, or fail, per --gpushare-fallback."""
        mode = get_settings(self.config).fallback
        state.grant = Grant(None, [GpuLease.cpu()] * need.count, None, fallback=mode)
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
            result = enforce(grant.gpus)
            if isinstance(result, str):
                if not self._enforce_said:
                    self.runtime.log.append(f"--gpushare-enforce: {result}")
                    self._enforce_said = True
            else:
                state.enforcement = result
                self.runtime.log.extend(result.notes)
        self.watch.begin(grant.gpus)

    # -- giving it back -----------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._release(item)

    def _release(self, item: pytest.Item) -> None:
        state = item.stash.get(STATE_KEY, None)
        grant = None if state is None else state.grant
        if state is None or grant is None or self._runtime is None or grant.released:
            return
        try:
            if grant.record is not None:
                self._observe_end(state)
        finally:
            self._runtime.release(grant)

    def _observe_end(self, state: ItemState) -> None:
        if state.enforcement is not None:
            self.runtime.log.extend(state.enforcement.restore())
        state.observed = [o.to_dict() for o in self.watch.end()]

    # -- what the controller learns -----------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, Any]:
        rep = yield
        state = item.stash.get(STATE_KEY, None)
        grant = None if state is None else state.grant
        if grant is not None and call.when == "call" and rep.failed and call.excinfo is not None:
            declared = max((g.mem for g in grant.gpus), default=0)
            note = annotate_oom(call.excinfo.value, declared)
            if note:
                rep.sections.append(("gpushare", note))
        if state is not None and rep.outcome != "passed" and state.outcome is None:
            state.outcome = "error" if call.when != "call" and rep.failed else rep.outcome
        if state is not None and grant is not None and call.when == "teardown":
            setattr(rep, REPORT_ATTR, self._entry(state, grant))
        return rep

    def _entry(self, state: ItemState, grant: Grant) -> LeaseEntry:
        """The test's entry for the controller (its ``test_id`` is the report's node id)."""
        entry = LeaseEntry(
            fallback=grant.fallback, outcome=state.outcome or "passed", observed=state.observed
        )
        if grant.record is not None:
            entry["lease"] = grant.record.to_dict()
        entry["log"] = list(self._runtime.log) if self._runtime else []
        if self._runtime:
            self._runtime.log.clear()
        return entry

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if is_worker(self.config):
            output = cast(WorkerOutput, self.config.workeroutput)  # type: ignore[attr-defined]
            output["gpushare_blocks"] = self.block_entries()

    def pytest_unconfigure(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
        if self in _ACTIVE:
            _ACTIVE.remove(self)


def _no_gpu_reason(rt: Runtime) -> str:
    inv = rt.plan.inventory
    if inv.error:
        return f"no GPU: NVML failed: {inv.error}"
    return f"no GPU ({inv.source})"


# --- the fixtures and lease() ------------------------------------------------------------------


def _granted(request: pytest.FixtureRequest) -> list[GpuLease]:
    state = request.node.stash.get(STATE_KEY, None)
    if state is None or state.grant is None:
        raise GpuShareError("gpushare: no lease for this test (is the plugin disabled for it?)")
    return list(state.grant.gpus)


@pytest.fixture
def gpu(request: pytest.FixtureRequest) -> GpuLease:
    """The :class:`GpuLease` of the running test (its first device when ``count > 1``)."""
    return _granted(request)[0]


@pytest.fixture
def gpus(request: pytest.FixtureRequest) -> list[GpuLease]:
    """One :class:`GpuLease` per device of the running test, in the order it should use them."""
    return _granted(request)


#: The lease hooks of the sessions active in this process (pytester can nest one in another).
_ACTIVE: list[LeaseHooks] = []


def active_runtime() -> Runtime:
    """This process's runtime, made on first use: a ``lease()`` in a fixture may come before
    any GPU test of the session."""
    if not _ACTIVE:
        raise GpuShareError("pytest_gpushare.lease() needs a pytest session with pytest-gpushare active")
    return _ACTIVE[-1].runtime


@contextmanager
def lease(
    mem: object = None, count: int = 1, exclusive: bool = False, *, name: str | None = None
) -> Iterator[list[GpuLease]]:
    """Hold GPU memory for as long as the ``with`` block lives (module/session fixtures).

    Yields the list of :class:`GpuLease`, one per device, like the ``gpus`` fixture; ``name``
    is what ledgers and reports show as the holder (default: the calling test's id or
    ``lease()``). Waits like a test would; a need that can never be met raises
    :class:`NeverFits`, a wait past ``--gpushare-timeout`` raises :class:`LeaseTimeout`.
    """
    rt = active_runtime()
    label = name or os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0] or "lease()"
    need = need_from_marker(
        (),
        {"mem": mem, "count": count, "exclusive": exclusive},
        rt.default_mem,
        f"pytest_gpushare.lease() of {label}",
    )
    if not rt.plan.gpus:
        raise NeverFits("pytest_gpushare.lease(): no GPU on this box")
    grant = rt.acquire(need, f"{label} [lease()]", anywhere=True, block=True)
    try:
        yield grant.gpus
    finally:
        rt.release(grant)
