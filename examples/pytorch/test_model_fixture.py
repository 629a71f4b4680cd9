"""A model loaded once per module and kept on the GPU under a lease.

The module-scoped fixture holds the model's memory with ``pytest_gpushare.lease()`` for as
long as the module's tests use it; each test declares only what it adds on top (activations).
Run the module's tests on one worker so the model loads once per run, not once per worker:
``pytest -n auto --dist loadscope examples/pytorch``. Where no GPU can serve the lease, it follows
``--gpushare-fallback`` as the tests' markers do: skipped, on the CPU, or failed with one line.
"""

import pytest

import pytest_gpushare

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model():
    # 384 MiB of weights, rounded up to 512 MiB for the allocator's overhead.
    with pytest_gpushare.lease(mem="512MiB", name="examples/pytorch model") as gpu:
        layers = [torch.nn.Linear(2048, 2048) for _ in range(24)]  # 24 x 16 MiB of float32
        net = torch.nn.Sequential(*layers).to(gpu.device).eval()
        yield net
        del net, layers
        if gpu.device.startswith("cuda"):
            torch.cuda.empty_cache()  # give the memory back before the lease ends


@pytest.mark.gpu(mem="256MiB")
def test_forward(model):
    # This test's lease covers its activations; the weights are the fixture's lease.
    device = next(model.parameters()).device
    x = torch.randn(64, 2048, device=device)
    with torch.no_grad():
        assert model(x).shape == (64, 2048)


@pytest.mark.gpu(mem="256MiB")
def test_deterministic(model):
    device = next(model.parameters()).device
    x = torch.randn(8, 2048, device=device)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
