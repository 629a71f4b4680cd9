"""The needs file: what each collected test needs, written by a worker, read by the controller.

xdist's controller collects nothing; its workers do, and only they can evaluate markers and
fixtures. Before a local worker sends xdist its collection, it writes one file into the session
broker's private folder (mode 0700, removed with the broker): the need of each test, in
collection order, tied to that collection by a digest of its node ids. The scheduler reads it
when the worker's collection arrives; a file that is missing, unreadable or of another
collection is no file (dispatch then leaves the run to xdist).

A file holds each distinct need once (``classes``) and one index per test (``tests``, -1 for a
test without GPU work), so it stays small for large suites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from pytest_gpushare.dispatch.order import MarkedNeed
from pytest_gpushare.units import MemRequest

__all__ = ["DispatchInput", "read_needs", "write_needs"]

VERSION = 1
#: The ``workerinput`` key under which a worker learns where to write its needs.
INPUT_KEY = "gpushare_dispatch"


class DispatchInput(TypedDict):
    """What a local worker receives when the session dispatches by memory."""

    needs_path: str


class _NeedsDoc(TypedDict):
    version: int
    digest: str
    classes: list[list[Any]]
    tests: list[int]


def digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode(), usedforsecurity=False).hexdigest()


def write_needs(path: str | os.PathLike[str], ids: Sequence[str], needs: Sequence[MarkedNeed | None]) -> None:
    """Write the needs of the tests ``ids`` (atomically: the reader never sees half a file)."""
    classes: dict[MarkedNeed, int] = {}
    tests = [-1 if n is None else classes.setdefault(n, len(classes)) for n in needs]
    doc = _NeedsDoc(
        version=VERSION,
        digest=digest(ids),
        classes=[[n.mem.bytes, n.mem.percent, n.count, n.exclusive, n.anywhere] for n in classes],
        tests=tests,
    )
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, target)


def read_needs(path: str | os.PathLike[str], ids: Sequence[str]) -> list[MarkedNeed | None] | None:
    """The needs of the tests ``ids`` from the file at ``path``; None where there is no such file
    for this collection."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if _valid(doc, ids):
            classes = [_need(c) for c in doc["classes"]]
            if all(c is not None for c in classes):
                return [None if i < 0 else classes[i] for i in doc["tests"]]
    return None


def _valid(doc: Any, ids: Sequence[str]) -> bool:
    if not isinstance(doc, dict) or doc.get("version") != VERSION or doc.get("digest") != digest(ids):
        return False
    classes, tests = doc.get("classes"), doc.get("tests")
    if not isinstance(classes, list) or not isinstance(tests, list) or len(tests) != len(ids):
        return False
    return all(type(i) is int and -1 <= i < len(classes) for i in tests)


def _need(data: Any) -> MarkedNeed | None:
    if not isinstance(data, list) or len(data) != 5:
        return None
    size, percent, count, exclusive, anywhere = data
    if type(count) is not int or count < 1 or type(exclusive) is not bool or type(anywhere) is not bool:
        return None
    if type(size) is int and size > 0 and percent is None:
        mem = MemRequest(bytes=size)
    elif size is None and type(percent) in (int, float) and 0 < percent <= 100:
        mem = MemRequest(percent=float(percent))
    else:
        return None
    return MarkedNeed(mem, count, exclusive, anywhere)
