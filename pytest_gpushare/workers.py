"""xdist: the worker count, each worker's home GPU and environment, and what it receives.

These hook implementations are ``optionalhook``: the module is registered whether or not
pytest-xdist is installed, and without it nothing here is called. They must be registered
before xdist's ``pytest_cmdline_main`` asks for the worker count, so plugin.py registers this
module (as :data:`PLUGIN_NAME`) from ``pytest_addhooks`` rather than from ``pytest_configure``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_gpushare import planner, report
from pytest_gpushare.enforce import framework_env
from pytest_gpushare.gpus.visible import cuda_visible_env
from pytest_gpushare.session import get_plan, get_settings, is_worker, never_plans, worker_input

__all__ = ["HOME_ENV", "home_gpu", "worker_env", "worker_line", "xdist_default_count"]

PLUGIN_NAME = "gpushare-xdist"
HOME_ENV = "GPUSHARE_HOME_GPU"
#: The plan's answer to ``-n auto``, kept for the header.
AUTO_KEY = pytest.StashKey[planner.WorkerCount]()


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


def worker_env(plan: planner.Plan, home: str) -> dict[str, str]:
    """The environment of a worker whose home GPU is ``home`` (a uuid).

    Real GPUs are listed by UUID, home first, so ``cuda:0`` is the home GPU whatever the
    inherited ``CUDA_VISIBLE_DEVICES`` was (the probe already applied it) and whatever order
    CUDA would pick. Simulated GPUs have no CUDA device behind them: their workers keep the
    inherited visibility, so a real GPU (if any) is not hidden by a made-up UUID.
    """
    order = [plan.by_uuid(home).gpu] + [g.gpu for g in plan.gpus if g.gpu.uuid != home]
    return {HOME_ENV: home, **cuda_visible_env(order)}


def set_framework_defaults(config: pytest.Config) -> None:
    """In the controller, where unset and enabled: the frameworks' settings that keep them from
    taking a whole GPU. Workers inherit the controller's environment: one place covers ``-n N``
    and a run without xdist."""
    if is_worker(config) or not get_settings(config).framework_defaults:
        return
    for key, value in framework_env(os.environ).items():
        os.environ.setdefault(key, value)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: Sequence[Any]) -> None:
    """Give each worker its home GPU in its tx spec environment.

    The spec's ``env:`` entries are set by execnet before pytest starts in the worker, so no
    conftest or test can touch CUDA first; xdist reuses the spec for a replacement worker after
    a crash, which therefore gets the same home GPU (never derived from the worker id).
    """
    plan = get_plan(config)
    homes = planner.assign_homes(plan, len(specs))  # empty without a GPU: nothing to set
    for spec, home in zip(specs, homes, strict=False):
        spec.env.update(worker_env(plan, home))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Send the controller's plan and Ollama's answer, so workers ask NVML and Ollama nothing."""
    node.workerinput.update(worker_input(node.config))


def home_gpu() -> str | None:
    """This process's home GPU uuid, as the controller assigned it (None outside xdist)."""
    return os.environ.get(HOME_ENV) or None
