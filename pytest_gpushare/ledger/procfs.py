"""What the kernel says about the folder's locks and the processes that hold them (``/proc``).

Two questions no file of the folder can answer:

* **Who holds this lock?** ``/proc/locks`` lists every ``flock`` with its inode and the pid that
  took it, and ``/proc/<pid>/stat`` says whether that process is stopped (``SIGSTOP``, a
  debugger): :func:`lock_holder` turns that into words for an error message, so that a wait
  cut short by its deadline names the process that kept the lock (issue 15).
* **Does a live process keep a liveness file of this folder that was removed?** Such a process
  is a live owner whose bookings a fresh or rebuilt ledger lacks until it comes back
  (:func:`lost_owners`); the ledger then admits only restores for a grace period. The kernel
  knows: the owner still holds its exclusive ``flock`` on the removed file (so it is in
  ``/proc/locks``), and ``/proc/<pid>/fd`` names the file with `` (deleted)``.

Everything here is best effort and says so: ``/proc`` may be missing, another account's
processes may not be readable, and a process of another PID namespace is not listed at all.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["lock_holder", "lost_owners"]


def _flock_writers() -> list[tuple[int, int]] | None:
    """``(pid, inode)`` of every exclusive ``flock`` held now (waiters, marked ``->``, left out);
    None when ``/proc/locks`` cannot be read."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "WRITE":
            continue  # a waiting request reads "N: -> FLOCK ...", so parts[1] is "->"
        with contextlib.suppress(ValueError, IndexError):
            found.append((int(parts[4]), int(parts[5].rsplit(":", 1)[1])))
    return found


def _process(pid: int) -> tuple[str, str] | None:
    """The command name and state letter of ``pid`` (``/proc/<pid>/stat``), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    if not fields:
        return None
    return head.partition("(")[2], fields[0]


def lock_holder(fd: int) -> str:
    """Who holds the ``flock`` of the file open as ``fd``, in words: its pid and command, and
    whether it is stopped (then it "looks frozen"); or that it cannot be seen from here."""
    try:
        ino = os.fstat(fd).st_ino
    except OSError:
        return "a process that cannot be seen from here"
    me = os.getpid()
    pids = sorted({pid for pid, i in _flock_writers() or () if i == ino and pid != me})
    if not pids:
        return "a process that cannot be seen from here (another PID namespace, or it let go just now)"
    return "; ".join(_describe(pid) for pid in pids)


def _describe(pid: int) -> str:
    seen = _process(pid)
    if seen is None:
        return f"pid {pid}"
    comm, state = seen
    if state in ("T", "t"):
        return (
            f"pid {pid} ({comm}), which is stopped: it looks frozen; resume it (kill -CONT {pid}) or end it"
        )
    if state == "D":
        return f"pid {pid} ({comm}), which waits in the kernel (state D): it looks hung"
    return f"pid {pid} ({comm})"


def lost_owners(folder: str, *, private: bool) -> bool | None:
    """Whether a live process keeps a removed liveness file of ``folder`` open (its lock held):
    True or False, or None when the kernel cannot tell us (no ``/proc``, or, in a group folder
    (``private`` False), a lock holder of another account whose descriptors we may not read).
    A process of another account cannot own files in a private folder, so it is skipped there.
    """
    writers = _flock_writers()
    if writers is None:
        return None
    prefix = os.path.join(folder, "live-")
    unknown = False
    for pid in sorted({pid for pid, _ in writers}):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # it ended
        except OSError:
            unknown = unknown or not private
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix) and target.endswith(" (deleted)"):
                return True
    return None if unknown else False
