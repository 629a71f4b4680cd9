"""Per-session values, made once per process and kept in ``config.stash``, and the typed data
that crosses processes.

The settings, the plan, what Ollama holds and the session id are made on first use, not in
``pytest_configure``: xdist asks for the worker count from its ``pytest_cmdline_main``, before
``pytest_configure`` runs. The xdist controller (or a run without xdist) computes them; a
worker on this box receives the controller's plan in its ``workerinput`` (:class:`WorkerInput`),
so it asks NVML, Ollama and the planning hooks nothing; a worker on another host (a remote
gateway) plans on its own host. What flows back (each test's lease on its reports, the
``lease()`` blocks in ``workeroutput``) is a :class:`~pytest_gpushare.entries.LeaseEntry`.

A run that never meets a GPU test does no GPU work (SPEC "Coexisting"): the plan is made when
something needs it (``-n auto``'s count, the workers' home GPUs, the first GPU test), Ollama is
asked only where the plan found GPUs, and :func:`begin_gpu_work` marks the moment the session
starts using the box (the ledger folder is checked then, not before).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, cast

import pytest

from pytest_gpushare import hookcalls, planner
from pytest_gpushare.credits import holder_credits
from pytest_gpushare.entries import LeaseEntry
from pytest_gpushare.errors import GpuShareError, LedgerError
from pytest_gpushare.gpus import Gpu, GpuInventory, probe_for
from pytest_gpushare.ledger import ledger_dir_for, prepare_ledger_dir
from pytest_gpushare.planner import Budget, Plan, Reservation
from pytest_gpushare.settings import DEFAULT_SOURCE, Settings
from pytest_gpushare.settings.pytest_options import resolve_settings

# The broker is imported only by sessions that start one; Ollama and the history of observed
# peaks only where a plan is made (never in a worker on this box, which receives it).
if TYPE_CHECKING:
    from pytest_gpushare.broker import BrokerInput
    from pytest_gpushare.ollama import OllamaStatus

__all__ = [
    "MAIN_WORKER",
    "MARKER_HELP",
    "WorkerInput",
    "WorkerOutput",
    "begin_gpu_work",
    "broker_input",
    "check_report_path",
    "compute_plan",
    "env_set",
    "get_plan",
    "get_settings",
    "gpu_work_begun",
    "has_own_tests",
    "is_worker",
    "never_plans",
    "note_env",
    "ollama_status",
    "runs_workers",
    "session_id",
    "suite_gpu_marker",
    "worker_id",
    "worker_input",
]

T = TypeVar("T")

SETTINGS_KEY = pytest.StashKey[Settings]()
PLAN_KEY = pytest.StashKey[Plan]()
OLLAMA_KEY = pytest.StashKey["OllamaStatus"]()
SESSION_KEY = pytest.StashKey[str]()
GPU_WORK_KEY = pytest.StashKey[bool]()
OWN_TESTS_KEY = pytest.StashKey[bool]()
ENV_KEY = pytest.StashKey[dict[str, str]]()

#: The plugin's own line of ``--markers`` (what tells it apart from a suite's own ``gpu`` marker).
MARKER_HELP = (
    "gpu(mem=None, count=1, exclusive=False): the test needs `mem` (a size such as '4GiB', or "
    "'N%' of the device) on each of `count` distinct GPUs; pytest-gpushare leases it for the "
    "test's duration. exclusive=True holds all usable memory of each GPU."
)


class _SessionInput(TypedDict):
    gpushare_session: str


class WorkerInput(_SessionInput, total=False):
    """What the controller puts in each worker's ``workerinput`` (beside xdist's own keys).

    ``gpushare_plan`` goes only to workers on this box; a worker on another host plans there.
    ``gpushare_broker`` says how to reach the session's broker, where the controller runs one
    (workers on this box, on a box with GPUs): such a worker leases through it, not the ledger.
    """

    gpushare_plan: dict[str, Any]
    gpushare_broker: BrokerInput


class WorkerOutput(TypedDict):
    """What a worker leaves in its ``workeroutput`` for the controller."""

    gpushare_blocks: list[LeaseEntry]


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


#: The worker that a lease record of the controller or of a run without xdist names.
MAIN_WORKER = "main"


def worker_id(config: pytest.Config) -> str:
    """xdist's id of this worker (``gw0``), or :data:`MAIN_WORKER` in the controller or a run
    without xdist."""
    return str(config.workerinput["workerid"]) if is_worker(config) else MAIN_WORKER  # type: ignore[attr-defined]


def never_plans(config: pytest.Config) -> bool:
    """True for invocations that must not start NVML or contact anything."""
    opt = config.option
    return bool(
        getattr(opt, "help", False) or getattr(opt, "version", False) or getattr(opt, "markers", False)
    )


def suite_gpu_marker(config: pytest.Config) -> str | None:
    """The suite's own registration of a ``gpu`` marker (an ini ``markers`` line, or
    ``config.addinivalue_line`` from a conftest or another plugin), or None.

    Where there is one, a bare ``@pytest.mark.gpu`` is the suite's (SPEC "Coexisting"), unless
    ``gpushare_adopt_marker`` hands it to the plugin.
    """
    for line in config.getini("markers"):
        text = str(line)
        if text != MARKER_HELP and text.split(":", 1)[0].split("(", 1)[0].strip() == "gpu":
            return text
    return None


def runs_workers(config: pytest.Config) -> bool:
    """True in an xdist controller that starts workers (``-n N``, ``-n auto``, ``--tx``)."""
    return not is_worker(config) and config.pluginmanager.get_plugin("dsession") is not None


def _once(
    config: pytest.Config,
    key: pytest.StashKey[T],
    name: Literal["gpushare_plan", "gpushare_session"],
    decode: Callable[[Any], T],
    compute: Callable[[], T],
) -> T:
    """A per-session value, made once per process: a worker receives the controller's (in its
    ``workerinput[name]``), the controller (or a run without xdist) computes it."""
    if key in config.stash:
        return config.stash[key]
    received = cast(WorkerInput, getattr(config, "workerinput", {}))
    value = decode(received[name]) if name in received else compute()
    config.stash[key] = value
    return value


def session_id(config: pytest.Config) -> str:
    """One id per pytest session, shared by the controller and its workers (ledger records)."""
    return _once(config, SESSION_KEY, "gpushare_session", str, lambda: uuid.uuid4().hex[:12])


def get_settings(config: pytest.Config) -> Settings:
    """The session's settings, resolved once; a bad value is a usage error naming its source."""
    try:
        return config.stash[SETTINGS_KEY]
    except KeyError:
        pass
    try:
        resolved = resolve_settings(config)
    except GpuShareError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = resolved
    return resolved


