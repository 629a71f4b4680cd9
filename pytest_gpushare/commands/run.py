"""``gpushare run``: a command outside pytest holds a lease for as long as it runs.

``gpushare run --mem SIZE [--count N] [--exclusive] [--timeout S] -- COMMAND...``

``--`` is required, so that the command's own flags never pass for ours. ``--exclusive`` holds
all usable memory of each GPU (``--mem``, then optional, is the least it accepts).

1. Settings and plan are exactly what ``pytest`` would use in this folder: they are built on
   pytest's own configuration (as ``gpushare plan`` is), so the plugin's flags (``--simulate``,
   ``--ledger-dir``, ``--reserve``, ``--timeout``...; the ``--gpushare-`` spelling works too),
   the ``GPUSHARE_*`` environment, the ini file, the config file and the rootdir conftest's
   probe and reservation hooks all count, in the plugin's precedence.
2. The plan is the plugin's formula: the probe (NVML or simulated), every reservation (the
   static reserve, the Ollama hold, plugins'), the safety buffer, our lease holders' real use.
3. The lease is taken like a test's, by a ledger owner of its own (worker ``gpushare-run``,
   the command line as test id and command), waiting up to the timeout; a line on standard
   error says what it waits for once it has waited a second.
4. The command runs with ``GPUSHARE_LEASED_GPUS`` set to the leased GPUs' UUIDs and, on real
   GPUs, ``CUDA_VISIBLE_DEVICES`` set to them and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (simulated
   GPUs have no CUDA device, so the inherited ``CUDA_VISIBLE_DEVICES`` stays).
5. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the command, except
   a SIGINT, SIGQUIT or SIGHUP that the terminal sent to the whole foreground process group,
   which the command got already (a second copy would turn one Ctrl-C into "force quit" for
   many servers). Signals that ``gpushare run`` inherited as ignored stay ignored and are not
   forwarded (``nohup``, background jobs of a script). :mod:`~pytest_gpushare.commands.spawn`
   runs the command.
6. When the command ends, the lease is given back and its exit code returned (``128 + N`` when
   signal ``N`` killed it, as shells report it). If ``gpushare run`` itself is killed, even by
   SIGKILL, its lease dies with it: the command never holds the ledger's liveness lock
   (every descriptor of the ledger is close-on-exec), so the next access reclaims the lease
   while the command may still run.

Exit codes of ``gpushare run`` itself: 2 for a bad command line, a need no GPU of this box can
ever meet, or an unusable ledger folder; 3 when the wait for memory timed out (the message
names who holds the GPUs); 4 for a bad setting value; 126/127 when the command cannot be
executed / is not found; ``128 + N`` when signal ``N`` stopped the wait.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence

from pytest_gpushare.commands.common import (
    CommandParser,
    UsageError,
    add_settings_help,
    pytest_view,
    take_settings,
)
from pytest_gpushare.commands.spawn import (
    Interrupted,
    handled_signals,
    signal_name,
    signals_interrupt,
    spawn_and_wait,
)
from pytest_gpushare.credits import nvml_refresh
from pytest_gpushare.errors import GpuShareError, LeaseTimeout, LedgerError, NeverFits, SettingError
from pytest_gpushare.gpus.visible import cuda_visible_env
from pytest_gpushare.ledger import (
    Lease,
    Ledger,
    Need,
    Owner,
    holders_text,
    ledger_dir_for,
    ledger_gpus,
    prepare_ledger_dir,
)
from pytest_gpushare.planner import Plan
from pytest_gpushare.settings import Settings
from pytest_gpushare.threads import daemon_thread
from pytest_gpushare.units import parse_mem

__all__ = [
    "EXIT_NEVER_FITS",
    "EXIT_SETTING",
    "EXIT_TIMEOUT",
    "WORKER_ID",
    "child_environment",
    "cmd_run",
]

#: The worker id of ``gpushare run`` owners in the ledgers.
WORKER_ID = "gpushare-run"

EXIT_USAGE = 2
EXIT_LEDGER = 2
EXIT_NEVER_FITS = 2
EXIT_TIMEOUT = 3
EXIT_SETTING = 4
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

WAIT_NOTICE_AFTER_S = 1.0
WAIT_REPEAT_S = 30.0
#: Longer command lines are cut in the ledger (its files are size-capped).
COMMAND_CAP = 1000

USAGE = "gpushare run --mem SIZE [--count N] [--exclusive] [--timeout S] [settings] -- COMMAND..."


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="gpushare run",
        usage=USAGE,
        description=(
            "Run COMMAND holding a lease on GPU memory for as long as it lives; the exit code is the "
            "command's. The command gets GPUSHARE_LEASED_GPUS (the leased GPUs' UUIDs) and, on real "
            "GPUs, CUDA_VISIBLE_DEVICES set to them; simulated GPUs have no CUDA device, so there the "
            "inherited CUDA_VISIBLE_DEVICES stays."
        ),
        epilog=(
            "exit codes of gpushare run itself: 2 bad usage, a need no GPU can ever meet, or an unusable "
            "ledger folder; 3 timed out waiting; 4 bad setting; 126/127 command not executable/not found"
        ),
    )
    parser.add_argument("--mem", metavar="SIZE", help="memory on each GPU (a size such as 16GiB, or N%%)")
    parser.add_argument(
        "--count", metavar="N", type=int, default=1, help="number of distinct GPUs (default 1)"
    )
    parser.add_argument(
        "--exclusive", action="store_true", help="hold all usable memory of each GPU (--mem: the least)"
    )
    add_settings_help(parser)
    return parser


def _split(args: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Options before ``--`` and the command after it (None without ``--``).

    ``--`` is required: without it, the command's own flags could pass for ours.
    """
    args = list(args)
    if "--" in args:
        at = args.index("--")
        return args[:at], args[at + 1 :]
    return args, None


