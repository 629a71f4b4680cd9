"""What the session's workers may hold on each GPU: the fit model of dispatch, pure.

An xdist worker runs the tests it was sent one at a time, in order, so the most it can hold on a
GPU is the largest need among its tests sent and not yet completed there (its *hold*). A test
fits a worker when, on each GPU it would use, the holds of all workers with this one's raised
to the test's need stay within the GPU's *room*: the session's usable memory there less the
CUDA contexts its workers book (what the broker can grant to tests).

A hold is a counter of the needs sent, so sending and completing cost O(distinct needs), not
O(tests sent).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

__all__ = ["Holds"]

W = TypeVar("W", bound=Hashable)


class Holds(Generic[W]):
    """The holds of every worker on every GPU, and their sum per GPU."""

    def __init__(self, rooms: Mapping[str, int]) -> None:
        self.rooms = dict(rooms)
        self._sum = dict.fromkeys(rooms, 0)
        self._needs: dict[W, dict[str, Counter[int]]] = {}

    def hold(self, worker: W, uuid: str) -> int:
        """What ``worker`` may hold on ``uuid``: its largest need there not yet completed."""
        needs = self._needs.get(worker, {}).get(uuid)
        return max(needs) if needs else 0

    def total(self, uuid: str) -> int:
        """The sum of every worker's hold on ``uuid``."""
        return self._sum[uuid]

    def held_by_larger(self, uuid: str, need: int) -> int:
        """What the workers that hold at least ``need`` on ``uuid`` hold there together
        (O(workers): asked only when a test is passed over)."""
        holds = (max(per[uuid]) for per in self._needs.values() if per.get(uuid))
        return sum(h for h in holds if h >= need)

    def free(self, uuid: str, kept: int = 0) -> int:
        """Room left on ``uuid`` by the holds, less ``kept`` (held back for a reserved test)."""
        return self.rooms[uuid] - self._sum[uuid] - kept

    def fits(self, worker: W, uuid: str, need: int, kept: int = 0) -> bool:
        """Whether ``worker`` may be sent a test of ``need`` bytes on ``uuid``, ``kept`` bytes
        held back there for another test."""
        held = self.hold(worker, uuid)
        return self._sum[uuid] - held + max(held, need) + kept <= self.rooms[uuid]

    def add(self, worker: W, parts: Iterable[tuple[str, int]]) -> None:
        """``worker`` was sent a test that takes ``parts`` (``(uuid, bytes)``)."""
        mine = self._needs.setdefault(worker, {})
        for uuid, need in parts:
            counter = mine.setdefault(uuid, Counter())
            before = max(counter) if counter else 0
            counter[need] += 1
            self._sum[uuid] += max(before, need) - before

    def remove(self, worker: W, parts: Iterable[tuple[str, int]]) -> None:
        """A test of ``worker`` that takes ``parts`` completed or left its queue."""
        mine = self._needs.get(worker, {})
        for uuid, need in parts:
            counter = mine[uuid]
            before = max(counter)
            counter[need] -= 1
            if not counter[need]:
                del counter[need]
            after = max(counter) if counter else 0
            self._sum[uuid] += after - before

    def forget(self, worker: W) -> None:
        """``worker`` is gone: its holds end."""
        for uuid, counter in self._needs.pop(worker, {}).items():
            if counter:
                self._sum[uuid] -= max(counter)