def ollama_status(config: pytest.Config) -> OllamaStatus:
    """What Ollama holds: asked once per session by the process that plans (the controller, or a
    worker on another host), and only where the plan needs it (a box with GPUs)."""
    if OLLAMA_KEY not in config.stash:
        from pytest_gpushare.ollama import query_ollama

        config.stash[OLLAMA_KEY] = query_ollama(get_settings(config).ollama, os.environ)
    return config.stash[OLLAMA_KEY]


def get_plan(config: pytest.Config) -> Plan:
    """The session's plan: computed once in the controller, received by xdist workers."""
    return _once(config, PLAN_KEY, "gpushare_plan", Plan.from_dict, lambda: compute_plan(config))


def worker_input(config: pytest.Config, *, local: bool = True) -> WorkerInput:
    """What a worker receives: on this box the plan too, so it asks NVML, Ollama and the
    planning hooks nothing; on another host (``local=False``) only the session id."""
    received = WorkerInput(gpushare_session=session_id(config))
    if local:
        received["gpushare_plan"] = get_plan(config).to_dict()
    return received


def broker_input(config: pytest.Config) -> BrokerInput | None:
    """How this worker reaches its session's broker; None outside xdist workers or where the
    controller runs none (the process then leases from the box ledger directly)."""
    received = cast(WorkerInput, getattr(config, "workerinput", {}))
    return received.get("gpushare_broker")