def child_environment(plan: Plan, lease: Lease, environ: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: ``environ`` with the leased GPUs named (see the module docstring)."""
    env = dict(environ)
    uuids = [u for u, _ in lease.parts]
    env["GPUSHARE_LEASED_GPUS"] = ",".join(uuids)
    env.update(cuda_visible_env([plan.by_uuid(u).gpu for u in uuids]))
    return env


# --- waiting ---------------------------------------------------------------------------------


class _WaitNotice:
    """Says on standard error what the lease waits for, after a second and then every 30 s."""

    def __init__(self, ledger: Ledger, need: Need) -> None:
        self._ledger = ledger
        self._need = need
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = daemon_thread(self._run, "gpushare-run-wait")

    def __enter__(self) -> _WaitNotice:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        delay = WAIT_NOTICE_AFTER_S
        while not self._stop.wait(delay):
            print(self.line(time.monotonic() - self._start), file=sys.stderr, flush=True)
            delay = WAIT_REPEAT_S

    def line(self, waited: float) -> str:
        text = f"gpushare run: waiting for {self._need.describe()} ({waited:.0f}s so far)"
        try:
            snapshot = self._ledger.snapshot()
        except (GpuShareError, OSError) as exc:
            return f"{text}; cannot read the ledgers: {exc}"
        return text + holders_text(snapshot["gpus"], exclude_owner=self._ledger.owner.key, by_command=True)


def _fail(message: str, code: int) -> int:
    print(f"gpushare run: {message}", file=sys.stderr, flush=True)
    return code


def cmd_run(args: Sequence[str]) -> int:
    """``gpushare run``: see the module docstring; returns the exit code."""
    options, command = _split(args)
    try:
        flags = take_settings(options)
        opts = _parser().parse_args(flags.rest)
    except SettingError as exc:
        return _fail(str(exc), EXIT_SETTING)
    except UsageError as exc:
        hint = "; put -- before the command" if command is None else ""
        return _fail(f"{exc}{hint} (usage: {USAGE})", EXIT_USAGE)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if not command:
        return _fail(f"no command to run after -- (usage: {USAGE})", EXIT_USAGE)
    if opts.count < 1:
        return _fail(f"--count must be at least 1: {opts.count}", EXIT_USAGE)
    if opts.mem is None and not opts.exclusive:
        return _fail(f"--mem is required (usage: {USAGE})", EXIT_USAGE)

    try:
        settings, plan = pytest_view(flags, want_plan=True)
        mem = settings.default_mem if opts.mem is None else parse_mem(opts.mem, "--mem", need_unit=True)
    except SettingError as exc:
        return _fail(str(exc), EXIT_SETTING)
    assert plan is not None
    line = shlex.join(command)
    label = line if len(line) <= COMMAND_CAP else line[: COMMAND_CAP - 1] + "…"
    need = Need(mem=mem, count=opts.count, exclusive=opts.exclusive)

    forwarded = handled_signals()
    try:
        with signals_interrupt(forwarded):
            return _run_leased(settings, plan, need, label, command, forwarded)
    except Interrupted as stop:
        return _fail(f"stopped by {signal_name(stop.signum)}", 128 + stop.signum)


def _run_leased(
    settings: Settings, plan: Plan, need: Need, label: str, command: list[str], forwarded: list[int]
) -> int:
    """Take the lease (waiting as a test would), run the command under it, give it back."""
    if not plan.gpus:
        why = plan.inventory.error or plan.inventory.source
        return _fail(f"no GPU on this box to lease ({why})", EXIT_NEVER_FITS)
    try:
        ledger = _open_ledger(settings, plan, label)
    except LedgerError as exc:
        return _fail(str(exc), EXIT_LEDGER)
    with ledger:
        try:
            with _WaitNotice(ledger, need):
                lease = ledger.acquire(need, label, settings.timeout_s)
        except NeverFits as exc:
            return _fail(exc.reason, EXIT_NEVER_FITS)
        except LeaseTimeout as exc:
            return _fail(str(exc), EXIT_TIMEOUT)
        except LedgerError as exc:
            return _fail(str(exc), EXIT_LEDGER)
        try:
            return _run_command(command, child_environment(plan, lease, os.environ), forwarded)
        finally:
            try:
                ledger.release(lease)
            except LedgerError as exc:
                _log(f"gpushare run: could not give the lease back ({exc}); closing the ledger drops it")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _open_ledger(settings: Settings, plan: Plan, label: str) -> Ledger:
    """The ledger of this run's own owner (worker ``gpushare-run``, the command as its label)."""
    folder = prepare_ledger_dir(ledger_dir_for(settings.ledger_dir))
    owner = Owner.current(uuid.uuid4().hex[:12], WORKER_ID, command=label)
    return Ledger(
        folder,
        ledger_gpus(plan),
        owner,
        context_bytes=settings.context_mem_bytes,
        policy=settings.policy,
        log=_log,
        refresh=nvml_refresh(plan, settings.ledger_dir),
    )


def _run_command(command: Sequence[str], env: Mapping[str, str], forwarded: Sequence[int]) -> int:
    """The command's exit code, or ours when it cannot be started."""
    try:
        return spawn_and_wait(command, env, forwarded)
    except FileNotFoundError:
        return _fail(f"{command[0]}: command not found", EXIT_NOT_FOUND)
    except OSError as exc:
        return _fail(f"{command[0]}: cannot run it: {exc.strerror or exc}", EXIT_NOT_EXECUTABLE)
