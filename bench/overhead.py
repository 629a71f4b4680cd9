"""Plugin overhead (issue 13, rows 1 and 3): what the plugin adds to a run of many trivial GPU
tests, how often it writes the box ledger for them, and what it adds to start-up.

    python bench/overhead.py              # a few minutes on 2 cores
    python bench/overhead.py --quick      # seconds: a smoke run, numbers not meaningful

1. Wall time, start-up included, of 2,000 trivial tests marked ``gpu(mem="1GiB")`` on a
   simulated 24GiB GPU, with ``-n 2``, ``-n 8`` and in one process, each with the plugin (each
   test leases and releases its 1GiB: under xdist through the session's broker, in one process
   from the box ledger) and with ``-p no:gpushare`` (the marker registered in the ini), side by
   side, modes alternated, median of each. The load average is printed beside every figure, and
   the CPU time (user and system) of each run's whole process tree beside its wall time: on a
   shared box it moves less with the load than the wall time does.
2. Box-ledger writes per test of those runs, counted from the generation in the ledger file's
   header (every write increments it).
3. ``pytest --collect-only`` in a folder with one GPU test, with and without the plugin, Ollama
   absent (``GPUSHARE_OLLAMA`` unset, so the plugin would ask ``127.0.0.1:11434``) and no
   simulated GPU (the NVML probe runs as it would for a user); with bytecode, and without any
   (each process compiles every module it imports: how earlier rounds measured).

Every run but the start-up rows without bytecode has Python's bytecode cached outside the
repository (``PYTHONPYCACHEPREFIX``), as an installed package has it; each command runs once,
untimed, before its timed runs.

Goals (issue 13): at most 1.10x the wall time without the plugin at ``-n 2`` (done means 1.25x
on a 2-core box); at most one box-ledger write per 20 tests; start-up at most 100 ms more.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

from _util import (
    Ratio,
    clean_env,
    ledger_writes,
    load,
    machine,
    median,
    print_ratios,
    pytest_cmd,
    require_ok,
    run,
    table,
    with_bytecode,
)

INI = """\
[pytest]
markers =
    gpu(mem=None, count=1, exclusive=False): a GPU test (registered here for -p no:gpushare runs)
"""

TEST_FILE = """\
import pytest

pytestmark = pytest.mark.gpu(mem="1GiB")


@pytest.mark.parametrize("i", range({per_file}))
def test_trivial(i):
    assert i >= 0
"""

#: The process layouts of row 1: xdist's ``-n`` value, or None for one process.
LAYOUTS = {"-n 2": "2", "-n 8": "8", "one process": None}


def write_suite(folder: Path, tests: int, files: int) -> None:
    """``tests`` trivial GPU tests spread over ``files`` modules, and an ini registering the marker."""
    folder.mkdir(parents=True)
    (folder / "pytest.ini").write_text(INI)
    per_file = tests // files
    for k in range(files):
        (folder / f"test_trivial_{k:02d}.py").write_text(TEST_FILE.format(per_file=per_file))


def ollama_answers() -> bool:
    """Whether something listens where the plugin looks for Ollama by default."""
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            return True
    except OSError:
        return False


class Measured:
    """Wall times, CPU times, load averages and ledger writes of one mode's runs."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.loads: list[str] = []
        self.writes: list[int] = []


def suite_runs(work: Path, tests: int, files: int, repeats: int) -> dict[str, Measured]:
    suite = work / "suite"
    write_suite(suite, tests, files)
    ledger = work / "ledger"
    env = with_bytecode(clean_env(ledger, GPUSHARE_SIMULATE="24GiB", GPUSHARE_OLLAMA="off"), work / "pyc")
    modes: dict[str, list[str]] = {}
    for name, n in LAYOUTS.items():
        xdist = ["-n", n] if n else ["-p", "no:xdist"]
        modes[f"{name}, with plugin"] = pytest_cmd(*xdist, "-q")
        modes[f"{name}, -p no:gpushare"] = pytest_cmd(*xdist, "-q", "-p", "no:gpushare")
    measured = {m: Measured() for m in modes}
    for mode, args in modes.items():  # compile once: the timed runs read the bytecode
        require_ok(run(args, suite, env), f"{mode} warm-up run")
    for r in range(repeats):
        # Alternate the order, so a drift of the machine hits every mode alike.
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            before = ledger_writes(ledger)
            result = run(modes[mode], suite, env)
            require_ok(result, f"{mode} run")
            if f"{tests} passed" not in result.output:
                raise SystemExit(f"{mode}: expected '{tests} passed' in:\n{result.output[-2000:]}")
            if mode.endswith("with plugin") and f" {tests} lease(s)" not in result.output:
                raise SystemExit(
                    f"{mode}: the summary does not show {tests} leases:\n{result.output[-2000:]}"
                )
            measured[mode].walls.append(result.wall_s)
            measured[mode].cpus.append(result.cpu_s)
            measured[mode].loads.append(load())
            measured[mode].writes.append(ledger_writes(ledger) - before)
    return measured


