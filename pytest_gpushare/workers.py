"""xdist: the worker count, each worker's home GPU and environment, and the plan it receives.

These hook implementations are ``optionalhook``: the module is registered whether or not
pytest-xdist is installed, and without it nothing here is called. They must be registered
before xdist's ``pytest_cmdline_main`` asks for the worker count, so plugin.py registers this
module from ``pytest_addhooks`` rather than from ``pytest_configure``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_gpushare import planner
from pytest_gpushare.plugin import (
    AUTO_KEY,
    get_plan,
    get_settings,
    never_plans,
    ollama_status,
    session_id,
    xdist_default_count,
)

HOME_ENV = "GPUSHARE_HOME_GPU"


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: the plan's count on a box with usable GPU memory, else xdist's own."""
    if never_plans(config):
        return None
    plan = get_plan(config)
    count = plan.worker_count(xdist_default_count(config))
    config.stash[AUTO_KEY] = count
    return count.workers


def worker_env(plan: planner.Plan, home: str) -> dict[str, str]:
    """The environment of a worker whose home GPU is ``home`` (a uuid).

    Real GPUs are listed by UUID, home first, so ``cuda:0`` is the home GPU whatever the
    inherited ``CUDA_VISIBLE_DEVICES`` was (the probe already applied it) and whatever order
    CUDA would pick. Simulated GPUs have no CUDA device behind them: their workers keep the
    inherited visibility, so a real GPU (if any) is not hidden by a made-up UUID.
    """
    env = {HOME_ENV: home}
    if plan.gpus and not plan.gpus[0].gpu.simulated:
        order = [home] + [g.gpu.uuid for g in plan.gpus if g.gpu.uuid != home]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(order)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


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
    config = node.config
    node.workerinput["gpushare_plan"] = get_plan(config).to_dict()
    node.workerinput["gpushare_ollama"] = ollama_status(config).to_dict()
    node.workerinput["gpushare_session"] = session_id(config)
    settings = get_settings(config)
    node.workerinput["gpushare_ledger_dir"] = settings.ledger_dir or ""


def home_gpu() -> str | None:
    """This process's home GPU uuid, as the controller assigned it (None outside xdist)."""
    return os.environ.get(HOME_ENV) or None
