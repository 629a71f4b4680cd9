"""SPEC "Coexisting with suites that never asked": real pytest subprocesses, with and without the plugin.

Suites that never asked for pytest-gpushare (copies of the patterns of zarr and datashader, which
register their own ``gpu`` marker) must end exactly as they do with ``-p no:gpushare`` on a box
without a GPU; a run with no GPU test does no GPU work; without a GPU the plugin sets no
environment variable in any process.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from edge_support import isolate, run
from ollama_server import FakeOllama

from pytest_gpushare.workers import DRIVER_GPUS, order_devices

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
GPU_VARS = ("CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "GPUSHARE_HOME_GPU")  # fmt: skip


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "2")


def outcomes(pytester: pytest.Pytester, *args: str) -> tuple[int, dict[str, str]]:
    """The exit code of a run and each test's outcome, from its JUnit XML."""
    xml = pytester.path / "junit.xml"
    result = run(pytester, f"--junitxml={xml}", *args)
    found = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return result.ret, found


def assert_same_with_and_without(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    without = outcomes(pytester, "-p", "no:gpushare", *args)
    with_plugin = outcomes(pytester, *args)
    assert without[1], "the suite ran no test"
    assert with_plugin == without
    return with_plugin[1]


# --- suites with their own gpu marker ----------------------------------------------------------

ZARR_PYPROJECT = """
[tool.pytest.ini_options]
addopts = "--strict-markers --strict-config -W error -ra"
markers = [
    "gpu: mark a test as requiring CuPy and GPU",
]
"""

ZARR_TESTS = """
import importlib.util
import pytest

def has_cupy():
    return importlib.util.find_spec("cupy") is not None

def gpu_test(func):
    return pytest.mark.gpu(pytest.mark.skipif(not has_cupy(), reason="CuPy not installed")(func))

@pytest.mark.gpu
def test_gpu_buffer_prototype_on_cpu():
    assert bytes(bytearray(b"abc")) == b"abc"

@gpu_test
def test_cupy_roundtrip():
    import cupy
    assert cupy.arange(3).sum() == 3

def test_plain():
    assert True
"""


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A box without a GPU, wherever the tests run (the environment: the suites' own ini files
    must not name a gpushare setting, or ``-p no:gpushare --strict-config`` would refuse them)."""
    monkeypatch.setenv("GPUSHARE_SIMULATE", "none")


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("args", [(), ("-n", "2")])
def test_zarr_like_suite_means_the_same(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    pytester.makefile(".toml", pyproject=ZARR_PYPROJECT)
    pytester.makepyfile(test_buffers=ZARR_TESTS)
    found = assert_same_with_and_without(pytester, *args)
    assert found["test_buffers::test_gpu_buffer_prototype_on_cpu"] == "passed"
    assert found["test_buffers::test_cupy_roundtrip"] == "skipped"  # its own skipif


DATASHADER_CONFTEST = """
import pytest

CUSTOM_MARKS = {"benchmark", "gpu"}

def pytest_addoption(parser):
    for marker in sorted(CUSTOM_MARKS):
        parser.addoption(f"--{marker}", action="store_true", default=False, help=f"Run {marker} tests")

def pytest_configure(config):
    for marker in sorted(CUSTOM_MARKS):
        config.addinivalue_line("markers", f"{marker}: {marker} test marker")

def pytest_collection_modifyitems(config, items):
    skipped, selected = [], []
    markers = {m for m in CUSTOM_MARKS if config.getoption(f"--{m}")}
    for item in items:
        item_marks = set(item.keywords) & CUSTOM_MARKS
        if (not markers and not item_marks) or (markers and item_marks == markers):
            selected.append(item)
        else:
            skipped.append(item)
    config.hook.pytest_deselected(items=skipped)
    items[:] = selected

@pytest.fixture
def cudf_frame():
    import cudf  # errors where CUDA is missing
    return cudf.DataFrame({"x": [1, 2]})
"""

DATASHADER_TESTS = """
import pytest

@pytest.mark.gpu
def test_cupy_canvas():
    import cupy
    assert cupy.zeros(3).sum() == 0

@pytest.mark.gpu
def test_cudf_points(cudf_frame):
    assert len(cudf_frame) == 2

def test_cpu_canvas():
    assert sum([1, 2]) == 3
"""


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("args", [("--gpu",), ("--gpu", "-n", "2"), ()])
def test_datashader_like_suite_fails_as_it_did(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    pytester.makeconftest(DATASHADER_CONFTEST)
    pytester.makepyfile(test_canvas=DATASHADER_TESTS)
    found = assert_same_with_and_without(pytester, *args)
    if "--gpu" in args:
        # A GPU job on a box that lost its GPU must stay red, not turn into skips.
        assert found == {
            "test_canvas::test_cupy_canvas": "failure",
            "test_canvas::test_cudf_points": "error",
        }
    else:
        assert found == {"test_canvas::test_cpu_canvas": "passed"}


def test_own_marker_is_said_in_one_header_line(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=ZARR_PYPROJECT)
    pytester.makepyfile(test_buffers=ZARR_TESTS)
    result = run(pytester, "--gpushare-simulate=none")
    assert _gpushare_lines(result) == [
        "gpushare: this suite registers its own gpu marker: bare @pytest.mark.gpu tests are leased the "
        "default memory where a GPU can serve them, never skipped, failed or moved to the CPU "
        "(gpushare_adopt_marker = true makes them gpushare's)"
    ]


def test_adopted_marker_is_fully_ours(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=ZARR_PYPROJECT + "gpushare_adopt_marker = true\n")
    pytester.makepyfile(test_buffers=ZARR_TESTS)
    ret, found = outcomes(pytester, "--gpushare-simulate=none")
    assert ret == 0
    assert found["test_buffers::test_gpu_buffer_prototype_on_cpu"] == "skipped"  # the fallback


def test_own_marker_tests_are_leased_where_a_gpu_can_serve_them(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=ZARR_PYPROJECT)
    pytester.makepyfile(
        test_buffers="""
        import pytest

        @pytest.mark.gpu
        def test_leased():
            pass

        @pytest.mark.gpu(mem="30GiB")
        def test_ours_never_fits():
            pass
        """
    )
    result = run(
        pytester, "--gpushare-simulate=24GiB", "--gpushare-default-mem=2GiB", "--gpushare-report=report.json"
    )
    result.assert_outcomes(passed=1, skipped=1)  # a marker with arguments is ours: it falls back
    leases = json.loads((pytester.path / "report.json").read_text())["leases"]
    assert [(x["test_id"], x["gpus"][0]["bytes"]) for x in leases] == [
        ("test_buffers.py::test_leased", 2**31)
    ]
    # where the default memory can never fit, the suite's test still runs, without a lease
    result = run(pytester, "--gpushare-simulate=24GiB", "--gpushare-default-mem=40GiB", "-k", "leased")
    result.assert_outcomes(passed=1)


# --- a suite's own gpu / gpus fixture ---------------------------------------------------------


def test_a_suites_own_fixtures_win_and_make_no_gpu_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def gpu():
            return "cuda:0"

        def pytest_generate_tests(metafunc):
            if "gpus" in metafunc.fixturenames:
                metafunc.parametrize("gpus", [["cuda:0", "cuda:1"]])
        """
    )
    pytester.makepyfile(
        test_own="""
        def test_own_gpu(gpu):
            assert gpu == "cuda:0"

        def test_own_gpus(gpus):
            assert gpus == ["cuda:0", "cuda:1"]
        """
    )
    for box in ("--gpushare-simulate=none", "--gpushare-simulate=24GiB"):
        result = run(pytester, box, "--gpushare-report=r.json")
        result.assert_outcomes(passed=2)
        assert json.loads((pytester.path / "r.json").read_text())["leases"] == []


