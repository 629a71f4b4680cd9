"""The kit's hands: runs pytest, ``gpushare`` and nvidia-smi, holds GPU memory in helper processes,
asks nvidia-smi and torch whether the checks can run, and keeps every output for the record.

Nothing here needs a GPU: the same plumbing runs in the normal suite against the fake NVML box
(tests/test_gpu_kit.py). What does need one is in the scripts it runs (tests/gpu/suites.py)
and the checks (tests/gpu/test_real_*.py). The plugin is used through its public surface only:
the pytest plugin, ``python -m pytest_gpushare`` and the ``--gpushare-report`` JSON.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import wait_until

from . import kit, readings

ROOT = Path(__file__).resolve().parents[2]
#: Variables that would make a sub-run differ from a plain run on this box: the plugin's settings,
#: pytest's added options, and an outer xdist worker's identity (a kit run inside ``pytest -n``).
_DROPPED_PREFIXES = ("GPUSHARE_", "PYTEST_XDIST_", "PYTEST_ADDOPTS")
#: Files the kit leaves in its output folder besides the record (the device tool returns 8).
RUNS_NAME, SMI_NAME, REPORTS_NAME = "runs.txt", "nvidia-smi.txt", "reports.json"

TORCH_FACTS = """\
# What torch says of CUDA: python -c TORCH_FACTS
import json
try:
    import torch
except Exception as exc:
    print(json.dumps({"error": f"cannot import torch: {exc}"}))
else:
    available = torch.cuda.is_available()
    print(json.dumps({
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "available": available,
        "count": torch.cuda.device_count() if available else 0,
    }))
"""


@dataclass(frozen=True)
class Run:
    """One finished command: what ran, its exit code, its output (stdout and stderr), its time."""

    argv: tuple[str, ...]
    rc: int
    output: str
    seconds: float
    shown: str  # the command as the record shows it

    @property
    def line(self) -> str:
        return f"$ {self.shown}  (rc {self.rc}, {self.seconds:.1f}s)"

    @property
    def failure(self) -> str:
        """Why an assertion on this run failed: its exit code and last line first, then all it said."""
        lines = [x for x in self.output.splitlines() if x.strip()]
        return f"`{self.shown}` exited {self.rc}: {lines[-1] if lines else 'no output'}\n{self.output}"


@dataclass
class Held:
    """A helper process that holds memory: its pid, what it said when ready, and how it ended."""

    proc: subprocess.Popen[str]
    data: dict[str, Any]
    run: Run | None = None


def shown_arg(arg: str) -> str:
    """An argument as the record shows it: a script given to ``python -c`` by its first line."""
    return arg if "\n" not in arg else arg.split("\n", 1)[0].lstrip("# ") + " ..."


def clean_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without what would make a sub-run differ from a plain run on this box."""
    return {k: v for k, v in base.items() if not k.startswith(_DROPPED_PREFIXES)}


