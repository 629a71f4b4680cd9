"""Plugin overhead: what the plugin adds to a run of many trivial GPU tests, and to start-up.

    python bench/overhead.py                      # about a minute on 2 cores
    python bench/overhead.py --what-if handover   # adds a run with a proposed change
    python bench/overhead.py --quick              # seconds: a smoke run, numbers not meaningful

1. Wall time of 2,000 trivial tests marked ``gpu(mem="64MiB")`` run with ``-n 2`` on a simulated
   24GiB GPU, with the plugin (each test leases and releases its 64MiB) and with
   ``-p no:gpushare`` (the marker registered in the ini), runs alternated, median of each.
2. ``pytest --collect-only`` on an empty folder, with and without the plugin, Ollama absent
   (``GPUSHARE_OLLAMA`` unset, so the plugin asks ``127.0.0.1:11434`` and is refused) and no
   simulated GPU (the NVML probe runs as it would for a user: on a box without a driver it finds
   none).

With ``--what-if NAME``, a third mode runs the plugin with a change proposed in bench/whatif.py
patched in (``handover``: a lease passes to the worker's next test of the same need without a
ledger access when nobody waits), alternated with the other two.

Goals (issue 7): at most 1.10x the wall time without the plugin; start-up delta at most 150 ms.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import tempfile
from pathlib import Path

from _util import Ratio, clean_env, machine, median, print_ratios, pytest_cmd, require_ok, run, table

INI = """\
[pytest]
markers =
    gpu(mem=None, count=1, exclusive=False): a GPU test (registered here for -p no:gpushare runs)
"""

TEST_FILE = """\
import pytest

pytestmark = pytest.mark.gpu(mem="64MiB")


@pytest.mark.parametrize("i", range({per_file}))
def test_trivial(i):
    assert i >= 0
"""


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


def suite_runs(work: Path, tests: int, files: int, repeats: int, whatif: str) -> dict[str, list[float]]:
    suite = work / "suite"
    write_suite(suite, tests, files)
    env = clean_env(work / "ledger", GPUSHARE_SIMULATE="24GiB", GPUSHARE_OLLAMA="off")
    modes = {
        "with plugin": pytest_cmd("-n", "2", "-q"),
        "-p no:gpushare": pytest_cmd("-n", "2", "-q", "-p", "no:gpushare"),
    }
    if whatif:
        # bench/whatif.py patches the plugin's ledger in the controller and in every worker.
        modes[f"what-if {whatif}"] = pytest_cmd("-n", "2", "-q", "-p", "whatif")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        # Alternate which mode goes first, so a drift of the machine hits both alike.
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            mode_env = env
            if mode.startswith("what-if"):
                mode_env = dict(env, BENCH_WHATIF=whatif, PYTHONPATH=str(Path(__file__).resolve().parent))
            result = run(modes[mode], suite, mode_env)
            require_ok(result, f"{mode} run")
            if f"{tests} passed" not in result.output:
                raise SystemExit(f"{mode}: expected '{tests} passed' in:\n{result.output[-2000:]}")
            if mode != "-p no:gpushare" and not re.search(rf"\b{tests} lease\(s\)", result.output):
                raise SystemExit(
                    f"{mode}: the summary does not show {tests} leases:\n{result.output[-2000:]}"
                )
            walls[mode].append(result.wall_s)
    return walls


def startup_runs(work: Path, repeats: int) -> dict[str, list[float]]:
    empty = work / "empty"
    empty.mkdir()
    # GPUSHARE_OLLAMA unset on purpose: "auto" asks 127.0.0.1:11434, as a user's run would.
    env = clean_env(work / "ledger")
    modes = {
        "with plugin": pytest_cmd("--collect-only"),
        "-p no:gpushare": pytest_cmd("--collect-only", "-p", "no:gpushare"),
    }
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            result = run(modes[mode], empty, env)
            require_ok(result, f"--collect-only {mode}", ok=(0, 5))  # 5: no tests collected
            if mode == "with plugin" and "gpushare: VRAM analysis" not in result.output:
                raise SystemExit(f"with plugin: no VRAM analysis in the header:\n{result.output[-2000:]}")
            walls[mode].append(result.wall_s)
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 tests, one run of each")
    parser.add_argument("--tests", type=int, default=None, help="trivial tests in the suite (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each mode (default 5)")
    parser.add_argument(
        "--what-if",
        default="",
        help="also run with these bench/whatif.py patches (e.g. handover)",
    )
    parser.add_argument(
        "--startup-repeats", type=int, default=None, help="start-up runs of each mode (default 15)"
    )
    args = parser.parse_args(argv)
    tests = args.tests or (100 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 5)
    startup_repeats = args.startup_repeats or (2 if args.quick else 15)
    files = 20 if tests % 20 == 0 else 1

    print("Plugin overhead: trivial GPU tests with -n 2, and --collect-only start-up")
    print(machine())
    if ollama_answers():
        print("note: something answers on 127.0.0.1:11434, so the start-up rows are not 'Ollama absent'")
    with tempfile.TemporaryDirectory(prefix="gpushare-bench-") as tmp:
        work = Path(tmp)
        walls = suite_runs(work, tests, files, repeats, args.what_if)
        starts = startup_runs(work, startup_repeats)
    per_test = {m: median(v) / tests * 1e6 for m, v in walls.items()}
    table(
        f"{tests} trivial tests, gpu(mem='64MiB'), -n 2, simulated 24GiB GPU, "
        f"{repeats} runs of each, alternated",
        ["mode", "median wall", "min", "max", "per test"],
        [
            (m, f"{median(v):.2f} s", f"{min(v):.2f} s", f"{max(v):.2f} s", f"{per_test[m]:.0f} us")
            for m, v in walls.items()
        ],
    )
    table(
        f"pytest --collect-only on an empty folder, Ollama absent, {startup_repeats} runs each, alternated",
        ["mode", "median", "min", "max"],
        [
            (m, f"{median(v) * 1000:.0f} ms", f"{min(v) * 1000:.0f} ms", f"{max(v) * 1000:.0f} ms")
            for m, v in starts.items()
        ],
    )
    ratio = median(walls["with plugin"]) / median(walls["-p no:gpushare"])
    delta = (median(starts["with plugin"]) - median(starts["-p no:gpushare"])) * 1000
    base = per_test["-p no:gpushare"]
    print()
    for mode in walls:
        if mode != "-p no:gpushare":
            print(
                f"{mode}: {per_test[mode] - base:.0f} us more per test than -p no:gpushare (from the medians)"
            )
    extra = [
        Ratio(
            f"wall {mode} / without plugin (median, not the plugin as shipped)",
            median(v) / median(walls["-p no:gpushare"]),
            1.10,
        )
        for mode, v in walls.items()
        if mode.startswith("what-if")
    ]
    print_ratios(
        [
            *extra,
            Ratio("wall with plugin / without (median)", ratio, 1.10),
            Ratio("start-up delta of --collect-only (median)", delta, 150, "ms"),
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