def begin_gpu_work(config: pytest.Config, *, own_tests: bool = False) -> Plan:
    """The session starts using the box (a GPU test is known, or workers are pinned): the plan,
    and, once per session in the process that plans, on a box with GPUs, the ledger folder
    checked (an unusable one is a usage error naming its source, exit 4).

    ``own_tests``: the run has GPU tests that are fully the plugin's (not only a suite's own
    bare ``gpu`` markers, which on a box without a GPU are none of the plugin's business)."""
    if own_tests:
        config.stash[OWN_TESTS_KEY] = True
    plan = get_plan(config)
    if config.stash.get(GPU_WORK_KEY, False):
        return plan
    config.stash[GPU_WORK_KEY] = True
    if plan.gpus and "gpushare_plan" not in getattr(config, "workerinput", {}):
        ledger_folder_checked(config)
    return plan


def gpu_work_begun(config: pytest.Config) -> bool:
    return config.stash.get(GPU_WORK_KEY, False)


def has_own_tests(config: pytest.Config) -> bool:
    """Whether GPU tests that are fully the plugin's were found (:func:`begin_gpu_work`)."""
    return config.stash.get(OWN_TESTS_KEY, False)


def ledger_folder_checked(config: pytest.Config) -> Path:
    """The session's ledger folder, made and checked; an unsafe or unusable one is a usage
    error (exit 4) that names the folder and where the setting came from."""
    s = get_settings(config)
    folder = ledger_dir_for(s.ledger_dir)
    try:
        return prepare_ledger_dir(folder)
    except (LedgerError, OSError) as exc:
        source = s.sources.get("ledger_dir", DEFAULT_SOURCE)
        where = "this account's default" if source == DEFAULT_SOURCE else source
        raise pytest.UsageError(f"gpushare: ledger folder {folder} ({where}): {exc}") from None


def check_report_path(config: pytest.Config) -> None:
    """Refuse a ``--gpushare-report`` path that can never be written, at start (exit 4), rather
    than after the tests: its folder (or the nearest one that exists) must be a folder."""
    s = get_settings(config)
    if not s.report:
        return
    target = Path(s.report)
    problem = None
    if target.is_dir():
        problem = f"{target} is a folder"
    else:
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            problem = f"{parent} is not a folder"
        elif not os.access(parent, os.W_OK | os.X_OK):
            problem = f"this account cannot write in {parent}"
    if problem:
        source = s.sources.get("report", "--gpushare-report")
        raise pytest.UsageError(f"gpushare: {source}: cannot write the report to {target}: {problem}")


def note_env(config: pytest.Config, values: Mapping[str, str]) -> None:
    """Record environment variables the plugin set, for the header to list."""
    config.stash.setdefault(ENV_KEY, {}).update(values)


def env_set(config: pytest.Config) -> dict[str, str]:
    """The environment variables the plugin set in this session, as :func:`note_env` recorded them."""
    found: dict[str, str] = config.stash.get(ENV_KEY, {})
    return found.copy()


# --- the plan (controller only) ---------------------------------------------------------------


def own_inventory(config: pytest.Config) -> GpuInventory:
    """The plugin's own answer to the probe hook: ``--gpushare-simulate``, else NVML."""
    return probe_for(get_settings(config).simulate).probe()


