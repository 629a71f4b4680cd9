"""The session's broker at the pytest edge: the xdist controller runs it, its workers lease
through it (SPEC "Within one session").

When the controller configures its first worker on this box, where GPU work has begun on a box
with GPUs (xdist pins workers then; a run without GPUs gets nothing), it opens the broker's
listening socket only (no ledger is touched) and puts its address in every such worker's
``workerinput`` (:func:`pytest_gpushare.session.broker_input`). A worker connects at its first
lease, so the broker itself starts when the first worker connects: a run with no GPU tests starts
none. Workers lease through a :class:`~pytest_gpushare.broker.BrokerClient`; single-process
runs, workers on other hosts and ``gpushare run`` lease from the box ledger directly. Where no
socket can be made, one line says so and the workers lease from the box ledger as before.

:class:`SessionBroker` holds the broker and its hooks: ``-x``/``--maxfail`` (the controller's
session sets ``shouldfail`` when it counts the failure) and Ctrl-C cancel every waiting request;
the broker is closed at ``pytest_unconfigure``, after xdist has taken its workers down (its
``pytest_sessionfinish``): closing gives back everything the session still holds.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpushare import ledger as ledgers  # the facade: its modules load on first use
from pytest_gpushare.credits import nvml_refresh
from pytest_gpushare.errors import LedgerError
from pytest_gpushare.session import get_plan, get_settings, gpu_work_begun, ledger_folder_checked, session_id
from pytest_gpushare.threads import daemon_thread

if TYPE_CHECKING:
    from pytest_gpushare.broker import Broker, BrokerInput, Listener
    from pytest_gpushare.ledger import Ledger, Owner

__all__ = ["PLUGIN_NAME", "SessionBroker", "broker_for_workers"]

PLUGIN_NAME = "gpushare-broker"
_KEY = pytest.StashKey["SessionBroker | None"]()


def broker_for_workers(config: pytest.Config) -> BrokerInput | None:
    """How this session's workers on this box reach its broker (its socket opened on the first
    call); None where the session runs none (no GPU work, no GPU, or no socket)."""
    if _KEY not in config.stash:
        config.stash[_KEY] = _listen(config)
    found = config.stash[_KEY]
    return None if found is None else found.worker_input


def _listen(config: pytest.Config) -> SessionBroker | None:
    if not gpu_work_begun(config) or not get_plan(config).gpus:
        return None
    from pytest_gpushare.broker import Listener  # only sessions that may run one pay for the import

    try:
        listener = Listener.open()
    except OSError as exc:
        _say(config, f"gpushare: the session broker cannot listen ({exc}); workers lease from the ledger")
        return None
    hooks = SessionBroker(config, listener)
    config.pluginmanager.register(hooks, PLUGIN_NAME)
    return hooks


def _start(config: pytest.Config, listener: Listener, log: list[str]) -> Broker:
    """The broker on ``listener``, its owners opened in the session's ledger folder."""
    from pytest_gpushare.broker import Broker

    plan = get_plan(config)
    s = get_settings(config)
    folder = ledger_folder_checked(config)
    opened: weakref.WeakSet[Ledger] = weakref.WeakSet()
    probe = nvml_refresh(plan, s.ledger_dir)

    def refresh() -> Mapping[str, int]:
        """Fresh usable memory for every owner the broker holds, not only the one that waits:
        the ledger's limit is the lowest of its live owners', so one stale owner would cap it."""
        assert probe is not None
        fresh = probe()
        for ledger in list(opened):
            # A closed ledger refuses (LedgerError); the one that waits records it itself.
            with contextlib.suppress(LedgerError, OSError):
                ledger.set_usable(fresh)
                ledger.snapshot()  # an access: its owner's record shows the fresh figure now
        return fresh

    def open_ledger(owner: Owner, context_bytes: int) -> Ledger:
        ledger = ledgers.Ledger(
            folder,
            ledgers.ledger_gpus(plan),
            owner,
            context_bytes=context_bytes,
            policy=s.policy,
            log=log.append,
            refresh=None if probe is None else refresh,
        )
        opened.add(ledger)
        return ledger

    return Broker(
        open_ledger,
        session_id=session_id(config),
        context_bytes=s.context_mem_bytes,
        policy=s.policy,
        listener=listener,
        log=log.append,
    )


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


class SessionBroker:
    """The controller's broker: its socket from the start, the broker itself from the first
    worker's connection (a thread waits for it), and the hooks that cancel waits and close it."""

    def __init__(self, config: pytest.Config, listener: Listener) -> None:
        from pytest_gpushare.broker.protocol import VERSION, BrokerInput

        self.config = config
        self.listener = listener
        self.worker_input = BrokerInput(
            version=VERSION, address=listener.address, token=listener.token, session_id=session_id(config)
        )
        self.log: list[str] = []
        self.broker: Broker | None = None
        self.cancelled = False
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = daemon_thread(self._start_on_first_worker, "gpushare-broker-start")
        self._thread.start()

    def _start_on_first_worker(self) -> None:
        """Wait until a worker connects (its connection waits in the backlog), then start the
        broker on the socket; a controller that stops first starts none."""
        ready, _, _ = select.select([self.listener.sock.fileno(), self._stop_r], [], [])
        with self._lock:
            if self._stop_r in ready:
                return
            try:
                self.broker = _start(self.config, self.listener, self.log)
            except (LedgerError, OSError, pytest.UsageError) as exc:
                # The workers' connections are refused from now on: their tests say so, one line each.
                self.log.append(f"gpushare: the session broker did not start: {exc}")
                self.listener.close()
                return
            if self.cancelled:
                self.broker.cancel()

    def cancel(self) -> None:
        """Answer every waiting request "cancelled", now and from now on (once)."""
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            broker = self.broker
        if broker is not None:
            broker.cancel()

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """After the session counted the report: ``-x``/``--maxfail`` reached stops the run, and
        no worker may go on waiting for memory (trylast: pytest's session counts first)."""
        session: Any = self.config.pluginmanager.get_plugin("session")
        if session is not None and (session.shouldfail or session.shouldstop):
            self.cancel()

    def pytest_keyboard_interrupt(self, excinfo: object) -> None:
        self.cancel()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """What the broker had to say (a ledger that refused, a failed thread), once each."""
        for line in dict.fromkeys(self.log):
            terminalreporter.write_line(line if line.startswith("gpushare") else f"gpushare: {line}")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self) -> None:
        """After xdist took its workers down: close the broker (everything the session holds goes
        back to the box), or the socket where none started."""
        os.write(self._stop_w, b"\0")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.broker is not None:
            self.broker.close()
        else:
            self.listener.close()
