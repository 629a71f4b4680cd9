"""Ollama coexistence end to end: real pytest subprocesses asking a fake Ollama on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ollama_server import FakeOllama, ps_model, silent_listener

pytest_plugins = ["pytester"]

GiB = 2**30
HELD = int(10.8 * GiB)
SEED = (
    "--gpushare-ollama-reserve=12GiB",
    "--gpushare-safety=1GiB",
    "--gpushare-worker-mem=3GiB",
    "--gpushare-workers-per-gb=0.25",
)


@pytest.fixture
def suite(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "8")
    for var in ("GPUSHARE_OLLAMA", "OLLAMA_HOST", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\n")
    return pytester


@pytest.fixture
def ollama(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllama]:
    with FakeOllama([ps_model("qwen2.5:14b", HELD)]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server


def test_seed_scenario_without_ollama_loaded(suite: pytest.Pytester) -> None:
    with FakeOllama([]) as server:
        result = suite.runpytest_subprocess(
            "-n", "auto", "--gpushare-simulate=24GiB:used=2GiB", f"--gpushare-ollama={server.url}", *SEED
        )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*GPU 0*free 22.0GiB, Ollama hold 12.0GiB, safety 1.0GiB -> usable 9.0GiB",
            "*workers: 2 (*",
            f"*ollama: {server.url} answered: 0 model(s) loaded, 0B in VRAM",
            "*GPU 0: Ollama reserve 12.0GiB, holds 0B already -> hold back 12.0GiB more",
            "created: 2/2 workers",
        ]
    )


def test_seed_scenario_with_ollama_holding_its_model(suite: pytest.Pytester, ollama: FakeOllama) -> None:
    used = 2 * GiB + HELD
    result = suite.runpytest_subprocess("-n", "auto", f"--gpushare-simulate=24GiB:used={used}B", *SEED)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*GPU 0*free 11.2GiB, Ollama hold 1.2GiB, safety 1.0GiB -> usable 9.0GiB",
            "*workers: 2 (*",
            f"*ollama: {ollama.url} answered: 1 model(s) loaded, 10.8GiB in VRAM",
            "*qwen2.5:14b: 10.8GiB VRAM of 10.8GiB",
            "*GPU 0: Ollama reserve 12.0GiB, holds 10.8GiB already -> hold back 1.2GiB more",
            "created: 2/2 workers",
        ]
    )


def test_plan_shows_the_same_ollama_lines(suite: pytest.Pytester, ollama: FakeOllama) -> None:
    used = 2 * GiB + HELD
    result = suite.run(
        sys.executable,
        "-m",
        "pytest_gpushare",
        "plan",
        f"--simulate=24GiB:used={used}B",
        "--ollama-reserve=12GiB",
        "--workers-per-gb=0.25",
    )
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*usable 9.0GiB",
            "*workers: 2 (*",
            f"*ollama: {ollama.url} answered: 1 model(s) loaded, 10.8GiB in VRAM",
            "*hold back 1.2GiB more",
        ]
    )


GPU_TEST = "import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_gpu(): pass\n"


def test_loaded_model_without_reservation_is_pointed_out(suite: pytest.Pytester, ollama: FakeOllama) -> None:
    suite.makepyfile(test_gpu=GPU_TEST)  # the analysis is printed once GPU tests are known to exist
    result = suite.runpytest_subprocess(f"--gpushare-simulate=24GiB:used={2 * GiB + HELD}B")
    result.stdout.fnmatch_lines(["*no reservation protects its next load: set --gpushare-ollama-reserve*"])


def test_spilling_model_is_warned_in_header_and_summary(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.makepyfile(test_gpu=GPU_TEST)
    with FakeOllama([ps_model("llama3:70b", 40 * GiB, 20 * GiB)]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        result = suite.runpytest_subprocess(
            "--gpushare-simulate=24GiB:used=21GiB", "--gpushare-ollama-reserve=22GiB"
        )
    warning = "*WARNING: Ollama model llama3:70b is spilling to the CPU: 20.0GiB of 40.0GiB is not on the GPU"
    result.stdout.fnmatch_lines([warning, "*- gpushare -*", warning])


def test_a_server_that_never_answers_costs_about_a_second(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    with silent_listener() as port:
        monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
        result = suite.runpytest_subprocess(
            "-n",
            "2",
            "--gpushare-simulate=24GiB:used=2GiB",
            "--gpushare-ollama-reserve=12GiB",
        )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*ollama: http://127.0.0.1:*did not answer usefully (no answer within 1s)",
            "*nothing credited: the full --gpushare-ollama-reserve is held back",
        ]
    )
    result.stdout.fnmatch_lines(["*usable 9.0GiB"])