def execute(
    argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float, shown: str
) -> Run:
    """Run ``argv`` to its end; killed after ``timeout`` seconds (exit code 124)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        partial = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        rc, output = 124, f"{partial or ''}\n[the kit stopped it after {timeout:g}s]"
    except OSError as exc:
        rc, output = 127, f"{argv[0]}: {exc}"
    return Run(tuple(argv), rc, output, time.monotonic() - start, shown)


Smi = Callable[..., Run]
"""Runs nvidia-smi with the arguments given."""


def query_gpus(smi: Smi) -> list[readings.SmiGpu]:
    """The GPUs as nvidia-smi shows them; RuntimeError with its words when it fails."""
    fields: tuple[str, ...] = readings.GPU_FIELDS
    run = smi(*readings.smi_args("gpu", fields))
    if run.rc != 0 and "memory.reserved" in run.output:  # drivers before memory.reserved
        run, fields = smi(*readings.smi_args("gpu", readings.GPU_FIELDS_OLD)), readings.GPU_FIELDS_OLD
    if run.rc != 0:
        raise RuntimeError(run.output.strip().splitlines()[0] if run.output.strip() else f"exit {run.rc}")
    return readings.parse_smi_gpus(run.output, fields)


def torch_facts(run: Run) -> dict[str, Any]:
    """What the :data:`TORCH_FACTS` probe said, or its failure as ``error``."""
    try:
        facts: dict[str, Any] = json.loads(run.output.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"the torch probe failed (rc {run.rc}): {run.output.strip()[-300:]}"}
    return facts


@dataclass(frozen=True)
class Detection:
    """Whether the real-GPU checks can run here: the reason they cannot (None: they can), what
    nvidia-smi and torch said, and the runs that asked them (``(log name, run)``)."""

    reason: str | None
    gpus: list[readings.SmiGpu]
    torch: dict[str, Any] | None
    runs: list[tuple[str, Run]]


def detect(python: str, env: Mapping[str, str]) -> Detection:
    """Ask nvidia-smi for GPUs and, where there are some, a child ``python`` for torch's CUDA."""
    runs: list[tuple[str, Run]] = []
    path = shutil.which("nvidia-smi", path=env.get("PATH"))

    def smi(*args: str) -> Run:
        assert path is not None
        run = execute([path, *args], cwd=None, env=env, timeout=60, shown=shlex.join(["nvidia-smi", *args]))
        runs.append((SMI_NAME, run))
        return run

    gpus: list[readings.SmiGpu] = []
    error = torch = None
    if path is not None:
        try:
            gpus = query_gpus(smi)
        except RuntimeError as exc:
            error = str(exc)
    if gpus:
        argv = [python, "-c", TORCH_FACTS]
        run = execute(
            argv, cwd=None, env=env, timeout=120, shown=shlex.join(["python", "-c", shown_arg(TORCH_FACTS)])
        )
        runs.append((RUNS_NAME, run))
        torch = torch_facts(run)
    return Detection(kit.missing_gpu_reason(path, error, gpus, torch), gpus, torch, runs)


