"""pytest-gpushare's entry point: pytest's hooks, each handing over to the part that does the work.

- :mod:`~pytest_gpushare.session`: the settings, the plan, Ollama's answer, the session id.
- :mod:`~pytest_gpushare.workers`: xdist's worker count, home GPUs, worker environment
  (registered from ``pytest_addhooks``: xdist asks for the count before ``pytest_configure``).
- :mod:`~pytest_gpushare.testhooks`: the lease around each test, the fixtures, ``lease()``.
- :mod:`~pytest_gpushare.summary`: the header, the waiting lines, the terminal summary, the
  JSON report and the history of observed peaks (controller only).

``--help``, ``--version`` and ``--markers`` never reach a path that starts NVML or contacts
Ollama: nothing is computed before it is asked for, and those invocations register no part.
"""

from __future__ import annotations

import os

import pytest

from pytest_gpushare import hookspecs, session, summary, testhooks, workers
from pytest_gpushare.gpus import Gpu, GpuInventory
from pytest_gpushare.planner import Reservation
from pytest_gpushare.settings.pytest_options import add_options


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)
    if not pluginmanager.is_registered(workers):
        pluginmanager.register(workers, workers.PLUGIN_NAME)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_gpushare_probe(config: pytest.Config) -> GpuInventory:
    return session.own_inventory(config)


@pytest.hookimpl(trylast=True)
def pytest_gpushare_reservations(config: pytest.Config, gpus: tuple[Gpu, ...]) -> list[Reservation]:
    return session.own_reservations(config, gpus)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest can touch CUDA: make ``cuda:N`` count GPUs in PCI order, as NVML does.

    Only when the user has not chosen an order; xdist workers get it in their tx spec.
    """
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", testhooks.MARKER_HELP)
    if session.never_plans(config):
        return
    if not session.is_worker(config):
        session.prepare_ledger_folder(config)
        workers.set_framework_defaults(config)
    leases = testhooks.LeaseHooks(config)
    if not config.pluginmanager.is_registered(testhooks):
        config.pluginmanager.register(testhooks, "gpushare-fixtures")
    config.pluginmanager.register(leases, "gpushare-leases")
    if not session.is_worker(config):
        config.pluginmanager.register(summary.Collector(config, leases.block_entries), "gpushare-summary")


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if session.is_worker(config):
        return None
    return summary.header(config)
