"""pytest hooks only: options, the marker, wiring of the pure core to pytest and xdist.

Everything is resolved on first use, not in ``pytest_configure``: xdist asks for the worker
count from its ``pytest_cmdline_main``, before ``pytest_configure`` runs. ``--help``,
``--version`` and ``--markers`` never reach a path that starts NVML or contacts Ollama.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from pytest_gpushare import hookspecs, planner, report
from pytest_gpushare import observations as advice
from pytest_gpushare import settings as _settings
from pytest_gpushare.credits import holder_credits
from pytest_gpushare.enforce import framework_env
from pytest_gpushare.errors import GpuShareError
from pytest_gpushare.fixtures import GpuLease
from pytest_gpushare.gpus import Gpu, GpuInventory, probe_for
from pytest_gpushare.ollama import OllamaStatus, attribute_held, query_ollama
from pytest_gpushare.planner import Budget, Plan, Reservation, WorkerCount

__all__ = ["get_plan", "get_settings", "is_worker", "ollama_status", "session_id"]

T = TypeVar("T")

SETTINGS_KEY = pytest.StashKey[_settings.Settings]()
PLAN_KEY = pytest.StashKey[Plan]()
OLLAMA_KEY = pytest.StashKey[OllamaStatus]()
AUTO_KEY = pytest.StashKey[WorkerCount]()
SESSION_KEY = pytest.StashKey[str]()

MARKER_HELP = (
    "gpu(mem=None, count=1, exclusive=False): the test needs `mem` (a size such as '4GiB', or "
    "'N%' of the device) on each of `count` distinct GPUs; pytest-gpushare leases it for the "
    "test's duration. exclusive=True holds all usable memory of each GPU."
)


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def never_plans(config: pytest.Config) -> bool:
    """True for invocations that must not start NVML or contact anything."""
    opt = config.option
    return bool(
        getattr(opt, "help", False) or getattr(opt, "version", False) or getattr(opt, "markers", False)
    )


def _once(
    config: pytest.Config,
    key: pytest.StashKey[T],
    name: str,
    decode: Callable[[Any], T],
    compute: Callable[[], T],
) -> T:
    """A per-session value, made once per process: a worker receives the controller's (in its
    ``workerinput[name]``), the controller (or a run without xdist) computes it."""
    if key in config.stash:
        return config.stash[key]
    received = getattr(config, "workerinput", {})
    value = decode(received[name]) if name in received else compute()
    config.stash[key] = value
    return value


def session_id(config: pytest.Config) -> str:
    """One id per pytest session, shared by the controller and its workers (ledger records)."""
    return _once(config, SESSION_KEY, "gpushare_session", str, lambda: uuid.uuid4().hex[:12])


def get_settings(config: pytest.Config) -> _settings.Settings:
    """The session's settings, resolved once; a bad value is a usage error naming its source."""
    try:
        return config.stash[SETTINGS_KEY]
    except KeyError:
        pass
    try:
        resolved = _settings.resolve_settings(config)
    except GpuShareError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = resolved
    return resolved


def ollama_status(config: pytest.Config) -> OllamaStatus:
    """What Ollama holds: asked once per session in the controller, received by workers."""
    return _once(
        config,
        OLLAMA_KEY,
        "gpushare_ollama",
        OllamaStatus.from_dict,
        lambda: query_ollama(get_settings(config).ollama, os.environ),
    )


