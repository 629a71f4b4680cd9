"""xdist: the worker count, each worker's home GPU and environment, and what it receives; and the
environment a process gets before any conftest can touch CUDA.

These hook implementations are ``optionalhook``: the module is registered whether or not
pytest-xdist is installed, and without it nothing here is called. They must be registered
before xdist's ``pytest_cmdline_main`` asks for the worker count, so plugin.py registers this
module (as :data:`PLUGIN_NAME`) from ``pytest_addhooks`` rather than from ``pytest_configure``.

The environment (SPEC "Coexisting"): with no GPU the plugin sets no variable in any process.
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set before the conftests only where the NVIDIA driver lists
more than one GPU (:func:`order_devices`, a folder listing: neither NVML nor CUDA is started);
a worker's ``CUDA_VISIBLE_DEVICES`` and the frameworks' defaults go only where the plan found
real GPUs; everything set is recorded (:func:`~pytest_gpushare.session.note_env`) for the header.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pytest_gpushare import planner, report
from pytest_gpushare.brokerhooks import PLUGIN_NAME as BROKER_PLUGIN
from pytest_gpushare.brokerhooks import broker_for_workers
from pytest_gpushare.dispatch.needs import INPUT_KEY, DispatchInput, write_needs
from pytest_gpushare.dispatch.order import MarkedNeed
from pytest_gpushare.gpus.visible import cuda_visible_env
from pytest_gpushare.session import (
    begin_gpu_work,
    get_plan,
    get_settings,
    gpu_work_begun,
    is_worker,
    never_plans,
    note_env,
    worker_input,
)

if TYPE_CHECKING:
    from pytest_gpushare.dispatch.scheduling import MemoryScheduling
    from pytest_gpushare.needs import TestNeeds

__all__ = [
    "HOME_ENV",
    "framework_defaults",
    "home_gpu",
    "is_local",
    "order_devices",
    "take_home_gpu",
    "worker_env",
    "worker_line",
    "xdist_default_count",
]

PLUGIN_NAME = "gpushare-xdist"
HOME_ENV = "GPUSHARE_HOME_GPU"
#: The plan's answer to ``-n auto``, kept for the header.
AUTO_KEY = pytest.StashKey[planner.WorkerCount]()
#: This process's home GPU, taken out of the environment (:func:`take_home_gpu`).
HOME_KEY = pytest.StashKey["str | None"]()
#: Where the NVIDIA driver lists the GPUs it drives, one folder per GPU (Linux).
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
#: The memory-aware scheduler of this session, where xdist uses it (the controller only).
SCHEDULER_KEY = pytest.StashKey["MemoryScheduling"]()
#: Where the controller keeps each test's duration in pytest's cache, for the next run's order.
DURATIONS_KEY = "gpushare/durations"
#: At most this many durations are kept (the most recently seen).
DURATIONS_KEPT = 50_000


# --- before the conftests ----------------------------------------------------------------------


def order_devices(config: pytest.Config, driver_gpus: Path = DRIVER_GPUS) -> None:
    """Make ``cuda:N`` count GPUs in PCI order, as NVML and the header do, where it matters.

    Runs before any conftest can initialise CUDA, when nothing says yet whether the run has GPU
    tests, so it must be cheap and must not start NVML or CUDA: it reads the driver's folder of
    GPUs. With one GPU (or none) both orders agree and nothing is set; where the folder does not
    exist (no driver, WSL2, another system) nothing is set either. A value the user set is kept.
    """
    if "CUDA_DEVICE_ORDER" in os.environ:
        return
    try:
        count = sum(1 for _ in driver_gpus.iterdir())
    except OSError:
        return
    if count > 1:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        note_env(config, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})


def take_home_gpu(config: pytest.Config) -> None:
    """Keep this process's home GPU (set in its xdist spec) in ``config.stash`` and take it out of
    the environment, so that a pytest started by a test (pytester, a subprocess) does not take
    this worker's home for its own."""
    config.stash[HOME_KEY] = os.environ.pop(HOME_ENV, None) or None


def home_gpu(config: pytest.Config) -> str | None:
    """This process's home GPU uuid, as the controller assigned it (None outside xdist)."""
    return config.stash.get(HOME_KEY, None)


# --- the worker count --------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: the plan's count on a box with usable GPU memory, else xdist's own."""
    if never_plans(config):
        return None
    plan = get_plan(config)
    count = plan.worker_count(xdist_default_count(config))
    config.stash[AUTO_KEY] = count
    return count.workers


