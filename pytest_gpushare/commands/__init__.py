"""The ``gpushare`` command (also ``python -m pytest_gpushare``): one module per subcommand.

Subcommands are imported when they are called, so ``gpushare --help`` stays fast. ``common``
holds what they share (the settings flags in either spelling); ``spawn`` runs ``gpushare run``'s
command with its signals.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pytest_gpushare import __version__

__all__ = ["entry", "main"]

USAGE = """usage: gpushare COMMAND [options]

commands:
  plan      print the VRAM analysis and worker count `pytest -n auto` would use here
  status    the live leases on this box per GPU (--json for one JSON document)
  timeline  draw a run's leases from a --gpushare-report JSON file as SVG
  run       run a command outside pytest holding a lease for as long as it lives

Run `gpushare COMMAND --help` for a command's options; `gpushare -V` (--version) for the version.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"gpushare {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "plan":
        from pytest_gpushare.commands.plan import cmd_plan

        return cmd_plan(rest)
    if command == "status":
        from pytest_gpushare.commands.status import cmd_status

        return cmd_status(rest)
    if command == "timeline":
        from pytest_gpushare.commands.timeline import cmd_timeline

        return cmd_timeline(rest)
    if command == "run":
        from pytest_gpushare.commands.run import cmd_run

        return cmd_run(rest)
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
