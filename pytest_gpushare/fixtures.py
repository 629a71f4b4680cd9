"""What the plugin holds for one test, which tests are its GPU tests, and the ``gpu``/``gpus``
fixtures.

plugin.py registers this module for its fixtures; :mod:`~pytest_gpushare.testhooks` sets and
clears each test's :class:`ItemState` and takes its lease.

Which tests are the plugin's (SPEC "Coexisting"), by :func:`gpu_role`:

* ``ours``: a ``gpu`` marker with arguments, a bare one (unless the suite registers its own
  ``gpu`` marker and ``gpushare_adopt_marker`` is off), or the plugin's own ``gpu``/``gpus``
  fixture (a suite's fixture of that name, or a ``gpus`` parameter, wins as pytest says);
* ``guest``: a bare marker the suite registered itself: leased the default memory where a GPU
  can serve it, never skipped, failed or moved to the CPU;
* None: everything else; the plugin does nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pytest

from pytest_gpushare.errors import GpuShareError

if TYPE_CHECKING:  # loaded with the first GPU test, not with the plugin
    from pytest_gpushare.enforce import Enforcement
    from pytest_gpushare.runtime import GpuLease, Grant

__all__ = ["STATE_KEY", "ItemState", "Role", "gpu", "gpu_role", "gpus", "plugin_fixture"]

Role = Literal["ours", "guest"]


@dataclass
class ItemState:
    """What the plugin holds for one test while pytest runs it."""

    grant: Grant | None = None  # None: no GPU test, or not leased (yet)
    guest: bool = False  # a bare marker the suite registered itself: never skipped or failed
    enforcement: Enforcement | None = None  # the cap of --gpushare-enforce, undone at release
    observed: list[dict[str, Any]] = field(default_factory=list)  # what it used, per device
    outcome: str | None = None  # the first phase that did not pass: "failed", "skipped", "error"


STATE_KEY = pytest.StashKey[ItemState]()


def plugin_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` takes the plugin's own ``gpu`` or ``gpus`` fixture: one of the suite's
    (or a ``gpus`` parameter from ``pytest_generate_tests``) wins, as pytest resolves it."""
    names = getattr(item, "fixturenames", ())
    info = getattr(item, "_fixtureinfo", None)
    for name, ours in (("gpu", _gpu_fixture), ("gpus", _gpus_fixture)):
        if name not in names:
            continue
        defs = info.name2fixturedefs.get(name) if info is not None else None
        if not defs or defs[-1].func is ours:
            return True
    return False


def gpu_role(marker: pytest.Mark | None, takes_fixture: bool, suite_marker: bool, adopt: bool) -> Role | None:
    """Whether a test is a GPU test of the plugin (see the module docstring), from its closest
    ``gpu`` marker and whether it takes the plugin's fixture (:func:`plugin_fixture`).

    ``suite_marker``: the suite registers its own ``gpu`` marker; ``adopt``:
    ``gpushare_adopt_marker`` hands its bare markers to the plugin.
    """
    if (marker is not None and (marker.args or marker.kwargs)) or takes_fixture:
        return "ours"
    if marker is None:
        return None
    return "guest" if suite_marker and not adopt else "ours"


def _granted(request: pytest.FixtureRequest) -> list[GpuLease]:
    state = request.node.stash.get(STATE_KEY, None)
    if state is None or state.grant is None:
        raise GpuShareError("gpushare: no lease for this test (is the plugin disabled for it?)")
    return list(state.grant.gpus)


def _gpu_fixture(request: pytest.FixtureRequest) -> GpuLease:
    """The :class:`GpuLease` of the running test (its first device when ``count > 1``)."""
    return _granted(request)[0]


def _gpus_fixture(request: pytest.FixtureRequest) -> list[GpuLease]:
    """One :class:`GpuLease` per device of the running test, in the order it should use them."""
    return _granted(request)


# Registered under their names; the plain functions stay reachable, so that a test can tell the
# plugin's fixtures from a suite's own of the same name (:func:`plugin_fixture`).
gpu = pytest.fixture(name="gpu")(_gpu_fixture)
gpus = pytest.fixture(name="gpus")(_gpus_fixture)
