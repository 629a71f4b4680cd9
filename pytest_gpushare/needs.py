"""What each test asks for: whether it is a GPU test of the plugin (its role) and its validated
need, as :mod:`~pytest_gpushare.testhooks` leases it and the memory-aware dispatch reads it.

Markers are validated once per distinct marker: a module's ``pytestmark`` is the same for each
of its tests; and each test's role and need are worked out once, kept in its stash (a test is
asked at its setup, at its predecessor's teardown and by the dispatch). The runtime's types load
with the first GPU test (start-up stays lean).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.fixtures import Role, gpu_role, plugin_fixture
from pytest_gpushare.session import get_settings, suite_gpu_marker

if TYPE_CHECKING:
    from pytest_gpushare.ledger import Need
    from pytest_gpushare.runtime import GpuNeed, Runtime

__all__ = ["TestNeeds"]

#: A test's role, its closest ``gpu`` marker and whether it takes the plugin's fixture.
_SEEN_KEY = pytest.StashKey["tuple[Role | None, pytest.Mark | None, bool]"]()
_NEED_KEY = pytest.StashKey["tuple[GpuNeed, bool] | SettingError"]()
_PLACED_KEY = pytest.StashKey["tuple[Role, GpuNeed, bool] | None"]()


class TestNeeds:
    """The roles and needs of a session's tests."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._suite_marker: bool | None = None
        #: Validated markers by their arguments. Only good markers are kept; a bad one fails each
        #: test naming it.
        self._needs: dict[tuple[Any, ...], GpuNeed] = {}
        #: The same by the marker object (a module's ``pytestmark`` is one object for all its
        #: tests), which is kept with its need so that its id is not reused.
        self._by_mark: dict[int, tuple[pytest.Mark, GpuNeed]] = {}

    def role(self, item: pytest.Item) -> Role | None:
        return self._seen(item)[0]

    def _seen(self, item: pytest.Item) -> tuple[Role | None, pytest.Mark | None, bool]:
        """``item``'s role, closest ``gpu`` marker and whether it takes the plugin's fixture:
        what its role and its need are both made of, looked up once."""
        try:
            return item.stash[_SEEN_KEY]
        except KeyError:
            pass
        if self._suite_marker is None:  # asked once conftests are in: they may register it
            self._suite_marker = suite_gpu_marker(self.config) is not None
        marker = item.get_closest_marker("gpu")
        takes_fixture = plugin_fixture(item)
        role = gpu_role(marker, takes_fixture, self._suite_marker, get_settings(self.config).adopt_marker)
        seen = item.stash[_SEEN_KEY] = (role, marker, takes_fixture)
        return seen

    def need(self, item: pytest.Item) -> tuple[GpuNeed, bool]:
        """What GPU test ``item`` needs and whether it takes ``gpu``/``gpus``; a bad marker raises
        :class:`SettingError`."""
        found = item.stash.get(_NEED_KEY, None)
        if found is None:
            try:
                found = self._work_out(item)
            except SettingError as exc:
                found = exc
            item.stash[_NEED_KEY] = found
        if isinstance(found, SettingError):
            raise found
        return found

    def _work_out(self, item: pytest.Item) -> tuple[GpuNeed, bool]:
        from pytest_gpushare.runtime import GpuNeed, need_from_marker

        _, marker, takes_fixture = self._seen(item)
        default = get_settings(self.config).default_mem
        if marker is None:
            return GpuNeed(mem=default), True
        known = self._by_mark.get(id(marker))
        if known is not None and known[0] is marker:
            return known[1], takes_fixture
        # Types count: True == 1, but mem=True is a bad marker where mem=1 is a good one.
        key = (
            tuple((type(a), a) for a in marker.args),
            tuple(sorted((k, type(v), v) for k, v in marker.kwargs.items())),
        )
        source = f"the marker on {item.nodeid}"
        try:
            need = self._needs.get(key)
        except TypeError:  # an unhashable argument: validated every time
            return need_from_marker(marker.args, dict(marker.kwargs), default, source), takes_fixture
        if need is None:
            need = self._needs[key] = need_from_marker(marker.args, dict(marker.kwargs), default, source)
        self._by_mark[id(marker)] = (marker, need)
        return need, takes_fixture

    def placed(self, item: pytest.Item) -> tuple[Role, GpuNeed, bool] | None:
        """``item``'s role, need, and whether its lease may go to any GPU (it takes ``gpu`` or
        ``gpus`` and is fully ours: a suite's own bare marker stays on the home GPU); None for
        no GPU test or a bad marker (which fails the test at setup). Asked of every test at
        collection (dispatch) and of each next test at a teardown: kept in its stash."""
        try:
            return item.stash[_PLACED_KEY]
        except KeyError:
            pass
        found: tuple[Role, GpuNeed, bool] | None = None
        role = self.role(item)
        if role is not None:
            try:
                need, takes_fixture = self.need(item)
            except SettingError:
                pass
            else:
                found = (role, need, takes_fixture and role == "ours")
        item.stash[_PLACED_KEY] = found
        return found

    def asks(self, item: pytest.Item | None, runtime: Runtime, *, guest: bool) -> Need | None:
        """What ``item`` will ask ``runtime``'s lessor for, where it is a GPU test whose role is
        the guest's (``guest``) or ours and whose marker is good; None otherwise."""
        found = None if item is None else self.placed(item)
        if found is None or (found[0] == "guest") != guest:
            return None
        _, need, anywhere = found
        return runtime.ledger_need(need, anywhere=anywhere)