def startup_runs(work: Path, repeats: int) -> dict[str, Measured]:
    folder = work / "one-gpu-test"
    write_suite(folder, 1, 1)
    # GPUSHARE_OLLAMA unset on purpose: "auto" would ask 127.0.0.1:11434, as a user's run would.
    plain = clean_env(work / "ledger")
    cached = with_bytecode(plain, work / "pyc")
    with_plugin = pytest_cmd("--collect-only", "-q")
    without = pytest_cmd("--collect-only", "-q", "-p", "no:gpushare")
    modes = {
        "with plugin": (with_plugin, cached),
        "-p no:gpushare": (without, cached),
        "with plugin, no bytecode": (with_plugin, plain),
        "-p no:gpushare, no bytecode": (without, plain),
    }
    measured = {m: Measured() for m in modes}
    for args, env in modes.values():
        run(args, folder, env)  # compiles into the cache (where there is one)
    for r in range(repeats):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            args, env = modes[mode]
            result = run(args, folder, env)
            require_ok(result, f"--collect-only {mode}")
            measured[mode].walls.append(result.wall_s)
            measured[mode].loads.append(load())
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 tests, one run of each")
    parser.add_argument("--tests", type=int, default=None, help="trivial tests in the suite (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each mode (default 3)")
    parser.add_argument(
        "--startup-repeats", type=int, default=None, help="start-up runs of each mode (default 15)"
    )
    args = parser.parse_args(argv)
    tests = args.tests or (100 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    startup_repeats = args.startup_repeats or (2 if args.quick else 15)
    files = 20 if tests % 20 == 0 else 1

    print("Plugin overhead: trivial GPU tests at -n 2, -n 8 and in one process; --collect-only start-up")
    print(machine())
    print(f"before: {load()}")
    if ollama_answers():
        print("note: something answers on 127.0.0.1:11434, so the start-up rows are not 'Ollama absent'")
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-") as tmp:
        work = Path(tmp)
        suites = suite_runs(work, tests, files, repeats)
        starts = startup_runs(work, startup_repeats)
    table(
        f"{tests} trivial tests, gpu(mem='1GiB'), simulated 24GiB GPU, wall with start-up, "
        f"{repeats} runs of each, alternated",
        [
            "mode",
            "median wall",
            "min",
            "max",
            "median CPU",
            "per test",
            "box writes/test",
            "load after (median run)",
        ],
        [
            (
                mode,
                f"{median(m.walls):.2f} s",
                f"{min(m.walls):.2f} s",
                f"{max(m.walls):.2f} s",
                f"{median(m.cpus):.2f} s",
                f"{median(m.walls) / tests * 1e6:.0f} us",
                f"{median(m.writes) / tests:.3f}" if mode.endswith("with plugin") else "-",
                _median_load(m),
            )
            for mode, m in suites.items()
        ],
    )
    table(
        f"pytest --collect-only, one GPU test, Ollama absent, {startup_repeats} runs each, alternated "
        "(no bytecode: every module compiled in each run)",
        ["mode", "median", "min", "max", "load after (median run)"],
        [
            (
                mode,
                f"{median(m.walls) * 1000:.0f} ms",
                f"{min(m.walls) * 1000:.0f} ms",
                f"{max(m.walls) * 1000:.0f} ms",
                _median_load(m),
            )
            for mode, m in starts.items()
        ],
    )
    print(f"after: {load()}")
    ratios = []
    for name in LAYOUTS:
        with_plugin = median(suites[f"{name}, with plugin"].walls)
        without = median(suites[f"{name}, -p no:gpushare"].walls)
        added = (with_plugin - without) / tests * 1e6
        cpu = [median(suites[f"{name}, {m}"].cpus) for m in ("with plugin", "-p no:gpushare")]
        print(
            f"{name}: {added:.0f} us more per test than -p no:gpushare (medians); CPU of the process "
            f"tree {cpu[0] / cpu[1]:.2f}x, {(cpu[0] - cpu[1]) / tests * 1e6:.0f} us more per test"
        )
        ratios.append(Ratio(f"wall with plugin / without, {name} (median)", with_plugin / without, 1.10))
    writes = [median(suites[f"{name}, with plugin"].writes) / tests for name in LAYOUTS if LAYOUTS[name]]
    delta = (median(starts["with plugin"].walls) - median(starts["-p no:gpushare"].walls)) * 1000
    plain = [median(starts[f"{m}, no bytecode"].walls) for m in ("with plugin", "-p no:gpushare")]
    print(f"start-up delta without bytecode: {(plain[0] - plain[1]) * 1000:.0f} ms (medians)")
    print_ratios(
        [
            *ratios,
            Ratio(
                "box-ledger writes per test under xdist (worst layout, median)", max(writes), 0.05, "/test"
            ),
            Ratio("start-up delta of --collect-only (median)", delta, 100, "ms"),
        ]
    )
    return 0


def _median_load(m: Measured) -> str:
    """The load average after the run whose wall time was the median."""
    order = sorted(range(len(m.walls)), key=m.walls.__getitem__)
    return m.loads[order[len(order) // 2]]


if __name__ == "__main__":
    sys.exit(main())
