import time

import pytest


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.gpu(mem="3GiB")
def test_metrics(gpu, split):
    time.sleep(0.2)


@pytest.mark.gpu(mem="1GiB")
def test_export(gpu):
    time.sleep(0.05)


def test_tokenizer():
    assert "a b".split() == ["a", "b"]
