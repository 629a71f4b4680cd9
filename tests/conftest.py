"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fake_pynvml import FakeNvml, install_fake_pynvml

if TYPE_CHECKING:
    from cli_support import CliBox


def wait_until(
    condition: Callable[[], object],
    what: str = "the condition",
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen[Any] | None = None,
    poll: float = 0.005,
) -> None:
    """Wait for ``condition()`` to be true, failing the test after ``timeout`` seconds.

    The one waiting helper of the suite: tests wait on conditions with deadlines, never on bare
    sleeps. With ``proc``, a process that ends first fails the test at once with its output.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"waiting for {what}: the process ended with {proc.returncode}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout}s for {what}")
        time.sleep(poll)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNvml]:
    """Install the fake ``pynvml`` module: ``fake_nvml(gpus, **config)`` (see tests/fake_pynvml.py)."""

    def install(gpus: Any = None, **config: Any) -> FakeNvml:
        return install_fake_pynvml(monkeypatch, gpus, **config)

    return install


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CliBox]:
    """A ledger folder and a simulated box for the ``gpushare`` commands (tests/cli_support.py)."""
    from cli_support import CliBox  # it imports wait_until from here

    box = CliBox(tmp_path)
    yield box
    box.cleanup()
