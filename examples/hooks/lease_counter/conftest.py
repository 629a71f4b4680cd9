"""Count GPU leases and the time they were held, per test module, across all xdist workers.

The lease hooks are called in the process that holds the lease: an xdist worker, or the single
pytest process. Each worker sends its counts to the controller at the end, which prints them.
"""

from collections import Counter

import pytest


class LeaseCounter:
    def __init__(self, config):
        self.config = config
        self.leases = Counter()
        self.held = Counter()

    def pytest_gpushare_lease_acquired(self, gpus, test_id, waited):
        pass  # e.g. export a "leased bytes" gauge: sum(g.mem for g in gpus)

    def pytest_gpushare_lease_released(self, gpus, test_id, held):
        module = test_id.split("::")[0]
        self.leases[module] += 1
        self.held[module] += held

    def pytest_sessionfinish(self, session):
        if hasattr(self.config, "workerinput"):  # an xdist worker: hand the counts over
            self.config.workeroutput["lease_counts"] = {
                module: [self.leases[module], self.held[module]] for module in self.leases
            }

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        for module, (count, held) in getattr(node, "workeroutput", {}).get("lease_counts", {}).items():
            self.leases[module] += count
            self.held[module] += held

    def pytest_terminal_summary(self, terminalreporter):
        if hasattr(self.config, "workerinput") or not self.leases:
            return
        terminalreporter.write_sep("-", "GPU leases per module")
        for module in sorted(self.leases):
            terminalreporter.write_line(
                f"{module}: {self.leases[module]} lease(s), held {self.held[module]:.1f}s"
            )


def pytest_configure(config):
    config.pluginmanager.register(LeaseCounter(config), "lease-counter")