def _call_each(pm_config: pytest.Config, name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Call every implementation of one of our hooks, naming the one that raises.

    A failing planning hook is a usage error that names the plugin and the hook: a silent zero
    reservation could push another application off the GPU.
    """
    caller = getattr(pm_config.hook, name)
    for impl in reversed(caller.get_hookimpls()):
        args = {k: kwargs[k] for k in impl.argnames}
        try:
            result = impl.function(**args)
        except pytest.UsageError:
            raise
        except Exception as exc:
            raise pytest.UsageError(
                f"gpushare: {name} in {impl.plugin_name} raised {type(exc).__name__}: {exc}"
            ) from None
        yield impl.plugin_name, result


def _probe(config: pytest.Config) -> GpuInventory:
    for plugin_name, result in _call_each(config, "pytest_gpushare_probe", config=config):
        if result is None:
            continue
        if not isinstance(result, GpuInventory):
            raise pytest.UsageError(
                f"gpushare: pytest_gpushare_probe in {plugin_name} returned {type(result).__name__}, "
                "not a GpuInventory"
            )
        return result
    return GpuInventory(gpus=(), source="no probe answered")


def _reservations(config: pytest.Config, gpus: tuple[Gpu, ...]) -> list[Reservation]:
    out: list[Reservation] = []
    indices = {g.index for g in gpus}
    for plugin_name, result in _call_each(config, "pytest_gpushare_reservations", config=config, gpus=gpus):
        for r in result or ():
            if not isinstance(r, Reservation) or r.bytes < 0 or r.gpu_index not in indices:
                raise pytest.UsageError(
                    f"gpushare: pytest_gpushare_reservations in {plugin_name} returned {r!r}: "
                    f"expected Reservation values with bytes >= 0 for GPU indices {sorted(indices)}"
                )
            out.append(r)
    return out


def compute_plan(config: pytest.Config) -> Plan:
    """Probe, ask every reservation hook, and apply the formula (controller only)."""
    s = get_settings(config)
    inventory = _probe(config)
    reservations = _reservations(config, inventory.gpus)
    notes = list(s.notes)
    worker_mem = s.worker_mem_bytes
    if s.sources.get("worker_mem_bytes") == _settings.DEFAULT_SOURCE and s.worker_mem_from != "off":
        learned = advice.budget_from_history(
            _read_history(config), s.worker_mem_from, context_fallback=s.context_mem_bytes
        )
        if learned is not None:
            worker_mem = learned.bytes
            notes.append(
                f"worker mem {learned.describe()} (--gpushare-worker-mem sets it; "
                "--gpushare-worker-mem-from=off ignores history)"
            )
    budget = Budget(
        safety_bytes=s.safety_bytes,
        worker_mem_bytes=worker_mem,
        context_bytes=s.context_mem_bytes,
        workers_per_gb=s.workers_per_gb,
        max_workers=s.max_workers,
    )
    notes += [
        f"--gpushare-reserve names GPU {i}, which this box does not have"
        for i in sorted(set(s.reserve.per_index) - {g.index for g in inventory.gpus})
    ]
    credits = holder_credits(inventory.gpus, s.ledger_dir)  # our lease holders' real use
    return planner.make_plan(inventory, budget, reservations=reservations, credits=credits, notes=notes)


def _read_history(config: pytest.Config) -> object:
    """Observed peaks of earlier runs, from pytest's cache file.

    ``config.cache`` does not exist yet when xdist asks for the worker count (the cache
    provider makes it in ``pytest_configure``), so the file is read directly; without the
    cache provider there is no history.
    """
    try:
        cache_dir = config.rootpath / os.path.expanduser(str(config.getini("cache_dir")))
    except (ValueError, KeyError):
        return None
    path = cache_dir / "v" / advice.HISTORY_KEY
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def get_plan(config: pytest.Config) -> Plan:
    """The session's plan: computed once in the controller, received by xdist workers."""
    return _once(config, PLAN_KEY, "gpushare_plan", Plan.from_dict, lambda: compute_plan(config))


# --- hooks -----------------------------------------------------------------------------------


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)
    # xdist asks for the worker count before pytest_configure: register its hooks now.
    from pytest_gpushare import workers

    if not pluginmanager.is_registered(workers):
        pluginmanager.register(workers, "gpushare-xdist")


def pytest_addoption(parser: pytest.Parser) -> None:
    _settings.add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_gpushare_probe(config: pytest.Config) -> GpuInventory:
    return probe_for(get_settings(config).simulate).probe()