@dataclass
class Box:
    """Runs the kit's commands in ``work`` and keeps their output in ``out``.

    Every run gets a clean environment (:func:`clean_env`), a ledger folder of its own
    (``work/ledger``), Ollama off, and a lease timeout of a minute (a check that waits longer
    has failed; the kit must end within its time).
    """

    out: Path
    work: Path
    python: str = sys.executable
    timeout: float = 90.0
    base_env: Mapping[str, str] | None = None
    runs: list[Run] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for log in (RUNS_NAME, SMI_NAME, REPORTS_NAME):  # one session's logs, not an earlier one's
            (self.out / log).unlink(missing_ok=True)
        self.env = clean_env(os.environ if self.base_env is None else self.base_env)
        self.env.update(
            GPUSHARE_LEDGER_DIR=str(self.work / "ledger"),
            GPUSHARE_OLLAMA="off",
            GPUSHARE_TIMEOUT="60",
            PYTHONDONTWRITEBYTECODE="1",
        )

    # --- commands ---------------------------------------------------------------------------

    def tidy(self, text: str) -> str:
        """``text`` (a command line) with this Python as ``python`` and paths in ``work`` relative."""
        return text.replace(self.python, "python").replace(f"{self.work}/", "")

    def _shown(self, argv: Sequence[str], cwd: Path) -> str:
        words = [self.tidy(shown_arg(a)) for a in argv]
        if cwd == self.work:
            return shlex.join(words)
        where = "the checkout" if cwd == ROOT else os.path.relpath(cwd, self.work)
        return f"{shlex.join(words)}  [in {where}]"

    def keep(self, run: Run, log: str = RUNS_NAME) -> Run:
        """Append ``run`` to the log file ``log`` (runs.txt: also to the record's commands)."""
        with open(self.out / log, "a", encoding="utf-8") as f:
            f.write(f"{run.line}\n{run.output.rstrip()}\n\n")
        if log == RUNS_NAME:
            self.runs.append(run)
        return run

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        log: str = RUNS_NAME,
    ) -> Run:
        """Run ``argv`` in ``cwd`` (default ``work``) to its end, and keep its output."""
        cwd = cwd or self.work
        run = execute(
            argv,
            cwd=cwd,
            env={**self.env, **(env or {})},
            timeout=timeout or self.timeout,
            shown=self._shown(argv, cwd),
        )
        return self.keep(run, log)

    def pytest(
        self, cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> Run:
        """``python -m pytest`` in ``cwd``, without the cache (no learned worker mem between runs)."""
        argv = [self.python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
        return self.run(argv, cwd=cwd, env=env, timeout=timeout)

    def gpushare(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Run:
        """The ``gpushare`` command, as ``python -m pytest_gpushare``."""
        return self.run([self.python, "-m", "pytest_gpushare", *args], cwd=cwd, env=env)

    # --- generated suites and their reports ------------------------------------------------

    def suite(self, name: str, files: Mapping[str, str]) -> Path:
        """A folder ``work/name`` with an empty ``pytest.ini`` (its own rootdir) and ``files``."""
        folder = self.work / name
        folder.mkdir()
        (folder / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        for file_name, text in files.items():
            (folder / file_name).write_text(text, encoding="utf-8")
        return folder

    def script(self, name: str, text: str) -> Path:
        """``text`` as ``work/name.py``: a helper that shows in ``gpushare status`` by its name."""
        path = self.work / f"{name}.py"
        path.write_text(text, encoding="utf-8")
        return path

    def report(self, name: str, path: Path) -> dict[str, Any]:
        """Read a ``--gpushare-report`` file, kept under ``name`` in ``reports.json``."""
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        self.reports[name] = data
        return data

    # --- nvidia-smi and torch ----------------------------------------------------------------

    def smi(self, *args: str) -> Run:
        """nvidia-smi with ``args``; its answers go to nvidia-smi.txt, not to the record."""
        path = shutil.which("nvidia-smi", path=self.env.get("PATH"))
        if path is None:
            return self.keep(
                Run(("nvidia-smi", *args), 127, "nvidia-smi: not found", 0.0, "nvidia-smi"), SMI_NAME
            )
        return self.run([path, *args], timeout=60, log=SMI_NAME)

    def smi_gpus(self) -> list[readings.SmiGpu]:
        """The GPUs as nvidia-smi shows them now (:func:`query_gpus`)."""
        return query_gpus(self.smi)

    def smi_apps(self) -> list[readings.SmiApp]:
        """The compute processes as nvidia-smi lists them (empty when it cannot)."""
        run = self.smi(*readings.smi_args("compute-apps", readings.APP_FIELDS))
        return readings.parse_smi_apps(run.output) if run.rc == 0 else []

    # --- holding memory in another process -------------------------------------------------

    @contextmanager
    def hold(
        self, argv: Sequence[str], ready: Path, *, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> Iterator[Held]:
        """Run ``argv`` beside the block; enter once it wrote ``ready`` (JSON), its facts.

        The process holds what it holds until ``READY.stop`` exists (suites.HOLDER's way): the
        end of the block creates it and waits for the process to end (30 s, then it is killed).
        A process that ends before it is ready fails the test with its output.
        """
        start = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            cwd=self.work,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        held = Held(proc, {})
        try:
            wait_until(
                ready.exists, f"{self._shown(argv, self.work)} to be ready", timeout=timeout, proc=proc
            )
            held.data = json.loads(ready.read_text(encoding="utf-8"))
            yield held
        finally:
            ready.with_name(ready.name + ".stop").touch()
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            except ValueError:  # wait_until already read it to the end
                output = ""
            run = Run(
                tuple(argv),
                proc.returncode,
                output or "",
                time.monotonic() - start,
                self._shown(argv, self.work),
            )
            held.run = self.keep(run)

    # --- the end -----------------------------------------------------------------------------------

    def finish(self, record: kit.Record) -> Path:
        """Write reports.json and the record (with the commands run) into ``out``."""
        (self.out / REPORTS_NAME).write_text(
            json.dumps(self.reports, indent=1, sort_keys=True), encoding="utf-8"
        )
        record.commands = [r.line for r in self.runs]
        return record.write(self.out)
