"""The files of the ledger folder: opened relative to the folder's descriptor, read whole or not
at all, written by atomic replacement, and set aside when they are not what they should be.

Safety rests on four habits:

* every file is opened by :func:`open_at`: relative to the checked folder's descriptor
  (:class:`~pytest_gpushare.ledger.folder.LedgerFolder`), with ``O_NOFOLLOW`` (a symbolic link
  in our place fails with ``ELOOP``) and ``O_NONBLOCK`` (a FIFO planted in our place must not
  hang us; it changes nothing for a regular file), and its status is checked on the descriptor
  before a byte is read (:func:`open_checked`);
* a file is never written in place: it is written to a fresh temporary file
  (``O_CREAT | O_EXCL``) that ``os.replace`` then swaps in, so a reader, with or without the
  lock, sees the old file or the new one, never half of one (issue 3), and nothing another
  account planted can redirect the write;
* whatever stands where a file of ours belongs but is not one (a directory, FIFO, socket or
  device, a symbolic link, a file we may not open or may not trust) raises :class:`Unusable`,
  and the caller renames it aside (:func:`set_aside`) and goes on, as with a damaged file: junk
  is never a reason for every GPU test to fail until a person acts (issue 15);
* descriptors kept open for speed elsewhere (:mod:`.probe`) are given back when the process
  runs out of them (:func:`on_descriptor_shortage`), and the open is tried again.

Rewriting in place would be cheaper on a journalling filesystem (creating a file and renaming it
over another costs hundreds of microseconds on ext4, which flushes it, ``auto_da_alloc``), and
was measured (docs/benchmarks.rst), but a reader without the lock could then catch half a write;
the atomic replace is kept.

No ``fsync``: ledgers describe live processes, and a machine that crashes takes every one of
them with it; a ledger torn by a power cut is unreadable, set aside and rebuilt like any other
damaged ledger.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger.folder import LedgerFolder
from pytest_gpushare.units import MiB, format_size

__all__ = [
    "KEEP_DAMAGED",
    "MAX_FILE_BYTES",
    "FileTooLarge",
    "Unusable",
    "create_new",
    "file_error",
    "listing",
    "on_descriptor_shortage",
    "open_at",
    "open_checked",
    "read_file",
    "read_head",
    "remove_file",
    "remove_stale_temps",
    "set_aside",
    "write_file",
]

#: No file of the folder is read beyond this size: a larger one is damage, not data.
MAX_FILE_BYTES = 1 * MiB
#: Copies of a damaged file kept for a post-mortem, per file.
KEEP_DAMAGED = 3
#: A temporary file older than this was left by a process that died while writing; a dead
#: owner's tombstone (``gone-<key>.lock``) this old has done its job.
STALE_TEMP_S = 600.0

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_T = TypeVar("_T")


class FileTooLarge(Exception):
    """A file of the folder is larger than :data:`MAX_FILE_BYTES`."""


class Unusable(Exception):
    """Something that is not a usable file stands where a file of the folder belongs; ``str()``
    says what (a directory, a FIFO, a symbolic link, "cannot be opened: Permission denied"...)."""


# --- descriptors ------------------------------------------------------------------------------

#: Functions that close descriptors kept open for speed; called when the process runs out.
_SHORTAGE_HOOKS: list[Callable[[], None]] = []


def on_descriptor_shortage(drop: Callable[[], None]) -> None:
    """Have ``drop`` called (it closes descriptors kept for speed) when an open fails with
    ``EMFILE``/``ENFILE``; the open is then tried once more."""
    _SHORTAGE_HOOKS.append(drop)


def _retrying(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    for drop in _SHORTAGE_HOOKS:
        drop()
    return call()


def open_at(folder: LedgerFolder, name: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` as every file of the folder is opened: relative to the folder's descriptor,
    ``O_NOFOLLOW``, ``O_NONBLOCK`` and ``O_CLOEXEC`` (a command we start inherits nothing)."""
    flags |= _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
    return _retrying(lambda: os.open(name, flags, mode, dir_fd=folder.fd))


def create_new(folder: LedgerFolder, name: str, flags: int = os.O_WRONLY, mode: int | None = None) -> int:
    """A descriptor of the new file ``name`` (``O_CREAT | O_EXCL``) with ``mode`` (default: the
    folder's file mode), the group's bits set in a group folder whatever the umask took. Raises
    ``OSError``."""
    mode = folder.file_mode if mode is None else mode
    fd = open_at(folder, name, flags | os.O_CREAT | os.O_EXCL, mode)
    if folder.shared:
        try:
            os.fchmod(fd, mode)  # every member needs the group's bits
        except OSError:
            os.close(fd)
            raise
    return fd


def listing(folder: LedgerFolder) -> list[str]:
    """The names in the folder."""
    return _retrying(lambda: os.listdir(folder.fd))


