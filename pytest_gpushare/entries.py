"""What a GPU test's reports carry to the controller: its :class:`LeaseEntry`, in two halves.

xdist serialises every report of every test, so each half carries only what the controller does
not know without it. The setup report carries the lease while the test runs, so that the
controller knows what a worker that dies holds, in short (:func:`setup_entry`: its GPUs, wait
and start, or only its start where the worker's previous test handed the lease on; the test id
and worker are the report's own); the teardown report carries what the controller does not know
by then (:func:`teardown_entry`). The controller makes the lease's record whole again from the
setup half (:func:`kept`), merges the two (:func:`merged_entry`), then takes the entry off the
report: pytest's terminal reporter keeps every report to the end of the run. A ``lease()``
block's entry travels whole in the worker's ``workeroutput``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypedDict, cast

if TYPE_CHECKING:
    from pytest_gpushare.observations import GpuObservation
    from pytest_gpushare.runtime import LeaseRecord

__all__ = [
    "REPORT_ATTR",
    "LeaseEntry",
    "compact_observation",
    "kept",
    "merged_entry",
    "setup_entry",
    "teardown_entry",
]

#: The attribute of a GPU test's setup and teardown reports that carries its :class:`LeaseEntry`
#: (xdist serialises a report's attributes, so it reaches the controller, which takes it off
#: the report once read).
REPORT_ATTR = "gpushare"


class LeaseEntry(TypedDict, total=False):
    """What the controller collects of one lease: a GPU test's (its two halves merged) or a
    ``lease()`` block's (outcome ``"lease()"``)."""

    test_id: str
    outcome: str
    fallback: str | None  # how a test (or lease() block) no GPU could serve ran: "skip", "cpu", "fail"
    lease: dict[str, Any]  # LeaseRecord.to_dict(); absent when no memory was leased
    taken: list[Any]  # a setup report's only word on the lease: [[uuid, index, bytes]...], waited_s, taken_at
    carried_at: float  # ... or its taken_at alone: the lease of the worker's previous test, handed on
    released_at: float  # a teardown report's only word on the lease (its held_s follows from it)
    observed: list[dict[str, Any]]  # what the test was seen to use, per device
    log: list[str]  # the plugin's notes on the test (waits, enforcement, ignored hook errors)


def setup_entry(record: LeaseRecord) -> LeaseEntry:
    """A GPU test's entry on its setup report: its lease in short (``taken``), or where the
    worker's previous test handed it on only when this test took it (``carried_at``: the GPUs are
    the previous lease's, the wait 0 s), which :func:`kept` makes the record's dict
    (``LeaseRecord.to_dict``) again. The test id and the worker are the report's own, and nothing
    is released yet."""
    if record.carried:
        return LeaseEntry(carried_at=record.taken_at)
    return LeaseEntry(taken=[[list(p) for p in record.parts], round(record.waited_s, 4), record.taken_at])


def teardown_entry(
    outcome: str | None,
    fallback: str | None,
    observed: list[dict[str, Any]],
    released_at: float | None,
    log: list[str],
) -> LeaseEntry:
    """A GPU test's entry on its teardown report. It leaves out what the controller knows
    without it: an outcome of "passed" (None: every phase passed, as the report says itself), no
    fallback, no observations (a test on simulated GPUs has none: the controller writes their
    "not measurable"), no notes, and of the lease, which the setup report carried when it was
    taken, all but when it was given back (None: it was not)."""
    entry = LeaseEntry()
    if outcome is not None:
        entry["outcome"] = outcome
    if fallback is not None:
        entry["fallback"] = fallback
    if observed:
        entry["observed"] = observed
    if released_at is not None:
        entry["released_at"] = released_at
    if log:
        entry["log"] = log
    return entry


def merged_entry(setup: LeaseEntry | None, teardown: LeaseEntry) -> LeaseEntry:
    """A GPU test's one entry: ``teardown`` (its teardown half, which the function takes over)
    with the ``lease`` of ``setup`` (its setup half as :func:`kept` made it, None where it
    carried none: no lease was taken), released when ``teardown`` says."""
    released_at = teardown.pop("released_at", None)
    if setup is not None and "lease" in setup:
        lease = teardown["lease"] = setup["lease"]
        if released_at is not None:
            # As LeaseRecord.to_dict rounds it, from the same two floats.
            lease["released_at"] = released_at
            lease["held_s"] = round(released_at - lease["taken_at"], 4)
    return teardown


def kept(entry: LeaseEntry, test_id: str, worker: str, previous: list[dict[str, Any]] | None) -> LeaseEntry:
    """A half of an entry as the controller keeps it to the end of the run, from the report of
    ``test_id`` (the report's node id, which pytest keeps too) that ``worker`` ran: a setup
    half's lease as its record's dict, and every other string interned (each report arrives
    deserialised on its own, with its own copies of the same uuids and notes). ``previous``: the
    ``gpus`` of the lease that ``worker``'s last setup half named, which a carried lease holds
    (the list is shared: a lease's ``gpus`` is never changed)."""
    out: dict[str, Any] = {"test_id": test_id}
    for key, value in cast(dict[str, Any], entry).items():
        if key == "taken":
            parts, waited_s, taken_at = value
            gpus = [{"uuid": sys.intern(uuid), "index": index, "bytes": size} for uuid, index, size in parts]
            out["lease"] = _lease(test_id, worker, gpus, waited_s, taken_at)
        elif key == "carried_at":
            out["lease"] = _lease(test_id, worker, previous or [], 0.0, value)
        else:
            out[key] = value if key == "released_at" else _interned(value)
    return cast(LeaseEntry, out)


def _lease(
    test_id: str, worker: str, gpus: list[dict[str, Any]], waited_s: float, taken_at: float
) -> dict[str, Any]:
    """The dict of ``LeaseRecord.to_dict`` of a lease not given back yet."""
    return {
        "test_id": test_id,
        "worker": worker,
        "gpus": gpus,
        "waited_s": waited_s,
        "taken_at": taken_at,
        "released_at": None,
        "held_s": None,
    }


def _interned(value: Any) -> Any:
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {sys.intern(k): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return value


def compact_observation(observation: GpuObservation) -> dict[str, Any]:
    """An observation's dict for a report, without its fields at their defaults
    (:meth:`GpuObservation.from_dict` puts them back)."""
    fields = type(observation).__dataclass_fields__
    return {k: v for k, v in observation.to_dict().items() if v != fields[k].default}