@pytest.hookimpl(trylast=True)
def pytest_gpushare_reservations(config: pytest.Config, gpus: tuple[Gpu, ...]) -> list[Reservation]:
    """The plugin's own reservations: ``--gpushare-reserve`` and the Ollama hold."""
    s = get_settings(config)
    out = planner.reservations_from_sizes(s.reserve, gpus, "reserve")
    held = attribute_held(ollama_status(config), gpus).by_gpu
    out += planner.ollama_reservations(s.ollama_reserve, held, gpus)
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest can touch CUDA: make ``cuda:N`` count GPUs in PCI order, as NVML does.

    Only when the user has not chosen an order; xdist workers get it in their tx spec.
    """
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if never_plans(config):
        return
    if not is_worker(config):
        _check_ledger_dir(config)
    if not is_worker(config) and get_settings(config).framework_defaults:
        # Workers inherit the controller's environment: one place covers -n N and no xdist.
        for key, value in framework_env(os.environ).items():
            os.environ.setdefault(key, value)
    from pytest_gpushare.lifecycle import LeasePlugin

    config.pluginmanager.register(LeasePlugin(config), "gpushare-leases")


def _granted(request: pytest.FixtureRequest) -> list[GpuLease]:
    from pytest_gpushare.lifecycle import GRANT_KEY

    grant = request.node.stash.get(GRANT_KEY, None)
    if grant is None:
        raise GpuShareError("gpushare: no lease for this test (is the plugin disabled for it?)")
    return list(grant.gpus)


@pytest.fixture
def gpu(request: pytest.FixtureRequest) -> GpuLease:
    """The :class:`GpuLease` of the running test (its first device when ``count > 1``)."""
    return _granted(request)[0]


@pytest.fixture
def gpus(request: pytest.FixtureRequest) -> list[GpuLease]:
    """One :class:`GpuLease` per device of the running test, in the order it should use them."""
    return _granted(request)


def _check_ledger_dir(config: pytest.Config) -> None:
    """Refuse an unsafe or unusable ledger folder once, at start (exit 4), not per test."""
    from pytest_gpushare.errors import LedgerError
    from pytest_gpushare.ledger import default_ledger_dir, prepare_ledger_dir

    folder = get_settings(config).ledger_dir or str(default_ledger_dir())
    try:
        prepare_ledger_dir(folder)
    except (LedgerError, OSError) as exc:
        raise pytest.UsageError(f"gpushare: ledger folder {folder}: {exc}") from None


def _worker_line(config: pytest.Config, plan: Plan) -> report.WorkerLine:
    auto = config.stash.get(AUTO_KEY, None)
    n = getattr(config.option, "numprocesses", None)
    if auto is not None:
        return report.WorkerLine("auto", int(n or auto.workers), auto)
    planned = plan.worker_count(xdist_default_count(config))
    if isinstance(n, int) and n > 0:
        return report.WorkerLine("fixed", n, planned)
    return report.WorkerLine("single", 1, planned)


def xdist_default_count(config: pytest.Config) -> int | None:
    """xdist's own ``-n auto`` answer (it honours PYTEST_XDIST_AUTO_NUM_WORKERS and ``-n logical``)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return None
    me = config.pluginmanager.get_plugin("gpushare-xdist")
    remove = [me] if me is not None else []
    caller = config.pluginmanager.subset_hook_caller("pytest_xdist_auto_num_workers", remove)
    result = caller(config=config)
    return int(result) if result is not None else None


def header(config: pytest.Config, workers: report.WorkerLine | None = None) -> list[str]:
    """The VRAM analysis block."""
    plan = get_plan(config)
    s = get_settings(config)
    extra = ollama_lines(config, plan)
    from pytest_gpushare.ledger import default_ledger_dir

    ledger_dir = s.ledger_dir or f"{default_ledger_dir()} (this account's private folder)"
    if not s.ledger_dir:
        extra += report.foreign_lines(_foreign_processes(plan))
    line = workers or _worker_line(config, plan)
    return report.header_lines(plan, line, ledger=ledger_dir, extra=extra)


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


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if is_worker(config):
        return None
    return header(config)
