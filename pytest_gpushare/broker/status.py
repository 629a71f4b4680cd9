"""Each broker session's running tests, for ``gpushare status``: a small file per session in the
ledger folder, ``broker-<controller key>.json``.

The box ledger shows a broker session as its controller's chunks (and each worker's CUDA
contexts and passed-through leases), not test by test. So the broker's serving thread keeps a
list of the session's running tests and waiting requests, and the housekeeping thread writes it
here, at most every :data:`pytest_gpushare.broker.engine.PUBLISH_S` and only when it changed.
This is no box-ledger write: no lock, nothing any grant reads. The file is replaced atomically
(a reader never sees half of it); its temporary name, ``.tmp-<key>-broker``, is one the ledger
already sweeps away when its owner is dead.

A reader trusts a file only while its controller's owner is live in the box ledger (the ledger
reclaims dead owners whenever it is read); files of dead controllers are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypedDict

__all__ = [
    "RunningDoc",
    "RunningLease",
    "RunningWait",
    "live_owner_keys",
    "read_running",
    "remove_running",
    "running_doc",
    "running_lease",
    "running_name",
    "write_running",
]

VERSION = 1
_NAME = re.compile(r"^broker-([0-9]{1,10}-[0-9a-f]{8,64})\.json$")
#: Larger files are not ours: a session with thousands of workers stays far below.
_MAX_BYTES = 4 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class RunningLease(TypedDict):
    """A running test's lease: ``parts`` are ``[uuid, bytes]``; ``route`` is ``"pool"`` (inside
    the session's chunks) or ``"direct"`` (a box-ledger lease of the worker's own owner, which
    status also finds in the ledger: count its bytes once)."""

    lease_id: str
    test_id: str
    worker_id: str
    parts: list[list[Any]]
    taken_at: float
    route: str


class RunningWait(TypedDict):
    test_id: str
    worker_id: str
    need: str
    since: float


class RunningDoc(TypedDict):
    version: int
    session_id: str
    controller_key: str
    pid: int
    written_at: float
    leases: list[RunningLease]
    waiting: list[RunningWait]


def running_lease(
    lease_id: str, test_id: str, worker_id: str, parts: list[tuple[str, int]], taken_at: float, route: str
) -> RunningLease:
    wire: list[list[Any]] = [[u, n] for u, n in parts]
    return RunningLease(
        lease_id=lease_id, test_id=test_id, worker_id=worker_id, parts=wire, taken_at=taken_at, route=route
    )


def running_doc(
    session_id: str, controller_key: str, leases: list[RunningLease], waiting: list[RunningWait]
) -> RunningDoc:
    """The running file's document of this process's session, as of now."""
    return RunningDoc(
        version=VERSION,
        session_id=session_id,
        controller_key=controller_key,
        pid=os.getpid(),
        written_at=time.time(),
        leases=leases,
        waiting=waiting,
    )


def running_name(key: str) -> str:
    return f"broker-{key}.json"


def write_running(folder: Path, doc: RunningDoc, mode: int = 0o644) -> None:
    """Replace the session's file with ``doc`` (raises OSError)."""
    key = doc["controller_key"]
    tmp = folder / f".tmp-{key}-broker"
    data = json.dumps(doc, separators=(",", ":")).encode()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, folder / running_name(key))


def remove_running(folder: Path, key: str) -> None:
    for name in (running_name(key), f".tmp-{key}-broker"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)


def live_owner_keys(status: Mapping[str, Any]) -> set[str]:
    """The owners that a :func:`pytest_gpushare.ledger.read_status` snapshot found live."""
    return {o["key"] for gpu in status.get("gpus", []) for o in gpu.get("owners", []) if "key" in o}


def read_running(
    folder: str | os.PathLike[str], live_keys: Collection[str], checked_at: float | None = None
) -> list[RunningDoc]:
    """The running files of the sessions whose controllers are in ``live_keys`` (see
    :func:`live_owner_keys`), oldest session first. Files of other controllers that are older than
    ``checked_at`` (when the live keys were taken; default now) are stale and removed; newer ones
    belong to sessions that started since and are left alone."""
    path = Path(folder)
    try:
        names = os.listdir(path)
    except OSError:
        return []
    cutoff = time.time() if checked_at is None else checked_at
    docs = []
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        if match.group(1) not in live_keys:
            _remove_if_older(path / name, cutoff)
            continue
        doc = _load(path / name)
        if doc is not None and doc["controller_key"] == match.group(1):
            docs.append(doc)
    return sorted(docs, key=lambda d: (d["written_at"], d["controller_key"]))


def _remove_if_older(path: Path, cutoff: float) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(path).st_mtime < cutoff:
            os.unlink(path)


def _load(path: Path) -> RunningDoc | None:
    """The file's document, or None when it is not a regular file of ours that parses."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_BYTES:
            return None
        data = os.read(fd, _MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if _is_doc(doc) else None


def _is_doc(doc: Any) -> bool:
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return False
    shape: dict[str, type | tuple[type, ...]] = {
        "session_id": str,
        "controller_key": str,
        "pid": int,
        "written_at": (int, float),
        "leases": list,
        "waiting": list,
    }
    if not all(isinstance(doc.get(k), t) for k, t in shape.items()):
        return False
    lease_keys = {"lease_id", "test_id", "worker_id", "parts", "taken_at", "route"}
    wait_keys = {"test_id", "worker_id", "need", "since"}
    return all(isinstance(x, dict) and lease_keys <= x.keys() for x in doc["leases"]) and all(
        isinstance(x, dict) and wait_keys <= x.keys() for x in doc["waiting"]
    )
