"""Shared fixtures of the test suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fake_pynvml import FakeNvml, install_fake_pynvml


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNvml]:
    """Install the fake ``pynvml`` module: ``fake_nvml(gpus, **config)`` (see tests/fake_pynvml.py)."""

    def install(gpus: Any = None, **config: Any) -> FakeNvml:
        return install_fake_pynvml(monkeypatch, gpus, **config)

    return install
