"""A stand-in for a suite that outgrew one GPU box: each test holds its memory while it "runs"."""

import time

import pytest


@pytest.mark.parametrize("epochs", [1, 2, 4])
@pytest.mark.gpu(mem="4GiB")
def test_train(gpu, epochs):
    time.sleep(0.1 * epochs)  # the training this test would do on gpu.device


@pytest.mark.gpu(mem="2GiB")
def test_checkpoint(gpu):
    time.sleep(0.1)


def test_schedule():
    assert [0.1 * 2**i for i in range(3)][-1] == 0.4
