"""``gpushare timeline REPORT [-o FILE]``: draw a ``--gpushare-report`` JSON file as SVG."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_gpushare.timeline import render_svg

__all__ = ["cmd_timeline"]


def _arguments(args: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpushare timeline",
        description="Draw the leases of a run per GPU over time from a --gpushare-report JSON file.",
    )
    parser.add_argument("report", metavar="REPORT", help="the JSON file --gpushare-report wrote")
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="where to write the SVG (default: REPORT with .svg suffix)"
    )
    return parser.parse_args(list(args))


def cmd_timeline(args: list[str]) -> int:
    """``gpushare timeline REPORT [-o FILE]``: write the SVG and print its path; 2 on bad input."""
    try:
        options = _arguments(args)
    except SystemExit as exc:  # argparse has printed usage or help already
        return exc.code if isinstance(exc.code, int) else 2
    source = Path(options.report)
    if options.output is not None:
        target = Path(options.output)
    elif source.suffix == ".svg":
        target = source.with_name(source.name + ".svg")  # never write over the report itself
    else:
        target = source.with_suffix(".svg")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"cannot read {source}: {exc}")
    try:
        svg = render_svg(json.loads(text))
    except json.JSONDecodeError as exc:
        return _fail(f"{source} is not JSON: {exc}")
    except RecursionError:  # json.loads recurses once per level of nesting
        return _fail(f"{source} is nested too deeply to be a report")
    except ValueError as exc:
        return _fail(f"{source}: {exc}")
    try:
        target.write_text(svg, encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {target}: {exc}")
    print(target)
    return 0


def _fail(message: str) -> int:
    print(f"gpushare timeline: {message}", file=sys.stderr)
    return 2