def open_checked(folder: LedgerFolder, name: str, flags: int, mode: int = 0o600) -> int | None:
    """A descriptor of the file ``name`` once its status proved it a file we trust, or None when
    nothing is there. Raises :class:`Unusable` for anything else in its place, and
    :class:`LedgerError` when the folder itself fails."""
    try:
        fd = open_at(folder, name, flags, mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unusable(exc, folder, name) from None
    try:
        why = folder.untrusted(os.fstat(fd))
    except OSError as exc:
        os.close(fd)
        raise file_error(exc, folder.path / name, "check") from None
    if why is not None:
        os.close(fd)
        raise Unusable(why)
    return fd


def _unusable(exc: OSError, folder: LedgerFolder, name: str) -> Exception:
    """What an ``OSError`` from opening ``name`` means: junk in our place, or a broken folder."""
    if exc.errno == errno.ELOOP:
        return Unusable("a symbolic link")
    if exc.errno == errno.EISDIR:
        return Unusable("not a regular file (a directory)")
    if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
        return Unusable("not a regular file (a FIFO)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unusable(f"cannot be opened: {exc.strerror}")
    return file_error(exc, folder.path / name, "open")


#: What an ``OSError`` on the folder asks of the user, by errno; the others are said with the
#: system's words (:func:`file_error`).
_ERRNO_FIXES = {
    errno.ENOSYS: "the filesystem of {parent} has no flock; put the ledger folder on a local one",
    errno.ENOLCK: "the filesystem of {parent} has no flock; put the ledger folder on a local one",
}


def file_error(exc: OSError, path: str | os.PathLike[str], doing: str) -> LedgerError:
    """The :class:`LedgerError` for ``exc``, raised while trying to ``doing`` (read, lock) ``path``."""
    fix = _ERRNO_FIXES.get(exc.errno or 0)
    if fix is None:
        return LedgerError(f"cannot {doing} {path}: {exc.strerror}")
    return LedgerError(fix.format(path=path, parent=os.path.dirname(path), doing=doing))


# --- reading and writing -------------------------------------------------------------------


def read_file(folder: LedgerFolder, name: str, cap: int = MAX_FILE_BYTES) -> bytes | None:
    """The content of ``name`` in the folder, or None when it does not exist. Safe without the
    file's lock: files are replaced whole (:func:`write_file`), never written in place.

    Raises :class:`FileTooLarge` past ``cap`` bytes and :class:`Unusable` for anything in its
    place that is not a file we trust (a FIFO is never read: its status is checked first).
    """
    fd = open_checked(folder, name, os.O_RDONLY)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise FileTooLarge(f"{format_size(size)}, more than the {format_size(cap)} a ledger may hold")
        return _read_capped(fd, cap)
    except OSError as exc:
        raise file_error(exc, folder.path / name, "read") from None
    finally:
        os.close(fd)


def _read_capped(fd: int, cap: int) -> bytes:
    """All of ``fd``, or :class:`FileTooLarge` past ``cap`` bytes (the file may grow while read)."""
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


def write_file(folder: LedgerFolder, name: str, data: bytes, tag: str) -> None:
    """Replace ``name`` with ``data`` atomically. ``tag`` names the writer in the temporary
    file's name, so the files a dead writer left behind can be found and removed."""
    if len(data) > MAX_FILE_BYTES:
        raise LedgerError(f"{folder.path / name} would grow past {format_size(MAX_FILE_BYTES)}; not written")
    tmp = f".tmp-{tag}-{secrets.token_hex(4)}-{name}"
    try:
        fd = create_new(folder, tmp)
    except OSError as exc:
        raise LedgerError(f"cannot write in the ledger folder {folder.path}: {exc.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder.fd)
        raise LedgerError(f"cannot write {folder.path / name}: {exc.strerror}") from None


def read_head(folder: LedgerFolder, name: str, size: int = 80) -> bytes | None:
    """The first ``size`` bytes of ``name`` (a framed file's header line), without its lock; None
    when the file is missing or cannot be read. For telling whether a file changed: a read that
    catches a write half-way returns bytes that differ, which only makes the caller look again."""
    try:
        fd = open_at(folder, name, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


# --- removing and setting aside ------------------------------------------------------------


def remove_file(folder: LedgerFolder, name: str) -> None:
    """Remove ``name`` if it is there: a link is removed, never followed; an empty directory
    too; whatever cannot be removed is left (a caller that must clear the name sets it aside)."""
    try:
        os.unlink(name, dir_fd=folder.fd)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=folder.fd)
    except OSError:
        pass


def set_aside(folder: LedgerFolder, name: str) -> str:
    """Rename a damaged ``name`` (a file, or junk in its place) to ``name.damaged-<time>`` and
    return the new name; only the newest :data:`KEEP_DAMAGED` copies of one file are kept. The
    copy keeps its owner, which names the account that wrote it."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}"
    aside = f"{name}.damaged-{stamp}"
    try:
        os.replace(name, aside, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    except FileNotFoundError:
        return aside
    except OSError as exc:
        raise LedgerError(f"cannot set the damaged {folder.path / name} aside: {exc.strerror}") from None
    copies = sorted(n for n in listing(folder) if n.startswith(f"{name}.damaged-"))
    for old in copies[:-KEEP_DAMAGED]:
        remove_file(folder, old)
    return aside


def remove_stale_temps(folder: LedgerFolder, names: Iterable[str], now: float | None = None) -> None:
    """Remove temporary files that a writer which died mid-write left behind, and old tombstones
    of dead owners (renamed, so their change time says when)."""
    now = time.time() if now is None else now
    for name in names:
        if not name.startswith((".tmp-", "gone-")):
            continue
        with contextlib.suppress(OSError):
            st = os.lstat(name, dir_fd=folder.fd)
            if now - max(st.st_mtime, st.st_ctime) > STALE_TEMP_S:
                remove_file(folder, name)
