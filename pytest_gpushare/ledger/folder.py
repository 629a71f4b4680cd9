"""The ledger folder: where it lives, who may use it, and how its files are read, written and locked.

Nothing here knows what a lease is; :mod:`pytest_gpushare.ledger.handle` builds on these pieces.

Safety rests on three habits:

* every file is opened with ``O_NOFOLLOW``, and a symbolic link where one of our files should be
  is refused;
* a file is never written in place: it is written to a fresh temporary file
  (``O_CREAT | O_EXCL``) that ``os.replace`` then swaps in, so a reader, with or without the
  lock, sees the old file or the new one, never half of one (issue 3), and nothing another
  account planted can redirect the write;
* the folder itself is checked before use (:func:`open_ledger_folder`): a folder that another
  account could write to, other than a group folder made for sharing, is refused with the
  commands that fix it.

Ledger files are also *framed* (:func:`frame`): a header line with the payload's length,
CRC-32 and a generation number, which :func:`unframe` checks, so damage of any kind is told
from data and set aside, and a waiter can read the header alone to see whether a ledger
changed. Rewriting in place would be cheaper on a journalling filesystem (creating a file and
renaming it over another costs hundreds of microseconds on ext4, which flushes it,
``auto_da_alloc``), and was measured (docs/benchmarks.rst), but a reader without the lock
could then catch half a write; the atomic replace is kept.

No ``fsync``: ledgers describe live processes, and a machine that crashes takes every one of
them with it; a ledger torn by a power cut is unreadable, set aside and rebuilt like any other
damaged ledger.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import grp
import os
import pwd
import re
import secrets
import stat
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.units import MiB, format_size

__all__ = [
    "MAX_FILE_BYTES",
    "BadFrame",
    "FileTooLarge",
    "LedgerFolder",
    "default_ledger_dir",
    "ledger_dir_for",
    "frame",
    "locked",
    "open_ledger_folder",
    "prepare_ledger_dir",
    "read_file",
    "read_head",
    "read_settled",
    "remove_file",
    "set_aside",
    "unframe",
    "write_file",
]

#: No file of the folder is read beyond this size: a larger one is damage, not data.
MAX_FILE_BYTES = 1 * MiB
#: Copies of a damaged file kept for a post-mortem, per file.
KEEP_DAMAGED = 3
#: A temporary file older than this was left by a process that died while writing.
STALE_TEMP_S = 600.0

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class FileTooLarge(Exception):
    """A file of the folder is larger than :data:`MAX_FILE_BYTES`."""


class BadFrame(Exception):
    """A framed file's header is missing, or its payload is cut short or does not match its
    checksum; ``str()`` says which."""


_FRAME = re.compile(rb"GPUSHARE-([A-Z]{1,20}) ([0-9]{1,9}) ([0-9a-f]{8})(?: ([0-9]{1,19}))?\n")


def frame(kind: str, payload: bytes, generation: int | None = None) -> bytes:
    """``payload`` behind a header line naming ``kind`` (``LEDGER``, ``HOLDINGS``), the payload's
    length and CRC-32, and, when given, a generation number that grows with each write."""
    head = b"GPUSHARE-%s %d %08x" % (kind.encode(), len(payload), zlib.crc32(payload))
    if generation is not None:
        head += b" %d" % generation
    return head + b"\n" + payload


def unframe(kind: str, data: bytes) -> tuple[bytes, int | None]:
    """The payload and generation of a :func:`frame`; bytes after the payload are ignored (a file
    rewritten in place may keep an older, longer tail). Raises :class:`BadFrame`."""
    match = _FRAME.match(data)
    if match is None or match.group(1) != kind.encode():
        raise BadFrame(f"no {kind.lower()} header")
    size = int(match.group(2))
    payload = data[match.end() : match.end() + size]
    if len(payload) != size:
        raise BadFrame(f"{kind.lower()} cut short ({len(payload)} of {size} bytes)")
    if b"%08x" % zlib.crc32(payload) != match.group(3):
        raise BadFrame(f"{kind.lower()} does not match its checksum")
    generation = match.group(4)
    return payload, None if generation is None else int(generation)


@dataclass(frozen=True)
class LedgerFolder:
    """A checked ledger folder.

    ``shared`` is True for a group folder (setgid, group-writable): files made there are given
    to the group with read and write for it, whatever the umask of the process says.
    """

    path: Path
    shared: bool
    gid: int

    @property
    def file_mode(self) -> int:
        return 0o660 if self.shared else 0o600

    @functools.cached_property
    def dir(self) -> str:
        """``path`` as a string: files are joined to it on every access (pathlib is slow)."""
        return str(self.path)

    def check_file(self, st: os.stat_result, path: Path | str) -> None:
        """Refuse a file that is not ours to trust: not a regular file, or writable by others."""
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"{path} is not a regular file; remove it: rm -r {path}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            raise LedgerError(f"{path} is writable by every account; fix it: chmod o-w {path}")
        if self.shared:
            if st.st_gid != self.gid:
                group = _group_name(self.gid)
                raise LedgerError(f"{path} is not in the ledger folder's group {group}: chgrp {group} {path}")
            return
        me = os.geteuid()
        if st.st_uid != me:
            raise LedgerError(
                f"{path} belongs to {_user_name(st.st_uid)}, not to {_user_name(me)} whose private ledger "
                f"folder this is; remove it: rm {path}"
            )
        if mode & stat.S_IWGRP:
            raise LedgerError(
                f"{path} is group-writable in a private ledger folder; fix it: chmod g-w {path}"
            )


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _in_group(gid: int) -> bool:
    return gid == os.getegid() or gid in os.getgroups()


def _owner_in_group(uid: int, gid: int) -> bool:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def default_ledger_dir() -> Path:
    """The account's own ledger folder: under ``$XDG_RUNTIME_DIR`` when that is a private folder
    of this account, else under the system's temporary directory (named for the uid, so accounts
    never collide there). It is created 0700 by :func:`prepare_ledger_dir`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = os.stat(runtime)
        except OSError:
            st = None
        if (
            st is not None
            and stat.S_ISDIR(st.st_mode)
            and st.st_uid == os.geteuid()
            and not stat.S_IMODE(st.st_mode) & 0o077
        ):
            return Path(runtime) / "pytest-gpushare"
    return Path(tempfile.gettempdir()) / f"pytest-gpushare-{os.geteuid()}"


