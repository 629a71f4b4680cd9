"""A stand-in for a model test suite: each test holds its declared memory while it "runs".

Run it with `pytest -n auto`: the worker count comes from usable VRAM, and no moment of the
run has more leased on the GPU than is usable there (see the summary's peak line).
"""

import time

import pytest

SIZES = ["512MiB", "1GiB", "2GiB", "3GiB", "4GiB", "6GiB"]


@pytest.mark.gpu(mem="2GiB")
def test_small_model(gpu):
    assert gpu.mem == 2 * 2**30
    time.sleep(0.2)  # the work this test would do on gpu.device


@pytest.mark.parametrize("size", [pytest.param(s, marks=pytest.mark.gpu(mem=s)) for s in SIZES])
def test_sizes(gpu, size):
    # A marker per parameter: each size leases what it says.
    assert gpu.mem > 0
    time.sleep(0.1)


@pytest.mark.parametrize("i", range(6))
@pytest.mark.gpu(mem="4GiB")
def test_medium_models(gpu, i):
    assert gpu.mem == 4 * 2**30
    time.sleep(0.3)


@pytest.mark.gpu(mem="7GiB")
def test_large_model(gpu):
    time.sleep(0.3)


def test_cpu_only():
    assert sum(range(10)) == 45
