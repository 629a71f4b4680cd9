"""What the benchmark scripts share: the machine line, quantiles, the table and ratio lines, and a
clean environment for the pytest runs they start.

Every script prints a short table and ends with ``ratio`` lines in one format::

    ratio <what> <value> goal <goal> <met|MISSED>

so that a reader, docs/benchmarks.rst and tests/test_bench.py all find the results the same way.
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Environment variables of the calling shell that would change what a benchmark measures.
_SCRUB_PREFIXES = ("GPUSHARE_", "PYTEST_", "CUDA_", "OLLAMA_")


def machine() -> str:
    """One line naming the machine: cores, CPU model, Python and the versions that matter."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for name in ("pytest", "xdist", "filelock"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            versions.append(f"{name} absent")
    return (
        f"machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, "
        f"Python {platform.python_version()}, " + ", ".join(versions)
    )


def load() -> str:
    """The load average now (1, 5 and 15 minutes), printed beside every figure: on a shared box a
    figure means little without it."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


_HEAD = re.compile(rb"^GPUSHARE-LEDGER [0-9]+ [0-9a-f]{8} ([0-9]+)\n")


def generation(path: Path) -> int:
    """The write count in a ledger file's header line, which every write increments (0 before
    the first write)."""
    try:
        with open(path, "rb") as f:
            match = _HEAD.match(f.readline())
    except FileNotFoundError:
        return 0
    if match is None:
        raise SystemExit(f"cannot read the generation of the ledger {path}")
    return int(match.group(1))


def ledger_writes(folder: Path) -> int:
    """Writes so far to every GPU ledger in ``folder`` (the sum of their generations)."""
    return sum(generation(p) for p in folder.glob("gpu-*.json"))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank: p99 of 100 values is the largest but one."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> str:
    """Seconds as milliseconds with three significant decimals where they matter."""
    value = seconds * 1000
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


def table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a plain-text table, columns left-aligned, under ``title``."""
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    print()
    print(title)
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  " + "  ".join("-" * w for w in widths))
    for row in body:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()


@dataclass(frozen=True)
class Ratio:
    """One result against its goal; ``higher_is_better`` flips the comparison."""

    what: str
    value: float
    goal: float
    unit: str = "x"
    higher_is_better: bool = False

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        # Three decimals where two would print the goal itself for a value on its wrong side.
        digits = 3 if self.unit == "x" and f"{self.value:.2f}" == f"{self.goal:.2f}" else 2
        value = f"{self.value:.{digits}f}{self.unit}" if self.unit == "x" else f"{self.value:.1f} {self.unit}"
        goal = f"{self.goal:.2f}{self.unit}" if self.unit == "x" else f"{self.goal:g} {self.unit}"
        return f"ratio {self.what} {value} goal {sign} {goal} {'met' if self.met else 'MISSED'}"


def print_ratios(ratios: Iterable[Ratio]) -> None:
    """The last lines of every benchmark."""
    print()
    for r in ratios:
        print(r.line())
    sys.stdout.flush()


def clean_env(ledger_dir: str | os.PathLike[str] | None, **extra: str) -> dict[str, str]:
    """This process's environment without the caller's pytest/gpushare/CUDA/Ollama settings, with
    the ledger folder set (a benchmark never touches the account's real ledgers) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(proxy, None)
    if ledger_dir is not None:
        env["GPUSHARE_LEDGER_DIR"] = os.fspath(ledger_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def with_bytecode(env: Mapping[str, str], cache: str | os.PathLike[str]) -> dict[str, str]:
    """``env`` with Python's bytecode cached under ``cache`` (outside the repository) instead of
    none at all: an installed package has its bytecode, and without it every process compiles
    each module it imports, the plugin's some 60 among them (about 90 ms per process on 2 cores).
    Python then reads bytecode from ``cache`` only: run each command once before timing it."""
    out = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out["PYTHONPYCACHEPREFIX"] = os.fspath(cache)
    return out


@dataclass(frozen=True)
class Run:
    """A finished command: its wall time, exit status and output, and the CPU time (user and
    system) of its whole process tree: every process it waited for, xdist's workers included."""

    wall_s: float
    returncode: int
    output: str
    cpu_s: float = math.nan


def run(
    args: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str], timeout: float = 600
) -> Run:
    """Run ``args`` and time it from start to exit; the output is kept for the error message. Its
    CPU time is what this process's reaped children used meanwhile: run one command at a time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Run(wall, proc.returncode, proc.stdout, cpu)


def pytest_cmd(*args: str) -> list[str]:
    """``python -m pytest`` of this interpreter, without the cache (runs stay independent)."""
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def require_ok(result: Run, what: str, ok: Iterable[int] = (0,)) -> None:
    """Stop the benchmark with the tail of the output when a run failed: a number from a broken
    run would be a lie."""
    if result.returncode not in set(ok):
        tail = "\n".join(result.output.splitlines()[-40:])
        raise SystemExit(f"{what} failed with exit code {result.returncode}:\n{tail}")