def ledger_dir_for(configured: str | os.PathLike[str] | None) -> Path:
    """The ledger folder a session uses: the configured one (``--gpushare-ledger-dir``, its ini key
    or environment variable), else :func:`default_ledger_dir`. The one place this choice is made."""
    return Path(configured) if configured else default_ledger_dir()


def prepare_ledger_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (0700) when missing, check it as :func:`open_ledger_folder` does, and return it."""
    return open_ledger_folder(path).path


def open_ledger_folder(path: str | os.PathLike[str], *, create: bool = True) -> LedgerFolder:
    """Check that ``path`` is safe to keep ledgers in, creating it (0700) when missing.

    Accepted: a folder of this account that no other account can write to (private), or a group
    folder (setgid, group-writable, no sticky bit) of a group this account is in, owned by this
    account, root, or a member of that group. Anything else raises :class:`LedgerError` with a
    message that says how to fix it.
    """
    folder = Path(os.path.abspath(os.fspath(path)))
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {folder}: {exc.strerror}") from None
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise LedgerError(f"the ledger folder {folder} does not exist") from None
    except OSError as exc:
        raise LedgerError(f"cannot use the ledger folder {folder}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise LedgerError(
            f"the ledger folder {folder} is a symbolic link; point at the real folder "
            f"({os.path.realpath(folder)}) instead"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise LedgerError(f"the ledger folder {folder} is not a folder")
    mode = stat.S_IMODE(st.st_mode)
    me = os.geteuid()
    group = _group_name(st.st_gid)
    make_group = f"chgrp GROUP {folder} && chmod 2770 {folder}"
    if mode & stat.S_IWOTH:
        if mode & stat.S_ISVTX:
            raise LedgerError(
                f"the ledger folder {folder} is a world-writable sticky folder like /tmp, where accounts "
                f"cannot replace each other's ledgers; use a folder of your own (mkdir -m 700 "
                f"{folder}/gpushare) or a group folder ({make_group})"
            )
        raise LedgerError(
            f"any account can replace the ledgers in {folder} (world-writable); fix it: chmod o-w {folder}"
        )
    shared = bool(mode & stat.S_IWGRP)
    if shared:
        if mode & stat.S_ISVTX:
            raise LedgerError(
                f"the group ledger folder {folder} has the sticky bit, so accounts cannot replace each "
                f"other's ledgers there; fix it: chmod -t {folder}"
            )
        if not mode & stat.S_ISGID:
            raise LedgerError(
                f"the ledger folder {folder} is group-writable but not setgid, so its files would not stay "
                f"in group {group}; fix it: chmod g+s {folder}"
            )
        if st.st_uid not in (me, 0) and not _owner_in_group(st.st_uid, st.st_gid):
            raise LedgerError(
                f"the group ledger folder {folder} belongs to {_user_name(st.st_uid)}, who is not in its "
                f"group {group} and could redirect its files; fix it: chown root {folder}"
            )
        if st.st_uid != me and not _in_group(st.st_gid) and me != 0:
            raise LedgerError(
                f"this account is not in group {group} of the ledger folder {folder}; ask an admin to add "
                f"it (usermod -aG {group} {_user_name(me).split()[0]}) or use a folder of your own"
            )
    elif st.st_uid != me:
        raise LedgerError(
            f"the ledger folder {folder} belongs to {_user_name(st.st_uid)}; use a folder of your own "
            f"(GPUSHARE_LEDGER_DIR), or ask for a group folder shared by both accounts ({make_group})"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LedgerError(f"this account cannot write to the ledger folder {folder}")
    return LedgerFolder(path=folder, shared=shared, gid=st.st_gid)


# --- reading and writing -------------------------------------------------------------------


def _symlink_refused(path: Path | str) -> LedgerError:
    return LedgerError(f"{path} is a symbolic link where a ledger file belongs; refusing it: rm {path}")


def read_file(folder: LedgerFolder, name: str, cap: int = MAX_FILE_BYTES) -> bytes | None:
    """The content of ``name`` in the folder, or None when it does not exist.

    Raises :class:`FileTooLarge` past ``cap`` bytes, and :class:`LedgerError` for a symbolic
    link or a file that :meth:`LedgerFolder.check_file` refuses.
    """
    path = os.path.join(folder.dir, name)
    try:
        # O_NONBLOCK: a FIFO planted in our place must not hang the reader.
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_refused(path) from None
        raise LedgerError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        folder.check_file(st, path)
        if st.st_size > cap:
            raise FileTooLarge(
                f"{format_size(st.st_size)}, more than the {format_size(cap)} a ledger may hold"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = os.read(fd, cap + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise FileTooLarge(f"more than the {format_size(cap)} a ledger may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_settled(folder: LedgerFolder, name: str, kind: str, tries: int = 20) -> bytes | None:
    """The content of a framed file read *without* its lock: read again (up to ``tries`` times)
    while a write in place is caught half-way, then returned as it is (the caller's
    :func:`unframe` says what is wrong with it). None when the file does not exist."""
    data = read_file(folder, name)
    for _ in range(tries - 1):
        if data is None:
            return None
        try:
            unframe(kind, data)
            return data
        except BadFrame:
            time.sleep(0.0002)  # the writer holds the lock for well under a millisecond
        data = read_file(folder, name)
    return data


def write_file(folder: LedgerFolder, name: str, data: bytes, tag: str) -> None:
    """Replace ``name`` with ``data`` atomically. ``tag`` names the writer in the temporary
    file's name, so the files a dead writer left behind can be found and removed."""
    if len(data) > MAX_FILE_BYTES:
        raise LedgerError(f"{folder.path / name} would grow past {format_size(MAX_FILE_BYTES)}; not written")
    tmp = folder.path / f".tmp-{tag}-{secrets.token_hex(4)}-{name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, folder.file_mode)
    except OSError as exc:
        raise LedgerError(f"cannot write in the ledger folder {folder.path}: {exc.strerror}") from None
    try:
        try:
            if folder.shared:
                # The umask may have taken the group's write bit, which every member needs.
                os.fchmod(fd, folder.file_mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, folder.path / name)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LedgerError(f"cannot write {folder.path / name}: {exc.strerror}") from None