def test_the_plugins_fixture_makes_a_gpu_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_mine(gpu):\n    assert gpu.is_cpu\n")
    result = run(pytester, "--gpushare-simulate=none", "-rs")
    result.assert_outcomes(skipped=1)


# --- no GPU work for a run that never asked -----------------------------------------------------

FAKE_BOX_CONFTEST = f"""
import atexit, json, os, sys
sys.path.insert(0, {str(TESTS)!r})
from fake_pynvml import FakeGpu, FakeNvml

GiB = 2**30
gpus = [FakeGpu(uuid="GPU-{"a" * 8}-0000-0000-0000-000000000000", total=24 * GiB, bus_id="00000000:01:00.0")]
box = FakeNvml(gpus=gpus if os.environ.get("BOX_GPUS") == "1" else [])
sys.modules["pynvml"] = box.module

@atexit.register
def _count():
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["COUNTS"], name + ".json"), "w") as f:
        json.dump({{"nvml_init": box.init_calls}}, f)
"""

CPU_SUITE = f"""
import json, os

def test_env():
    seen = {{k: os.environ.get(k) for k in {GPU_VARS!r}}}
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["COUNTS"], "env-" + name + ".json"), "w") as f:
        json.dump(seen, f)

def test_other():
    pass
"""


@pytest.fixture
def fake_box(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    counts = tmp_path / "counts"
    counts.mkdir()
    monkeypatch.setenv("COUNTS", str(counts))
    monkeypatch.delenv("GPUSHARE_OLLAMA")  # auto: OLLAMA_HOST, the stand-in that counts requests
    pytester.makeconftest(FAKE_BOX_CONFTEST)
    pytester.makepyfile(test_cpu=CPU_SUITE)
    return counts


def _gpushare_lines(result: pytest.RunResult) -> list[str]:
    """What the plugin printed (pytest's own "plugins:" line names every plugin)."""
    return [x for x in result.stdout.lines if "gpushare" in x.lower() and not x.startswith("plugins:")]


def _driver_lists_several_gpus() -> bool:
    """Whether this box's NVIDIA driver lists more than one GPU: then, and only then, the plugin
    sets CUDA_DEVICE_ORDER before the conftests, whatever the run."""
    try:
        return sum(1 for _ in DRIVER_GPUS.iterdir()) > 1
    except OSError:
        return False


def _no_gpu_vars() -> dict[str, str | None]:
    expected: dict[str, str | None] = dict.fromkeys(GPU_VARS)
    if _driver_lists_several_gpus():
        expected["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return expected


@pytest.mark.parametrize(
    ("box_gpus", "args"),
    [("1", ()), ("0", ()), ("0", ("-n", "2"))],
    ids=["gpu-box", "no-gpu", "no-gpu-n2"],
)
def test_a_run_without_gpu_tests_does_no_gpu_work(
    pytester: pytest.Pytester,
    fake_box: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    box_gpus: str,
    args: tuple[str, ...],
) -> None:
    monkeypatch.setenv("BOX_GPUS", box_gpus)
    with FakeOllama([]) as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        result = run(pytester, *args)
    result.assert_outcomes(passed=2)
    assert ollama.connections == 0
    assert not (tmp_path / "ledger").exists()
    assert "- gpushare -" not in result.stdout.str()
    assert len(_gpushare_lines(result)) <= 1, result.stdout.str()
    if not args:  # NVML is never started when nothing needs it
        assert json.loads((fake_box / "main.json").read_text()) == {"nvml_init": 0}
    envs = list(fake_box.glob("env-*.json"))
    assert envs
    for env in envs:  # no variable set in any process
        assert json.loads(env.read_text()) == _no_gpu_vars(), env.name


def test_collect_only_plans_nothing(
    pytester: pytest.Pytester, fake_box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOX_GPUS", "1")
    pytester.makepyfile(test_gpu="import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_on_gpu(gpu): pass\n")
    result = run(pytester, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_gpu.py::test_on_gpu"])
    assert json.loads((fake_box / "main.json").read_text()) == {"nvml_init": 0}
    assert _gpushare_lines(result) == []


def test_gpu_tests_bring_the_analysis_after_collection(
    pytester: pytest.Pytester, fake_box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOX_GPUS", "1")
    pytester.makepyfile(
        test_gpu="""
        import json, os, pytest

        @pytest.mark.gpu(mem="1GiB")
        def test_on_gpu(gpu):
            assert gpu.device == "cuda:0"
            with open(os.path.join(os.environ["COUNTS"], "framework.json"), "w") as f:
                json.dump({k: os.environ.get(k) for k in ("TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_PREALLOCATE")}, f)
        """
    )
    with FakeOllama([]) as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        result = run(pytester)
    result.assert_outcomes(passed=3)
    assert ollama.connections == 1
    result.stdout.fnmatch_lines(
        [
            "collected 3 items",
            "gpushare: VRAM analysis (source: NVML*",
            "  set TF_FORCE_GPU_ALLOW_GROWTH=true, XLA_PYTHON_CLIENT_PREALLOCATE=false",
            "*- gpushare -*",
            "GPU 0 *: peak leased 1.0GiB of *, 1 lease(s)",
        ]
    )
    assert json.loads((fake_box / "framework.json").read_text()) == {
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }


def test_workers_on_a_gpu_box_are_pinned_and_the_header_says_so(
    pytester: pytest.Pytester, fake_box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # -n N on a box with GPUs: the workers' CUDA_VISIBLE_DEVICES must be set before they start,
    # so the controller plans (once: NVML, Ollama) although no GPU test is known yet.
    monkeypatch.setenv("BOX_GPUS", "1")
    with FakeOllama([]) as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=2)
    assert ollama.connections == 1
    result.stdout.fnmatch_lines(
        [
            "gpushare: workers pinned by CUDA_VISIBLE_DEVICES, home GPU first as cuda:0: gw0 GPU 0 only; gw1 GPU 0 only",
            "gpushare: set in each worker: CUDA_DEVICE_ORDER=PCI_BUS_ID, TF_FORCE_GPU_ALLOW_GROWTH=true, "
            "XLA_PYTHON_CLIENT_PREALLOCATE=false",
        ]
    )
    assert "- gpushare -" not in result.stdout.str()
    assert json.loads((fake_box / "main.json").read_text()) == {"nvml_init": 1}


# --- CUDA_DEVICE_ORDER before the conftests ----------------------------------------------------


@pytest.mark.parametrize(("listed", "expected"), [(0, None), (1, None), (2, "PCI_BUS_ID")])
def test_device_order_is_set_only_where_the_driver_lists_several_gpus(
    pytester: pytest.Pytester,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    listed: int,
    expected: str | None,
) -> None:
    driver = tmp_path / "driver-gpus"
    driver.mkdir()
    for i in range(listed):
        (driver / f"0000:0{i + 1}:00.0").mkdir()
    config = pytester.parseconfig()
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    order_devices(config, driver)
    assert os.environ.get("CUDA_DEVICE_ORDER") == expected
    order_devices(config, tmp_path / "no-driver")  # no folder: no driver, nothing to order
    assert os.environ.get("CUDA_DEVICE_ORDER") == expected
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    order_devices(config, driver)  # the user's choice stays
    assert os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_this_box_gets_no_device_order_unless_its_driver_lists_several_gpus(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        "import os\ndef test_env():\n    print('ORDER', os.environ.get('CUDA_DEVICE_ORDER'))\n"
    )
    result = run(pytester, "-s")
    several = _driver_lists_several_gpus()
    result.stdout.fnmatch_lines(["*ORDER PCI_BUS_ID" if several else "*ORDER None"])
    if several:
        result.stdout.fnmatch_lines(["gpushare: set CUDA_DEVICE_ORDER=PCI_BUS_ID"])
