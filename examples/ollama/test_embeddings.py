"""GPU tests that share their box with an Ollama server.

Run from this folder so pytest finds pytest.ini: ``pytest -n auto``. Without a GPU:
``pytest -n auto --gpushare-simulate=24GiB:used=2GiB``.
"""

import pytest


@pytest.mark.parametrize("batch", [8, 16, 32, 64])
@pytest.mark.gpu(mem="2GiB")
def test_embed_batch(gpu, batch):
    # The embedding model's tensors go to gpu.device ("cuda:N", or "cpu" when simulated).
    assert gpu.mem == 2 * 2**30


@pytest.mark.gpu(mem="6GiB")
def test_rerank(gpu):
    assert gpu.mem == 6 * 2**30
