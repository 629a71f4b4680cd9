"""pytest-gpushare's own hooks.

Implement them in a ``conftest.py`` at the rootdir or in a plugin. The planning hooks
(:func:`pytest_gpushare_probe`, :func:`pytest_gpushare_reservations`) run in the xdist
controller (or the single pytest process) once per session, before any test is collected:
the controller loads only the *initial* conftests (those of the rootdir and of the paths on
the command line), so an implementation in a deeper ``tests/sub/conftest.py`` never reaches
the planner. Their answers travel to the workers with the plan, so workers never call them.

The lease hooks are observers, called in the process that holds the lease (an xdist worker,
or the single pytest process).

Each plugin's implementations are called through pluggy, one plugin at a time, so a failing
one can be named: hook wrappers and tracing see the calls. A plugin's wrapper wraps its own
implementation; a plugin that only wraps a hook sees one call per implementing plugin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_gpushare.gpus.model import Gpu, GpuInventory
    from pytest_gpushare.planner import Reservation
    from pytest_gpushare.runtime import GpuLease


@pytest.hookspec(firstresult=True)
def pytest_gpushare_probe(config: pytest.Config) -> GpuInventory | None:
    """Return the GPUs of this box, or None to let the next implementation answer.

    :param config: the pytest config.
    :returns: a :class:`pytest_gpushare.gpus.model.GpuInventory`; ``firstresult``: the first
        implementation that returns something other than None wins.

    Called once per session in the controller. The plugin's own implementations are
    ``trylast``: the simulated GPUs of ``--gpushare-simulate`` and otherwise NVML. A plugin
    that knows another source (a ROCm box, a remote inventory) returns its own inventory.
    An implementation that raises is a usage error naming it.
    """


@pytest.hookspec
def pytest_gpushare_reservations(
    config: pytest.Config, gpus: tuple[Gpu, ...]
) -> Iterable[Reservation] | None:
    """Return memory to hold back for other applications on these GPUs.

    :param config: the pytest config.
    :param gpus: the GPUs the probe found (``Gpu.index`` is what ``Reservation.gpu_index``
        refers to).
    :returns: an iterable of :class:`pytest_gpushare.planner.Reservation` (GPU index, bytes held
        back now, a short reason shown in the header, and optionally ``full_bytes``, what the
        application may take at full size); None or empty for nothing. Every implementation is
        called and all reservations are summed per GPU.

    Called once per session in the controller, before the worker count is decided. The plugin's
    own implementations give ``--gpushare-reserve`` and the Ollama hold. An implementation that
    raises makes the session a usage error naming the plugin and this hook: a reservation that
    silently became zero could push another application off the GPU.
    """


@pytest.hookspec
def pytest_gpushare_lease_acquired(gpus: list[GpuLease], test_id: str, waited: float) -> None:
    """A GPU test or a ``pytest_gpushare.lease()`` block got its memory.

    :param gpus: one :class:`pytest_gpushare.GpuLease` per device of the lease, as the ``gpus``
        fixture gives them.
    :param test_id: the pytest node id of the test (for ``lease()``: its name).
    :param waited: seconds spent waiting for the memory.

    Called in the process that holds the lease, right after the grant and before any fixture of
    the test runs. An implementation that raises is reported and ignored (an observer must not
    fail a test).
    """


@pytest.hookspec
def pytest_gpushare_lease_released(gpus: list[GpuLease], test_id: str, held: float) -> None:
    """A lease was given back.

    :param gpus: the same list :func:`pytest_gpushare_lease_acquired` received.
    :param test_id: the same id.
    :param held: seconds the memory was held.

    Called in the process that held the lease, after the test's teardown, in every outcome.
    An implementation that raises is reported and ignored.
    """
