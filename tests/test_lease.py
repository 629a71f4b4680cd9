"""``pytest_gpushare.lease()``: its fallback, its one-device form, and threads that lease at once.

Real pytest subprocesses, as a fixture in a user's suite would call it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from edge_support import isolate, run

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate(monkeypatch, tmp_path)


MODEL_SUITE = """
import pytest
import pytest_gpushare

@pytest.fixture(scope="module")
def model():
    with pytest_gpushare.lease(mem="2GiB", name="the model") as gpu:
        yield gpu

def test_first(model):
    assert model.device == "cpu" and model.is_cpu and model[0] is list(model)[0]

def test_second(model):
    (only,) = model
    assert only.is_cpu and len(model) == 1
"""


@pytest.mark.parametrize(
    ("mode", "outcome", "line"),
    [
        ("skip", {"skipped": 2}, "SKIPPED [[]1[]] *: gpushare: no GPU (*) (--gpushare-fallback=skip)"),
        ("cpu", {"passed": 2}, "  the model [[]lease()[]] (cpu)"),
        ("fail", {"errors": 2}, "gpushare: no GPU (*) (--gpushare-fallback=fail)"),
    ],
)
def test_lease_follows_the_fallback_without_a_gpu(
    pytester: pytest.Pytester, mode: str, outcome: dict[str, int], line: str
) -> None:
    pytester.makepyfile(test_model=MODEL_SUITE)
    result = run(pytester, "--gpushare-simulate=none", f"--gpushare-fallback={mode}", "-rs")
    result.assert_outcomes(**outcome)
    result.stdout.fnmatch_lines([line])
    assert "NeverFits" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_a_lease_no_gpu_could_ever_serve_follows_the_fallback(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_model=MODEL_SUITE.replace('mem="2GiB"', 'mem="30GiB"'))
    result = run(pytester, "--gpushare-simulate=8GiB", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *: gpushare: the model [[]lease()[]] needs 30.0GiB*"])
    result = run(pytester, "--gpushare-simulate=8GiB", "--gpushare-fallback=cpu")
    result.assert_outcomes(passed=2)


def test_one_device_form_and_the_list_form(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import pytest_gpushare

        def test_one():
            with pytest_gpushare.lease(mem="2GiB") as gpu:
                assert gpu.mem == 2 * 2**30 and gpu.simulated and gpu.device == "cpu"
                assert gpu.index == 0 and gpu.uuid.startswith("GPU-") and gpu.total == 24 * 2**30
                assert gpu[0].mem == gpu.mem and len(gpu) == 1 and [g.uuid for g in gpu] == [gpu.uuid]
                assert gpu == [gpu[0]]

        def test_two():
            with pytest_gpushare.lease(mem="1GiB", count=2) as gpus:
                assert len({g.uuid for g in gpus}) == 2
                assert gpus.uuid == gpus[0].uuid and gpus[1:] == [gpus[1]]
        """
    )
    result = run(pytester, "--gpushare-simulate=2x24GiB")
    result.assert_outcomes(passed=2)


def test_threads_that_lease_at_once_share_one_owner(pytester: pytest.Pytester) -> None:
    # issue 15 #1: each thread's first lease() made its own ledger owner, and releases failed.
    pytester.makepyfile(
        """
        import os, threading
        import pytest_gpushare
        from pytest_gpushare.ledger import read_status

        def test_threads():
            start = threading.Barrier(4)
            held = threading.Barrier(4)
            errors = []

            def work():
                try:
                    start.wait()
                    with pytest_gpushare.lease(mem="5GiB", name=threading.current_thread().name):
                        held.wait()
                except Exception as exc:
                    errors.append(repr(exc))

            threads = [threading.Thread(target=work, name=f"t{i}") for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == []
            status = read_status(os.environ["GPUSHARE_LEDGER_DIR"])
            (gpu,) = status["gpus"]
            assert [lease for lease in gpu["leases"] if lease["kind"] == "test"] == []
            assert len({o["key"] for o in gpu["owners"] if o["pid"] == os.getpid()}) == 1
        """
    )
    result = run(pytester, "--gpushare-simulate=24GiB")
    result.assert_outcomes(passed=1)


# A stand-in for the parts of torch that examples/pytorch/test_model_fixture.py touches.
TORCH_STUB = """
import contextlib

class Tensor:
    def __init__(self, shape, device="cpu"):
        self.shape = tuple(shape)
        self.device = device

def randn(*shape, device="cpu"):
    return Tensor(shape, device)

def equal(a, b):
    return a.shape == b.shape

def no_grad():
    return contextlib.nullcontext()

class _Cuda:
    def empty_cache(self):
        raise AssertionError("no CUDA here")

cuda = _Cuda()

class _Linear:
    def __init__(self, n_in, n_out):
        self.weight = Tensor((n_out, n_in))

class _Sequential:
    def __init__(self, *layers):
        self.layers = layers

    def to(self, device):
        for layer in self.layers:
            layer.weight.device = device
        return self

    def eval(self):
        return self

    def parameters(self):
        return iter([layer.weight for layer in self.layers])

    def __call__(self, x):
        return Tensor((x.shape[0], self.layers[-1].weight.shape[0]), x.device)

class nn:
    Linear = _Linear
    Sequential = _Sequential
"""


@pytest.mark.parametrize(
    ("mode", "outcome"), [("skip", {"skipped": 2}), ("cpu", {"passed": 2}), ("fail", {"errors": 2})]
)
def test_the_shipped_model_fixture_on_a_box_without_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str, outcome: dict[str, int]
) -> None:
    stub = pytester.mkdir("stub")
    (stub / "torch.py").write_text(TORCH_STUB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]))
    example = (ROOT / "examples" / "pytorch" / "test_model_fixture.py").read_text()
    pytester.makepyfile(test_model_fixture=example)
    result = run(pytester, "--gpushare-simulate=none", f"--gpushare-fallback={mode}")
    result.assert_outcomes(**outcome)
    assert "NeverFits" not in result.stdout.str() and "Traceback" not in result.stdout.str()
