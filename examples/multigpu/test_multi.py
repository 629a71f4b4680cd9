"""A test that needs two GPUs, and tests that may run on any GPU.

On a box with two GPUs: ``pytest -n auto examples/multigpu``. Without them:
``pytest -n 2 examples/multigpu --gpushare-simulate=2x24GiB``.
"""

import pytest


@pytest.mark.gpu(mem="10GiB", count=2)
def test_pipeline_parallel(gpus):
    # Two distinct GPUs, each with 10 GiB leased; gpus[0] is the worker's home GPU when it can
    # serve. Stage one goes to gpus[0].device, stage two to gpus[1].device.
    assert len(gpus) == 2
    assert gpus[0].uuid != gpus[1].uuid
    assert all(g.mem == 10 * 2**30 for g in gpus)


@pytest.mark.parametrize("shard", range(4))
@pytest.mark.gpu(mem="6GiB")
def test_shard(gpu, shard):
    # Taking the gpu fixture lets the plugin place this test on another GPU when the worker's
    # home GPU is full; gpu.device says where.
    assert gpu.mem == 6 * 2**30


@pytest.mark.gpu(exclusive=True)
def test_whole_gpu(gpu):
    # Waits until no other test holds memory on its GPU, then holds all of it that is usable.
    assert gpu.mem > 20 * 2**30