def xdist_default_count(config: pytest.Config) -> int | None:
    """xdist's own ``-n auto`` answer (it honours PYTEST_XDIST_AUTO_NUM_WORKERS and ``-n logical``)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return None
    me = config.pluginmanager.get_plugin(PLUGIN_NAME)
    remove = [me] if me is not None else []
    caller = config.pluginmanager.subset_hook_caller("pytest_xdist_auto_num_workers", remove)
    result = caller(config=config)
    return int(result) if result is not None else None


def worker_line(config: pytest.Config, plan: planner.Plan) -> report.WorkerLine:
    """The header's worker count: ``-n auto``'s, ``-n N``'s, or one process without xdist."""
    auto = config.stash.get(AUTO_KEY, None)
    n = getattr(config.option, "numprocesses", None)
    if auto is not None:
        return report.WorkerLine("auto", int(n or auto.workers), auto)
    planned = plan.worker_count(xdist_default_count(config))
    if isinstance(n, int) and n > 0:
        return report.WorkerLine("fixed", n, planned)
    return report.WorkerLine("single", 1, planned)


def planned_count(config: pytest.Config) -> bool:
    """Whether ``-n auto`` asked the plan for the worker count."""
    return AUTO_KEY in config.stash


# --- each worker's environment -----------------------------------------------------------------


def framework_defaults(config: pytest.Config, plan: planner.Plan) -> dict[str, str]:
    """The frameworks' settings that keep them from taking a whole GPU, where unset and enabled,
    and only where the plan found real GPUs (simulated ones have no device to grab)."""
    if not get_settings(config).framework_defaults or not any(not g.gpu.simulated for g in plan.gpus):
        return {}
    # Here, not at the top: enforce loads observe, which a run that starts no real GPU work
    # (--collect-only, a box without GPUs) never needs.
    from pytest_gpushare.enforce import framework_env

    return framework_env(os.environ)


def worker_env(plan: planner.Plan, home: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker whose home GPU is ``home`` (a uuid).

    Real GPUs are listed by UUID, home first, so ``cuda:0`` is the home GPU whatever the
    inherited ``CUDA_VISIBLE_DEVICES`` was (the probe already applied it) and whatever order
    CUDA would pick; a MIG home is listed alone (CUDA shows a process one MIG instance), and a
    whole-GPU home lists the whole GPUs only. Simulated GPUs have no CUDA device behind them:
    their workers keep the inherited visibility, so a real GPU (if any) is not hidden by a
    made-up UUID. ``extra`` (the frameworks' defaults) is added as given.
    """
    order = [plan.by_uuid(home).gpu] + [g.gpu for g in plan.gpus if g.gpu.uuid != home]
    return {HOME_ENV: home, **cuda_visible_env(order), **(extra or {})}


def is_local(spec: Any) -> bool:
    """Whether an xdist spec starts its worker on this box: a plain ``popen`` gateway (any
    ``python=``), not ``ssh=``, ``socket=`` or one reached ``via`` another gateway."""
    return bool(getattr(spec, "popen", False)) and not getattr(spec, "via", None)


def _pin_text(plan: planner.Plan, env: Mapping[str, str]) -> str | None:
    """What a worker was pinned to, in the header's words; None where nothing was (simulated)."""
    shown = env.get("CUDA_VISIBLE_DEVICES")
    if shown is None:
        return None
    indices = [plan.by_uuid(u).gpu.index for u in shown.split(",")]
    rest = f" (then {', '.join(map(str, indices[1:]))})" if len(indices) > 1 else " only"
    return f"GPU {indices[0]}{rest}"


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: Sequence[Any]) -> None:
    """Give each worker on this box its home GPU in its tx spec environment, and say so.

    The spec's ``env:`` entries are set by execnet before pytest starts in the worker, so no
    conftest or test can touch CUDA first; xdist reuses the spec for a replacement worker after
    a crash, which therefore gets the same home GPU (never derived from the worker id). Workers
    on other hosts plan on their own (SPEC "Past one box") and get nothing here. ``tryfirst``:
    the lines come before xdist's own status line.
    """
    if never_plans(config):
        return
    local = [spec for spec in specs if is_local(spec)]
    if not local:
        return
    plan = begin_gpu_work(config)
    homes = planner.assign_homes(plan, len(local))  # empty without a GPU: nothing to set
    extra = framework_defaults(config, plan) if homes else {}
    pinned: list[tuple[str, str]] = []
    for spec, home in zip(local, homes, strict=False):
        env = worker_env(plan, home, extra)
        spec.env.update(env)
        text = _pin_text(plan, env)
        if text is not None:
            pinned.append((str(getattr(spec, "id", None) or "?"), text))
    _announce(config, report.pin_lines(pinned, {**env_set_in_workers(pinned), **extra}))


def env_set_in_workers(pinned: Sequence[tuple[str, str]]) -> dict[str, str]:
    """What pinning itself sets beside each worker's ``CUDA_VISIBLE_DEVICES``."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} if pinned else {}


def _announce(config: pytest.Config, lines: Sequence[str]) -> None:
    """Lines that belong to the header, written where it was (hidden with ``-q`` like it)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or config.get_verbosity() < 0:
        return
    for line in lines:
        tr.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Send the controller's plan to workers on this box (they ask NVML and Ollama nothing), and
    the way to the session's broker where it runs one; a worker on another host gets only the
    session id and plans there. Where the session dispatches by memory, a local worker also
    learns where to write its tests' needs (in the broker's private folder)."""
    local = is_local(node.gateway.spec)
    received = worker_input(node.config, local=local)
    broker = broker_for_workers(node.config) if local else None
    if broker is not None:
        received["gpushare_broker"] = broker
    node.workerinput.update(received)
    if broker is not None and dispatches_by_memory(node.config):
        folder = Path(broker["address"]).parent
        node.workerinput[INPUT_KEY] = DispatchInput(needs_path=str(folder / f"needs-{node.gateway.id}.json"))


# --- memory-aware dispatch (docs/concepts/dispatch.rst) ----------------------------------------


def dispatches_by_memory(config: pytest.Config) -> bool:
    """Whether xdist's default ``--dist load`` is in use with ``--gpushare-dispatch=memory``."""
    return config.getvalue("dist") == "load" and get_settings(config).dispatch == "memory"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> MemoryScheduling | None:
    """The memory-aware scheduler under ``--dist load``, where the session runs a broker (GPU work
    on a box with GPUs); None leaves xdist's own scheduler (other ``--dist`` modes,
    ``--gpushare-dispatch=xdist``, no GPU)."""
    if never_plans(config) or not dispatches_by_memory(config) or not gpu_work_begun(config):
        return None
    hooks = config.pluginmanager.get_plugin(BROKER_PLUGIN)
    if hooks is None or not get_plan(config).gpus:
        return None
    from pytest_gpushare.dispatch.scheduling import MemoryScheduling, SessionFacts

    plan = get_plan(config)

    def waiting() -> Mapping[str, float]:
        broker = hooks.broker
        return {} if broker is None else broker.waiting()

    facts = SessionFacts(
        usable={g.gpu.uuid: g.usable_bytes for g in plan.gpus},
        totals={g.gpu.uuid: g.gpu.total_bytes for g in plan.gpus},
        context_bytes=get_settings(config).context_mem_bytes,
        home=lambda node: node.gateway.spec.env.get(HOME_ENV) if is_local(node.gateway.spec) else None,
        durations=_read_durations(config),
        waiting=waiting,
    )
    scheduler = MemoryScheduling(config, log, facts)
    config.stash[SCHEDULER_KEY] = scheduler
    return scheduler


