"""What a GPU test's reports carry to the controller: its :class:`LeaseEntry`, in two halves.

The setup report carries the lease whole while the test runs, so that the controller knows what
a worker that dies holds; the teardown report carries only what the controller does not know by
then (:func:`teardown_entry`), and the controller merges the two (:func:`merged_entry`), then
takes the entry off the report: pytest's terminal reporter keeps every report to the end of the
run. A ``lease()`` block's entry travels whole in the worker's ``workeroutput``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypedDict, cast

if TYPE_CHECKING:
    from pytest_gpushare.observations import GpuObservation

__all__ = [
    "RELEASE_FIELDS",
    "REPORT_ATTR",
    "LeaseEntry",
    "compact_observation",
    "kept",
    "merged_entry",
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
    released: dict[str, Any]  # a teardown report's only word on the lease: the RELEASE_FIELDS
    observed: list[dict[str, Any]]  # what the test was seen to use, per device
    log: list[str]  # the plugin's notes on the test (waits, enforcement, ignored hook errors)


#: What the release of a lease sets in its record's dict (``LeaseRecord.to_dict``): all that a
#: teardown report says of a lease its setup report carried.
RELEASE_FIELDS = ("released_at", "held_s")


def teardown_entry(
    outcome: str | None,
    fallback: str | None,
    observed: list[dict[str, Any]],
    lease: dict[str, Any] | None,
    log: list[str],
) -> LeaseEntry:
    """A GPU test's entry on its teardown report. xdist serialises every report of every test,
    so it leaves out what the controller knows without it: an outcome of "passed" (None: every
    phase passed, as the report says itself), no fallback, no observations, no notes, and of
    ``lease`` (the record's dict, which the setup report carried when the lease was taken) all
    but the :data:`RELEASE_FIELDS`, and those too where the lease was not given back."""
    entry = LeaseEntry()
    if outcome is not None:
        entry["outcome"] = outcome
    if fallback is not None:
        entry["fallback"] = fallback
    if observed:
        entry["observed"] = observed
    if lease is not None and lease["released_at"] is not None:
        entry["released"] = {key: lease[key] for key in RELEASE_FIELDS}
    if log:
        entry["log"] = log
    return entry


def merged_entry(setup: LeaseEntry | None, teardown: LeaseEntry) -> LeaseEntry:
    """A GPU test's one entry: ``teardown`` (its teardown report's, which the function takes
    over) with the ``lease`` of ``setup`` (its setup report's, None where it carried none: no
    lease was taken), released as ``teardown`` says."""
    released = teardown.pop("released", None)
    if setup is not None and "lease" in setup:
        teardown["lease"] = {**setup["lease"], **(released or {})}
    return teardown


def kept(entry: LeaseEntry, test_id: str) -> LeaseEntry:
    """A half of an entry as the controller keeps it to the end of the run: ``test_id`` (the
    report's node id, which pytest keeps too) as its own and its lease's, and every other string
    and every key interned (each report arrives deserialised on its own, with its own copies of
    the same keys, uuids, worker ids and notes)."""
    out = cast(LeaseEntry, _interned(entry))
    out["test_id"] = test_id
    if "lease" in out:
        out["lease"]["test_id"] = test_id
    return out


def _interned(value: Any) -> Any:
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {sys.intern(k): v if k == "test_id" else _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return value


def compact_observation(observation: GpuObservation) -> dict[str, Any]:
    """An observation's dict for a report, without its fields at their defaults
    (:meth:`GpuObservation.from_dict` puts them back)."""
    fields = type(observation).__dataclass_fields__
    return {k: v for k, v in observation.to_dict().items() if v != fields[k].default}
