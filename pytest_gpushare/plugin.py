"""pytest-gpushare's entry point: pytest's hooks, each handing over to the part that does the work.

- :mod:`~pytest_gpushare.session`: the settings, the plan, Ollama's answer, the session id.
- :mod:`~pytest_gpushare.workers`: xdist's worker count, home GPUs, worker environment
  (registered from ``pytest_addhooks``: xdist asks for the count before ``pytest_configure``).
- :mod:`~pytest_gpushare.testhooks`: the lease around each test, ``lease()``;
  :mod:`~pytest_gpushare.fixtures`: each test's state, which tests are GPU tests, the fixtures.
- :mod:`~pytest_gpushare.summary`: the header, the waiting lines, the terminal summary, the
  JSON report and the history of observed peaks (controller only: workers never import it).

``--help``, ``--version`` and ``--markers`` never reach a path that starts NVML or contacts
Ollama: nothing is computed before it is asked for, and those invocations register no part.
Neither does a run without GPU tests that does not ask for ``-n auto`` (SPEC "Coexisting").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_gpushare import fixtures, hookspecs, session, testhooks, workers
from pytest_gpushare.settings.pytest_options import add_options

if TYPE_CHECKING:
    from pytest_gpushare.gpus import Gpu, GpuInventory
    from pytest_gpushare.planner import Reservation


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
    """Before any conftest can touch CUDA: this worker's home GPU out of the environment, and
    ``cuda:N`` counting GPUs in PCI order where the box has several (as NVML does)."""
    workers.take_home_gpu(early_config)
    workers.order_devices(early_config)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", session.MARKER_HELP)
    if session.never_plans(config):
        return
    if not session.is_worker(config):
        session.check_report_path(config)  # resolves the settings: a bad one is exit 4 now
    leases = testhooks.LeaseHooks(config)
    if not config.pluginmanager.is_registered(fixtures):
        config.pluginmanager.register(fixtures, "gpushare-fixtures")
    config.pluginmanager.register(leases, "gpushare-leases")
    if not session.is_worker(config):
        from pytest_gpushare import summary

        config.pluginmanager.register(summary.Collector(config, leases.block_entries), "gpushare-summary")


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if session.is_worker(config):
        return None
    from pytest_gpushare import summary

    return summary.report_header(config)