class _LeaseHooks(Protocol):
    """What dispatch asks of :class:`pytest_gpushare.testhooks.LeaseHooks` (found by its plugin
    name: testhooks imports this module)."""

    @property
    def needs(self) -> TestNeeds: ...


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """A local worker of a session that dispatches by memory writes its tests' needs before
    xdist sends the controller its collection (tryfirst: xdist's own hook sends it)."""
    config = session.config
    received: DispatchInput | None = getattr(config, "workerinput", {}).get(INPUT_KEY)
    hooks: _LeaseHooks | None = config.pluginmanager.get_plugin("gpushare-leases")
    if received is None or hooks is None or config.getoption("collectonly", False):
        return
    # No file (whatever went wrong) only means the controller leaves the run to xdist: the
    # needs are an aid to dispatch, never a reason for a session to fail.
    with contextlib.suppress(Exception):
        needs = [_marked_need(hooks, item) for item in session.items]
        write_needs(received["needs_path"], [item.nodeid for item in session.items], needs)


def _marked_need(hooks: _LeaseHooks, item: pytest.Item) -> MarkedNeed | None:
    """What ``item`` needs, as its lease will ask (None: no GPU test, or a bad marker, which
    fails at setup without a lease)."""
    found = hooks.needs.placed(item)
    if found is None:
        return None
    _, need, anywhere = found
    return MarkedNeed(need.mem, need.count, need.exclusive, anywhere)


def _read_durations(config: pytest.Config) -> dict[str, float]:
    cache = getattr(config, "cache", None)
    found = cache.get(DURATIONS_KEY, {}) if cache is not None else {}
    if not isinstance(found, dict):
        return {}
    return {
        k: float(v)
        for k, v in found.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
    }


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller keeps each test's duration for the next run's order (the scheduler
    measured them: xdist reports each test's run time to it)."""
    config = session.config
    scheduler = config.stash.get(SCHEDULER_KEY, None)
    cache = getattr(config, "cache", None)
    if scheduler is None or cache is None or not scheduler.durations or is_worker(config):
        return
    kept = _read_durations(config)
    for nodeid, seconds in scheduler.durations.items():
        kept.pop(nodeid, None)
        kept[nodeid] = round(seconds, 4)
    cache.set(DURATIONS_KEY, dict(list(kept.items())[-DURATIONS_KEPT:]))
