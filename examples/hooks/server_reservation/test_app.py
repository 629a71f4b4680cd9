import pytest


@pytest.mark.parametrize("case", range(3))
@pytest.mark.gpu(mem="2GiB")
def test_app(gpu, case):
    assert gpu.mem == 2 * 2**30
