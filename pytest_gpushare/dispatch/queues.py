"""What each xdist worker was sent and has not completed: its queue, pure.

xdist's worker runs the tests it was sent one at a time, in order, and starts one only with the
next one in hand (or once told that nothing more will come). A :class:`WorkerQueue` keeps the
tests in that order with what dispatch expects of them, and places them on the time axis for
the fit model (:func:`~.fit.lane`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from pytest_gpushare.dispatch.fit import Lane, Parts, lane

__all__ = ["Sent", "WorkerQueue"]


@dataclass(frozen=True)
class Sent:
    """One test sent to a worker."""

    index: int
    parts: Parts  # where it was placed: (uuid, bytes) for each GPU it takes
    duration: float  # expected (for unknown durations, the guess when it was sent)
    known: bool = True  # its duration is known from an earlier run
    forced: bool = False  # sent although it did not fit: it may wait for memory


@dataclass
class WorkerQueue:
    """One worker: its home GPU, whether it runs GPU tests, and its queue."""

    home: str | None
    gpu: bool = True  # it is sent GPU tests
    queue: deque[Sent] = field(default_factory=deque)
    queued_s: float = 0.0  # the expected duration of the whole queue
    closing: bool = False  # told to shut down: it is sent nothing more
    since: float | None = None  # when its first test started, as far as dispatch knows

    def startable(self) -> bool:
        """Whether xdist's worker can run its first test: it holds the next one, or it closes."""
        return bool(self.queue) and (len(self.queue) >= 2 or self.closing)

    def append(self, sent: Sent) -> None:
        self.queue.append(sent)
        self.queued_s += sent.duration

    def take_out(self, indices: Collection[int]) -> list[Sent]:
        """Takes the tests ``indices`` out of the queue (completed, or given back) and returns
        them; once its first is out, the next starts when xdist's worker can start it."""
        wanted = set(indices)
        if self.queue and self.queue[0].index in wanted:
            self.since = None
        if len(wanted) == 1 and self.queue and self.queue[0].index in wanted:
            gone = [self.queue.popleft()]
        else:
            gone = [s for s in self.queue if s.index in wanted]
            self.queue = deque(s for s in self.queue if s.index not in wanted)
        for sent in gone:
            self.queued_s -= sent.duration
        return gone

    def lane(self, now: float) -> Lane:
        """The queue on the time axis at ``now`` (a first test that can start is taken to have
        started when this is first asked after it could)."""
        if self.since is None and self.startable():
            self.since = now
        tests = [(s.parts, s.duration if s.known else None) for s in self.queue]
        return lane(tests, self.since, now, closing=self.closing)