def own_reservations(config: pytest.Config, gpus: tuple[Gpu, ...]) -> list[Reservation]:
    """The plugin's own reservations: ``--gpushare-reserve`` and the Ollama hold (Ollama is not
    asked on a box without GPUs: there is nothing to hold back)."""
    if not gpus:
        return []
    s = get_settings(config)
    out = planner.reservations_from_sizes(s.reserve, gpus, "reserve")
    from pytest_gpushare.ollama import attribute_held

    held = attribute_held(ollama_status(config), gpus).by_gpu
    out += planner.ollama_reservations(s.ollama_reserve, held, gpus)
    return out


def _probe(config: pytest.Config) -> GpuInventory:
    name = "pytest_gpushare_probe"
    for plugin_name, result in hookcalls.planning_results(config.pluginmanager, name, config=config):
        if result is None:
            continue
        if not isinstance(result, GpuInventory):
            raise pytest.UsageError(
                f"gpushare: {name} in {plugin_name} returned {type(result).__name__}, not a GpuInventory"
            )
        return result
    return GpuInventory(gpus=(), source="no probe answered")


def _reservations(config: pytest.Config, gpus: tuple[Gpu, ...]) -> list[Reservation]:
    name = "pytest_gpushare_reservations"
    out: list[Reservation] = []
    indices = {g.index for g in gpus}
    for plugin_name, results in hookcalls.planning_results(
        config.pluginmanager, name, config=config, gpus=gpus
    ):
        for result in cast(list[Any], results):
            for r in result or ():
                if not isinstance(r, Reservation) or r.bytes < 0 or r.gpu_index not in indices:
                    raise pytest.UsageError(
                        f"gpushare: {name} in {plugin_name} returned {r!r}: "
                        f"expected Reservation values with bytes >= 0 for GPU indices {sorted(indices)}"
                    )
                out.append(r)
    return out


def _budget(config: pytest.Config, notes: list[str]) -> Budget:
    """The settings' budget, its worker mem learned from earlier runs' peaks where not set."""
    s = get_settings(config)
    worker_mem = s.worker_mem_bytes
    if s.sources.get("worker_mem_bytes") == DEFAULT_SOURCE and s.worker_mem_from != "off":
        from pytest_gpushare.observations import budget_from_history

        learned = budget_from_history(
            read_history(config), s.worker_mem_from, context_fallback=s.context_mem_bytes
        )
        if learned is not None:
            worker_mem = learned.bytes
            notes.append(
                f"worker mem {learned.describe()} (--gpushare-worker-mem sets it; "
                "--gpushare-worker-mem-from=off ignores history)"
            )
    return Budget(
        safety_bytes=s.safety_bytes,
        worker_mem_bytes=worker_mem,
        context_bytes=s.context_mem_bytes,
        workers_per_gb=s.workers_per_gb,
        max_workers=s.max_workers,
    )


def compute_plan(config: pytest.Config) -> Plan:
    """Probe, ask every reservation hook, and apply the formula (controller only)."""
    s = get_settings(config)
    inventory = _probe(config)
    reservations = _reservations(config, inventory.gpus)
    notes = list(s.notes)
    budget = _budget(config, notes)
    notes += [
        f"--gpushare-reserve names GPU {i}, which this box does not have"
        for i in sorted(set(s.reserve.per_index) - {g.index for g in inventory.gpus})
    ]
    credits = holder_credits(inventory.gpus, s.ledger_dir)  # our lease holders' real use
    return planner.make_plan(inventory, budget, reservations=reservations, credits=credits, notes=notes)


def read_history(config: pytest.Config) -> object:
    """Observed peaks of earlier runs, from pytest's cache file (summary.py writes them).

    ``config.cache`` does not exist yet when xdist asks for the worker count (the cache
    provider makes it in ``pytest_configure``), so the file is read directly; without the
    cache provider there is no history.
    """
    try:
        cache_dir = config.rootpath / os.path.expanduser(str(config.getini("cache_dir")))
    except (ValueError, KeyError):
        return None
    from pytest_gpushare.observations import HISTORY_KEY

    path = cache_dir / "v" / HISTORY_KEY
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
