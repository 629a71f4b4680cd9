"""The box ledger as the session's broker uses it, off the serving thread.

Owners the broker opens in the box ledger, all in the controller's process:

* the **controller's owner** (``worker_id`` ``"controller"``, no CUDA context: the controller
  never uses CUDA) holds the session's *chunks*, the memory of the pool (:mod:`.pool`);
* one **owner per connected worker** (its ``worker_id``, this process's pid) holds that worker's
  CUDA contexts and the requests the broker passes through to the box (exclusive, multi-GPU, and
  a worker's first lease on a GPU, which books its context there as any process's would). It is
  opened at the worker's first pass-through and closed when its connection closes.

A dead controller must not free what its still-running workers hold: each worker gets the
liveness descriptors of the controller's owner (with the welcome) and of its own owner (with the
grant that opened it) over the socket. ``flock`` belongs to the open file description, so the
owners stay live while any worker keeps them open, which workers do until they exit.

Everything here may wait (a ledger lock, memory), so nothing runs on the serving thread: each
growth and pass-through waits in a thread of its own with its request's deadline; releases,
closes and the running file go, in order, through one housekeeping thread. Results go back
through ``report`` as :class:`Done`. The one exception, :meth:`Box.others_waiting`, reads the
heads of the ledger files without their locks and never waits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_gpushare.broker.status import RunningDoc, remove_running, write_running
from pytest_gpushare.errors import LedgerError, ReleaseDeferred
from pytest_gpushare.ledger import Lease, Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.threads import daemon_thread

__all__ = ["DescriptorOf", "Done", "OpenLedger", "facade_descriptor"]

#: Opens the session's :class:`Ledger` for an owner with this CUDA context size (the session's
#: folder, GPUs, policy, log and usable-memory refresh are the caller's).
OpenLedger = Callable[[Owner, int], Ledger]
#: The liveness descriptor of an open ledger, to pass to workers; None where it cannot be had.
DescriptorOf = Callable[[Ledger], "int | None"]


def facade_descriptor(ledger: Ledger) -> int | None:
    """``ledger.liveness_fd()``: the descriptor that keeps the ledger's owner live."""
    return ledger.liveness_fd()


@dataclass(frozen=True)
class Done:
    """A growth (``kind`` ``"grow"``) or pass-through (``"direct"``) of request ``ticket`` of
    connection ``conn`` ended with ``lease`` or ``error``; ``fds`` are liveness descriptors for
    that worker (its own owner's, when this job opened it)."""

    ticket: str
    kind: str
    conn: int
    lease: Lease | None
    error: Exception | None
    fds: tuple[int, ...] = ()


Task = Callable[[], None]


