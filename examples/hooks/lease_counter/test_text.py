import time

import pytest


@pytest.mark.gpu(mem="4GiB")
def test_summarize(gpu):
    time.sleep(0.05)


def test_tokenize():
    assert "a b".split() == ["a", "b"]
