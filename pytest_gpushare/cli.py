"""The ``gpushare`` command (also ``python -m pytest_gpushare``).

``gpushare plan`` runs pytest's own configuration (rootdir and ini discovery, ``-c``, initial
conftests and their hooks) with a plugin that prints the VRAM analysis in place of running
the session, so it gives the answer ``pytest -n auto`` would give in the same folder.
Flags are the plugin's without the ``gpushare-`` part; the plugin's spelling works too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import pytest

from pytest_gpushare import __version__
from pytest_gpushare.errors import SettingError
from pytest_gpushare.planner import Plan
from pytest_gpushare.settings import Settings

USAGE = """usage: gpushare COMMAND [options]

commands:
  plan      print the VRAM analysis and worker count `pytest -n auto` would use here
  status    the live leases on this box per GPU (--json for one JSON document)
  timeline  draw a run's leases from a --gpushare-report JSON file as SVG
  run       run a command outside pytest holding a lease for as long as it lives

Run `gpushare COMMAND --help` for a command's options.
"""


def _long_flags() -> set[str]:
    from pytest_gpushare.settings import OPTION_NAMES

    return {opt.flag for opt in OPTION_NAMES}


def translate_flags(args: Sequence[str]) -> list[str]:
    """``--simulate 24GiB`` -> ``--gpushare-simulate 24GiB``; pytest's own flags pass through,
    and so does everything after ``--`` (``gpushare run``'s command is not ours to rename)."""
    args = list(args)
    if "--" in args:
        at = args.index("--")
        return _translate(args[:at]) + args[at:]
    return _translate(args)


def _translate(args: Sequence[str]) -> list[str]:
    known = _long_flags()
    out: list[str] = []
    for arg in args:
        name, sep, value = arg.partition("=")
        candidate = "--gpushare-" + name[2:]
        if name.startswith("--") and not name.startswith("--gpushare-") and candidate in known:
            out.append(candidate + sep + value)
        else:
            out.append(arg)
    return out


class _PlanCommand:
    """Stands in for the test session: prints the analysis once pytest's configuration is ready."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> int:
        from pytest_gpushare.plugin import plan_lines

        config._do_configure()  # register markers and ini values the way a run would
        try:
            for line in plan_lines(config):
                print(line)
        finally:
            config._ensure_unconfigure()
        return 0


class _ConfigView:
    """Stands in for the test session and keeps the settings and plan pytest's configuration gives."""

    def __init__(self, want_plan: bool) -> None:
        self.want_plan = want_plan
        self.settings: Settings | None = None
        self.plan: Plan | None = None
        self.error: str | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> int:
        from pytest_gpushare.plugin import get_plan, get_settings

        try:
            self.settings = get_settings(config)
            self.plan = get_plan(config) if self.want_plan else None
        except pytest.UsageError as exc:
            self.error = str(exc)
            return int(pytest.ExitCode.USAGE_ERROR)
        return 0


def pytest_view(args: Sequence[str], *, want_plan: bool) -> tuple[Settings, Plan | None]:
    """The settings (and plan) ``pytest`` would use in this folder with ``args``: the same ini file,
    initial conftests and their hooks (reservations, probes) as a test session.

    Raises :class:`SettingError` with pytest's one-line message when they are not usable.
    """
    view = _ConfigView(want_plan)
    saved = dict(os.environ)  # what a session sets up for its tests (CUDA_DEVICE_ORDER) is not ours
    try:
        code = pytest.main(["-p", "no:cacheprovider", *args], plugins=[view])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if view.settings is None:
        raise SettingError(view.error or f"the settings could not be read (pytest exit code {int(code)})")
    return view.settings, view.plan


def cmd_plan(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: gpushare plan [--reserve SIZE] [--safety SIZE] [--simulate SPEC] ... [pytest args]\n"
            "Prints what `pytest -n auto` would plan in this folder. Takes every --gpushare-* option\n"
            "of the plugin (with or without the gpushare- prefix) and pytest's -c, --rootdir, -p."
        )
        return 0
    code = pytest.main(translate_flags(args), plugins=[_PlanCommand()])
    return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        print(f"gpushare {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "plan":
        return cmd_plan(rest)
    if command == "status":
        from pytest_gpushare.status import cmd_status

        return cmd_status(translate_flags(rest))
    if command == "timeline":
        from pytest_gpushare.timeline import cmd_timeline

        return cmd_timeline(rest)
    if command == "run":
        from pytest_gpushare.run import cmd_run

        return cmd_run(translate_flags(rest))
    print(f"gpushare: unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
    return 2


def entry() -> int:
    """The console script: ``main`` with a closed pipe (``gpushare status --json | head``) ending
    quietly, as command line tools do."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
