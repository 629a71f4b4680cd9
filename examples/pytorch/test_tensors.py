"""Tests that allocate real tensors on the device their lease names.

On a real GPU, `gpu.device` is "cuda:N" for this worker; on CPU fallback and on simulated GPUs
it is "cpu", so the same tests run anywhere PyTorch is installed.
"""

import pytest

torch = pytest.importorskip("torch")

MiB = 2**20


@pytest.mark.gpu(mem="1GiB")
def test_matmul(gpu):
    x = torch.randn(1024, 1024, device=gpu.device)
    y = x @ x
    assert y.shape == (1024, 1024)


@pytest.mark.gpu(mem="2GiB")
def test_allocates_within_lease(gpu):
    n = (512 * MiB) // 4  # 512 MiB of float32, well inside the 2 GiB lease
    t = torch.ones(n, device=gpu.device)
    assert t.sum().item() == n
