"""Tests that run next to a model server held by `gpushare run` (see hold-for-server.sh)."""

import time

import pytest


@pytest.mark.parametrize("prompt", range(6))
@pytest.mark.gpu(mem="2GiB")
def test_generate(gpu, prompt):
    time.sleep(0.1)  # the work this test would do on gpu.device
