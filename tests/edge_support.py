"""Helpers of the pytest edge's acceptance tests (real pytest subprocesses with the plugin).

- :func:`isolate`: the environment of a test session: its own ledger folder, Ollama off, and none
  of the outer run's ``GPUSHARE_*``, ``CUDA_*`` or xdist worker variables;
- :func:`run`: ``pytester.runpytest_subprocess`` without the cache provider;
- :func:`set_setting`: one setting given by its flag, its environment variable or its ini key;
- :func:`stranger`: another process that holds GPU memory through the ledger (a ``gpushare run``
  stand-in) while the block runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Environment variables of the outer run that must not leak into a test session.
OUTER_PREFIXES = ("GPUSHARE_", "CUDA_", "PYTEST_XDIST_")


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [k for k in os.environ if k.startswith(OUTER_PREFIXES)]:
        monkeypatch.delenv(key)
    for key in ("TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_PREALLOCATE", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


def set_setting(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, key: str, value: str
) -> list[str]:
    """Set ``gpushare_<key>`` to ``value`` by ``how`` (``flag``, ``env`` or ``ini``, which writes
    tox.ini); the command line arguments that takes."""
    name = f"gpushare_{key}"
    if how == "flag":
        return [f"--{name.replace('_', '-')}={value}"]
    if how == "env":
        monkeypatch.setenv(name.upper(), value)
    else:
        pytester.makeini(f"[pytest]\n{name} = {value}\n")
    return []


STRANGER = """
import os, sys
from pytest_gpushare.gpus import SimulatedProbe
from pytest_gpushare.ledger import Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.units import GiB, MemRequest
g = SimulatedProbe(sys.argv[1]).probe().gpus[0]
usable = g.total_bytes - GiB
gpu = LedgerGpu(g.uuid, 0, g.name, g.total_bytes, usable, usable)
ledger = Ledger(os.environ["GPUSHARE_LEDGER_DIR"], [gpu], Owner.current("stranger", "main"), context_bytes=0)
ledger.acquire(Need(MemRequest(int(sys.argv[2]))), sys.argv[3], 5)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def stranger(spec: str, n_bytes: int, test_id: str) -> Iterator[subprocess.Popen[str]]:
    """A process that holds ``n_bytes`` on the simulated GPU ``spec`` (1GiB safety, as a session
    with the defaults computes it) as ``test_id`` until its stdin closes or the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", STRANGER, spec, str(n_bytes), test_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
