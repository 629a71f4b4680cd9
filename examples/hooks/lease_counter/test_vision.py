import time

import pytest


@pytest.mark.parametrize("image", range(3))
@pytest.mark.gpu(mem="2GiB")
def test_classify(gpu, image):
    time.sleep(0.05)