class Box:
    """The broker's owners in the box ledger and the threads that wait on it; see the module
    docstring. ``report`` is called from those threads."""

    def __init__(
        self,
        open_ledger: OpenLedger,
        *,
        session_id: str,
        context_bytes: int,
        report: Callable[[Done], None],
        descriptor_of: DescriptorOf = facade_descriptor,
        log: Callable[[str], None],
    ) -> None:
        self.session_id = session_id
        self._open = open_ledger
        self._context_bytes = context_bytes
        self._report = report
        self._descriptor_of = descriptor_of
        self._log = log
        self.controller = open_ledger(Owner.current(session_id, "controller"), 0)
        self._workers: dict[int, Ledger] = {}
        self._closed: set[int] = set()
        self._lock = threading.Lock()  # guards the fields below; never held while waiting
        self._opening = threading.Lock()  # orders the openings of workers' owners
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._doc: RunningDoc | None = None
        self._housekeeper = daemon_thread(self._housekeep, "gpushare-broker-box")
        self._housekeeper.start()

    @property
    def gpus(self) -> Sequence[LedgerGpu]:
        return self.controller.gpus

    @property
    def folder(self) -> Path:
        return self.controller.folder

    @property
    def key(self) -> str:
        return self.controller.owner.key

    def controller_fds(self) -> list[int]:
        fd = self._descriptor_of(self.controller)
        return [] if fd is None else [fd]

    # --- jobs that wait ---------------------------------------------------------------------------

    def grow(self, ticket: str, conn: int, need: Need, label: str, timeout: float) -> None:
        """Add a chunk of ``need`` to the session's holdings, waiting up to ``timeout``."""
        self._spawn(lambda: self._grow(ticket, conn, need, label, timeout))

    def direct(
        self, ticket: str, conn: int, worker_id: str, need: Need, test_id: str, timeout: float
    ) -> None:
        """Lease ``need`` for ``test_id`` under the worker's own owner, waiting up to ``timeout``."""
        self._spawn(lambda: self._direct(ticket, conn, worker_id, need, test_id, timeout))

    def _spawn(self, job: Task) -> None:
        daemon_thread(job, "gpushare-broker-wait").start()

    def _grow(self, ticket: str, conn: int, need: Need, label: str, timeout: float) -> None:
        try:
            lease = self.controller.acquire(need, label, timeout)
        except Exception as exc:  # every failure is the request's answer, never the thread's end
            self._report(Done(ticket, "grow", conn, None, exc))
            return
        self._report(Done(ticket, "grow", conn, lease, None))

    def _direct(
        self, ticket: str, conn: int, worker_id: str, need: Need, test_id: str, timeout: float
    ) -> None:
        fds: tuple[int, ...] = ()
        try:
            ledger, opened = self._worker_ledger(conn, worker_id)
            if opened:
                fd = self._descriptor_of(ledger)
                fds = () if fd is None else (fd,)
            lease = ledger.acquire(need, test_id, timeout)
        except Exception as exc:  # every failure is the request's answer, never the thread's end
            self._report(Done(ticket, "direct", conn, None, exc, fds))
            return
        self._report(Done(ticket, "direct", conn, lease, None, fds))

    def _worker_ledger(self, conn: int, worker_id: str) -> tuple[Ledger, bool]:
        """The box owner of the worker of ``conn``, and whether it was opened just now. Opening
        waits for the ledgers' locks, so it holds only the lock that orders openings."""
        with self._opening:
            with self._lock:
                if conn in self._closed:
                    raise LedgerError(f"worker {worker_id} has disconnected")
                ledger = self._workers.get(conn)
            if ledger is not None:
                return ledger, False
            ledger = self._open(Owner.current(self.session_id, worker_id), self._context_bytes)
            with self._lock:
                if conn not in self._closed:
                    self._workers[conn] = ledger
                    return ledger, True
            self._close(ledger)
            raise LedgerError(f"worker {worker_id} has disconnected")

    # --- housekeeping, in order -------------------------------------------------------------------

    def release_chunks(self, chunks: Sequence[Lease]) -> None:
        def task() -> None:
            for chunk in chunks:
                self._try(self.controller.release, chunk, "give a chunk back")

        self._tasks.put(task)

    def release_direct(self, conn: int, lease: Lease) -> None:
        def task() -> None:
            ledger = self._workers.get(conn)
            if ledger is not None:
                self._try(ledger.release, lease, f"release the lease of {lease.test_id}")

        self._tasks.put(task)

    def close_worker(self, conn: int) -> None:
        """Drop what the worker of ``conn`` holds in the box (its contexts, its leases)."""

        def task() -> None:
            with self._lock:
                self._closed.add(conn)
                ledger = self._workers.pop(conn, None)
            if ledger is not None:
                self._close(ledger)

        self._tasks.put(task)

    def others_waiting(self, uuids: Sequence[str]) -> set[str]:
        """Which of ``uuids`` another session waits on, read without the ledgers' locks (on the
        serving thread: it never waits); none when the ledgers cannot be read."""
        try:
            return self.controller.others_waiting(uuids)
        except LedgerError as exc:
            self._log(f"gpushare: the session broker could not read the ledgers: {exc}")
            return set()

    def publish(self, doc: RunningDoc) -> None:
        """Write the session's running file (the latest document wins when writes queue up)."""
        with self._lock:
            pending = self._doc is not None
            self._doc = doc
        if not pending:
            self._tasks.put(self._write_doc)

    def _write_doc(self) -> None:
        with self._lock:
            doc, self._doc = self._doc, None
        if doc is None:
            return
        try:
            write_running(self.folder, doc)
        except OSError as exc:
            self._log(f"gpushare: could not write the session's running tests: {exc}")

    def _try(self, release: Callable[[Lease], None], lease: Lease, what: str) -> None:
        try:
            release(lease)
        except ReleaseDeferred:
            pass  # the ledger said so itself, in one line
        except LedgerError as exc:
            self._log(f"gpushare: the session broker could not {what}: {exc}")

    def _close(self, ledger: Ledger) -> None:
        try:
            ledger.close()
        except LedgerError as exc:
            self._log(f"gpushare: the session broker could not close a ledger: {exc}")

    def _housekeep(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                task()
            except Exception as exc:  # one failed chore must not stop the others
                self._log(f"gpushare: the session broker's housekeeping failed: {exc!r}")

    def close(self) -> None:
        """Finish the queued chores, then close every owner: what they held returns to the box."""
        self._tasks.put(None)
        self._housekeeper.join()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for ledger in [*workers, self.controller]:
            self._close(ledger)
        remove_running(self.folder, self.key)
