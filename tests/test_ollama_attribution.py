"""Which GPU holds Ollama's memory, and finding Ollama's processes in ``/proc``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gpushare.gpus.model import Gpu, GpuProcess
from pytest_gpushare.ollama import OllamaModel, OllamaStatus, attribute_held, find_ollama_pids
from pytest_gpushare.units import GiB, MiB

# --- which GPU holds Ollama's memory --------------------------------------------------------


def _status(*vram: int, pids: tuple[int, ...] = ()) -> OllamaStatus:
    models = tuple(OllamaModel(f"m{i}", v, v) for i, v in enumerate(vram))
    return OllamaStatus("http://127.0.0.1:11434", True, True, models, None, pids)


def _gpu(
    index: int,
    used: int,
    processes: tuple[GpuProcess, ...] | None = None,
    *,
    total: int = 24 * GiB,
    simulated: bool = False,
) -> Gpu:
    return Gpu(index, f"GPU-{index}", "Test GPU", total, total - used, used, processes, simulated)


HELD = int(10.8 * GiB)


def test_nothing_is_attributed_without_a_useful_answer() -> None:
    gpus = [_gpu(0, 20 * GiB)]
    assert attribute_held(OllamaStatus("off", False, False, (), None), gpus) == ({}, None)
    assert attribute_held(OllamaStatus("u", True, False, (), "HTTP 500"), gpus) == ({}, None)
    assert attribute_held(_status(), gpus) == ({}, None)
    assert attribute_held(_status(GiB), []) == ({}, None)


def test_seed_scenario_the_only_gpu_holds_what_ollama_holds() -> None:
    # 24GiB card, 2GiB used by strangers plus Ollama's 10.8GiB; reserve 12GiB -> hold 1.2GiB more.
    gpu = _gpu(0, 2 * GiB + HELD, simulated=True, processes=())
    by_gpu, note = attribute_held(_status(HELD, pids=(4242,)), [gpu])
    assert (by_gpu, note) == ({0: HELD}, None)
    assert max(0, 12 * GiB - by_gpu[0]) == 12 * GiB - HELD == pytest.approx(1.2 * GiB, abs=1)


def test_one_gpu_without_process_figures_gets_all_of_it() -> None:
    assert attribute_held(_status(6 * GiB, 2 * GiB), [_gpu(0, 10 * GiB)]) == ({0: 8 * GiB}, None)


def test_one_gpu_is_never_credited_more_than_it_has_in_use() -> None:
    by_gpu, note = attribute_held(_status(HELD), [_gpu(0, 4 * GiB)])
    assert by_gpu == {0: 4 * GiB}
    assert note == "Ollama reports 10.8GiB but GPU 0 has only 4.0GiB in use; credited 4.0GiB"
    by_gpu, note = attribute_held(_status(HELD), [_gpu(0, 0)])
    assert by_gpu == {}
    assert note is not None and "credited 0B" in note


def test_one_gpu_with_visible_ollama_processes_gets_what_they_really_use() -> None:
    procs = (GpuProcess(100, 3 * GiB), GpuProcess(4242, 9 * GiB), GpuProcess(4243, 512 * MiB))
    gpu = _gpu(0, 14 * GiB, procs)
    assert attribute_held(_status(HELD, pids=(4242, 4243)), [gpu]) == ({0: 9 * GiB + 512 * MiB}, None)


def test_one_gpu_whose_process_list_shows_no_ollama_gets_nothing() -> None:
    gpu = _gpu(0, 14 * GiB, (GpuProcess(100, 14 * GiB),))
    by_gpu, note = attribute_held(_status(HELD, pids=(4242,)), [gpu])
    assert by_gpu == {}
    assert note == (
        "NVML shows no Ollama process on GPU 0; Ollama's 10.8GiB is not credited there "
        "(the full Ollama reserve is held back)"
    )


def test_one_gpu_with_ollama_out_of_sight_falls_back_to_all_of_it() -> None:
    # Ollama in another container or on the WSL2 host: no PID of ours, the list proves nothing.
    gpu = _gpu(0, 14 * GiB, (GpuProcess(100, 2 * GiB),))
    assert attribute_held(_status(HELD), [gpu]) == ({0: HELD}, None)


def test_several_gpus_without_process_figures_get_nothing() -> None:
    gpus = [_gpu(0, 20 * GiB), _gpu(1, 20 * GiB)]
    by_gpu, note = attribute_held(_status(HELD, pids=(4242,)), gpus)
    assert by_gpu == {}
    assert note == (
        "cannot tell which GPU holds Ollama's 10.8GiB (NVML's per-process figures are unavailable); "
        "nothing credited, the full Ollama reserve is held back"
    )


def test_several_gpus_with_ollama_out_of_sight_get_nothing() -> None:
    gpus = [_gpu(0, 20 * GiB, (GpuProcess(7, 11 * GiB),)), _gpu(1, 1 * GiB, ())]
    by_gpu, note = attribute_held(_status(HELD), gpus)
    assert by_gpu == {}
    assert note is not None and "no Ollama process of this box shows up" in note


def test_several_gpus_credit_the_gpu_where_ollama_runs() -> None:
    gpus = [_gpu(0, 3 * GiB, (GpuProcess(7, 3 * GiB),)), _gpu(1, 12 * GiB, (GpuProcess(4242, 10 * GiB),))]
    assert attribute_held(_status(HELD, pids=(4242,)), gpus) == ({1: 10 * GiB}, None)


def test_a_model_spread_over_gpus_is_credited_at_most_what_ollama_reports() -> None:
    gpus = [_gpu(0, 8 * GiB, (GpuProcess(4242, 8 * GiB),)), _gpu(1, 8 * GiB, (GpuProcess(4242, 8 * GiB),))]
    by_gpu, note = attribute_held(_status(12 * GiB, pids=(4242,)), gpus)
    assert by_gpu == {0: 6 * GiB, 1: 6 * GiB}
    assert sum(by_gpu.values()) <= 12 * GiB
    assert (
        note == "Ollama's processes use more than the 12.0GiB it reports; credited GPU 0 6.0GiB, GPU 1 6.0GiB"
    )


def test_a_gpu_without_process_figures_is_not_credited_beside_one_with_them() -> None:
    gpus = [_gpu(0, 20 * GiB, None), _gpu(1, 6 * GiB, (GpuProcess(4242, 5 * GiB),))]
    assert attribute_held(_status(HELD, pids=(4242,)), gpus) == ({1: 5 * GiB}, None)


# --- finding Ollama's processes ------------------------------------------------------------


def _proc(root: Path, pid: str, comm: str | None, cmdline: bytes | None = None) -> None:
    d = root / pid
    d.mkdir()
    if comm is not None:
        (d / "comm").write_text(comm + "\n")
    if cmdline is not None:
        (d / "cmdline").write_bytes(cmdline)


def test_ollama_processes_are_found_by_name_not_by_arguments(tmp_path: Path) -> None:
    _proc(tmp_path, "12", "ollama", b"/usr/local/bin/ollama\0serve\0")
    _proc(tmp_path, "13", "ollama_llama_se", b"/tmp/ollama123/runners/cuda/ollama_llama_server\0--model\0")
    _proc(tmp_path, "14", "python3", b"python3\0-m\0pytest\0tests/test_ollama.py\0")
    _proc(tmp_path, "15", "bash", b"/opt/Ollama/bin/Ollama-runner\0")
    _proc(tmp_path, "16", None)  # gone while we looked
    _proc(tmp_path, "17", "curl", b"curl\0http://ollama:11434/api/ps\0")
    (tmp_path / "self").mkdir()
    (tmp_path / "ollama").mkdir()
    assert find_ollama_pids(tmp_path) == (12, 13, 15)


def test_a_missing_proc_finds_nothing(tmp_path: Path) -> None:
    assert find_ollama_pids(tmp_path / "absent") == ()


def test_the_real_proc_can_be_scanned() -> None:
    pids = find_ollama_pids()
    assert all(isinstance(p, int) and p > 0 for p in pids)
    assert list(pids) == sorted(pids)