def read_head(folder: LedgerFolder, name: str, size: int = 80) -> bytes | None:
    """The first ``size`` bytes of ``name`` (a framed file's header line), without its lock; None
    when the file is missing or cannot be read. For telling whether a file changed: a read that
    catches a write half-way returns bytes that differ, which only makes the caller look again."""
    try:
        fd = os.open(os.path.join(folder.dir, name), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_file(folder: LedgerFolder, name: str) -> None:
    """Remove ``name`` if it is there (a link is removed, never followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder.path / name)


def set_aside(folder: LedgerFolder, name: str) -> str:
    """Rename a damaged ``name`` to ``name.damaged-<time>`` and return the new name; only the
    newest :data:`KEEP_DAMAGED` copies of one file are kept."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}"
    aside = f"{name}.damaged-{stamp}"
    try:
        os.replace(folder.path / name, folder.path / aside)
    except FileNotFoundError:
        return aside
    except OSError as exc:
        raise LedgerError(f"cannot set the damaged {folder.path / name} aside: {exc.strerror}") from None
    copies = sorted(n for n in os.listdir(folder.path) if n.startswith(f"{name}.damaged-"))
    for old in copies[:-KEEP_DAMAGED]:
        remove_file(folder, old)
    return aside


def remove_stale_temps(folder: LedgerFolder, names: Iterable[str], now: float | None = None) -> None:
    """Remove temporary files that a writer which died mid-write left behind."""
    now = time.time() if now is None else now
    for name in names:
        if not name.startswith(".tmp-"):
            continue
        with contextlib.suppress(OSError):
            if now - os.lstat(folder.path / name).st_mtime > STALE_TEMP_S:
                os.unlink(folder.path / name)


# --- locks ----------------------------------------------------------------------------------
#
# A free lock is taken by filelock (``FileLock.acquire(blocking=False)``: one non-blocking
# ``flock`` on the lock file, with filelock's checks for a removed or foreign lock file). filelock
# can only poll for a busy lock: each waiter wakes, tries, and sleeps again, so 15 waiters spend
# the CPU that the holder needs, and the lock goes to whoever polls at the right moment rather
# than to a waiter as soon as it is free. So a busy lock is waited for in the kernel instead: a
# helper thread opens a second descriptor of the same lock file and blocks in ``flock(LOCK_EX)``
# on it, while the caller waits on an event until its deadline. The kernel wakes the waiters when
# the holder lets go, and the descriptor that won holds the lock until it is closed. filelock
# cannot do this itself (it has no blocking acquire: it opens, tries ``LOCK_NB``, closes and
# sleeps), and its lock object cannot adopt a descriptor locked elsewhere, hence the second
# descriptor. A wait given up at its deadline leaves the thread blocked in the kernel; when it is
# granted, the thread closes its descriptor, which lets the lock go again.
#
# flock belongs to the open file description, which a forked child shares: the child closes its
# copies of the waiting descriptors (never ``LOCK_UN``, which would drop the parent's lock), as
# filelock does with its own.


class _PathLock:
    """One ledger lock of this process: a thread lock, then the kernel flock.

    One object per path per process, because flock belongs to an open file description: a second
    object on the same path would wait for the first. filelock's lock is made reentrant across
    threads (``thread_local=False``), so the thread lock is what keeps two threads apart.
    ``wait_fd`` is the descriptor that holds the lock when a kernel wait won it (None when
    filelock holds it, or nobody).
    """

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.thread_lock = threading.Lock()
        self.file_lock = FileLock(path, mode=mode, thread_local=False, fallback_to_soft=False)
        self.wait_fd: int | None = None

    def acquire(self, deadline: float) -> None:
        """Take the flock (the caller holds ``thread_lock``); :class:`Timeout` at ``deadline``."""
        while True:
            try:
                self.file_lock.acquire(blocking=False)
                return
            except Timeout:
                pass
            fd = _wait_in_kernel(self.path, deadline)
            if _guards_path(fd, self.path):
                self.wait_fd = fd
                return
            # The lock file was removed (or replaced) while we waited: our lock guards nothing.
            _close_wait_fd(fd)

    def release(self) -> None:
        fd, self.wait_fd = self.wait_fd, None
        if fd is None:
            self.file_lock.release()
        else:
            _close_wait_fd(fd)  # closing the only descriptor of the description lets the lock go


#: Descriptors opened for kernel waits (waiting, holding, or abandoned and still waiting), so a
#: forked child can close its copies; guarded across fork (see :func:`_open_wait_fd`).
_WAIT_FDS: set[int] = set()
_WAIT_GUARD = threading.Lock()


def _open_wait_fd(path: Path) -> int:
    # Opened and recorded under the guard that fork takes first, so a child never inherits a
    # descriptor it does not know of (it would keep a lock granted to it alive in the child).
    with _WAIT_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
        _WAIT_FDS.add(fd)
    return fd


def _close_wait_fd(fd: int) -> None:
    with _WAIT_GUARD:
        _WAIT_FDS.discard(fd)
        os.close(fd)


def _guards_path(fd: int, path: Path) -> bool:
    """Whether the locked descriptor ``fd`` is still the file at ``path``."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (
        stat.S_ISREG(mine.st_mode)
        and mine.st_nlink > 0
        and (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)
    )


def _wait_in_kernel(path: Path, deadline: float) -> int:
    """A descriptor of ``path`` that holds its flock, waited for in the kernel until ``deadline``."""
    if time.monotonic() >= deadline:
        raise Timeout(str(path))
    fd = _open_wait_fd(path)
    granted = threading.Event()
    guard = threading.Lock()
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            outcome["error"] = exc
        with guard:  # the caller decides "given up" or "got it" exactly once, under the same guard
            if outcome.get("abandoned"):
                _close_wait_fd(fd)
                return
            granted.set()

    try:
        threading.Thread(target=wait, name="gpushare-lock-wait", daemon=True).start()
    except BaseException:
        _close_wait_fd(fd)
        raise
    granted.wait(max(0.0, deadline - time.monotonic()))
    with guard:
        if not granted.is_set():
            outcome["abandoned"] = True
            raise Timeout(str(path))
    if "error" in outcome:
        _close_wait_fd(fd)
        raise outcome["error"]
    return fd


_LOCKS: dict[str, _PathLock] = {}
_LOCKS_GUARD = threading.Lock()


def _path_lock(folder: LedgerFolder, name: str) -> _PathLock:
    key = os.path.join(folder.dir, name)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            path = folder.path / name
            try:
                st: os.stat_result | None = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISLNK(st.st_mode):
                    raise _symlink_refused(path)
                folder.check_file(st, path)
            lock = _LOCKS[key] = _PathLock(path, folder.file_mode)
        return lock


def _take(lock: _PathLock, deadline: float) -> None:
    if not lock.thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise LedgerError(f"could not lock {lock.path}: another thread of this process holds it")
    try:
        lock.acquire(deadline)
    except Timeout:
        lock.thread_lock.release()
        raise LedgerError(
            f"could not lock {lock.path} in time: another process holds it (a stopped or hung process?)"
        ) from None
    except OSError as exc:
        lock.thread_lock.release()
        if exc.errno == errno.ELOOP:
            raise _symlink_refused(lock.path) from None
        if exc.errno == errno.ENOSYS:
            raise LedgerError(
                f"the filesystem of {lock.path.parent} has no flock; put the ledger folder on a local one"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise LedgerError(
                f"this account cannot lock {lock.path}: fix its mode (chmod g+rw {lock.path}) or remove it"
            ) from None
        raise LedgerError(f"cannot lock {lock.path}: {exc.strerror}") from None
    except BaseException:
        lock.thread_lock.release()
        raise


def _drop(lock: _PathLock) -> None:
    try:
        lock.release()
    finally:
        lock.thread_lock.release()


@contextlib.contextmanager
def locked(folder: LedgerFolder, names: Iterable[str], timeout: float) -> Iterator[None]:
    """Hold the locks of ``names`` (lock files in the folder), taken in sorted order so that two
    processes locking overlapping sets never wait on each other in a cycle."""
    deadline = time.monotonic() + timeout
    held: list[_PathLock] = []
    try:
        for name in sorted(set(names)):
            lock = _path_lock(folder, name)
            _take(lock, deadline)
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            _drop(lock)


def _forget_locks_in_child() -> None:
    # A forked child holds nothing; the parent's lock objects refuse to work there (filelock
    # raises for an inherited lock), so the child builds its own on first use. Its copies of the
    # waiting descriptors are closed, never unlocked: the parent's locks stay where they are.
    global _LOCKS_GUARD, _WAIT_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()
    for fd in _WAIT_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _WAIT_FDS.clear()
    _WAIT_GUARD = threading.Lock()


def _before_fork() -> None:
    _WAIT_GUARD.acquire()


def _after_fork_in_parent() -> None:
    _WAIT_GUARD.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forget_locks_in_child
)
