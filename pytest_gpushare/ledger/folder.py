"""The ledger folder: where it lives, who may use it, and how its files are opened, read and written.

Nothing here knows what a lease is; :mod:`.locks` locks the folder's files, :mod:`.codec` says
what is in them.

Safety rests on three habits:

* every file is opened by :func:`open_nofollow` (``O_NOFOLLOW``), and a symbolic link where one
  of our files should be is refused;
* a file is never written in place: it is written to a fresh temporary file
  (``O_CREAT | O_EXCL``) that ``os.replace`` then swaps in, so a reader, with or without the
  lock, sees the old file or the new one, never half of one (issue 3), and nothing another
  account planted can redirect the write;
* the folder itself is checked before use (:func:`open_ledger_folder`): a folder that another
  account could write to, other than a group folder made for sharing, is refused with the
  commands that fix it.

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
import functools
import grp
import os
import pwd
import secrets
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.units import MiB, format_size

__all__ = [
    "MAX_FILE_BYTES",
    "FileTooLarge",
    "LedgerFolder",
    "default_ledger_dir",
    "file_error",
    "ledger_dir_for",
    "open_ledger_folder",
    "open_nofollow",
    "prepare_ledger_dir",
    "read_file",
    "read_head",
    "remove_file",
    "remove_stale_temps",
    "set_aside",
    "symlink_refused",
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


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` as every file of the folder is opened: ``O_NOFOLLOW`` (a symbolic link in our
    place fails with ``ELOOP``), ``O_NONBLOCK`` (a FIFO planted in our place must not hang us; it
    changes nothing for a regular file) and ``O_CLOEXEC`` (a command we start inherits nothing)."""
    return os.open(path, flags | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, mode)


#: What an ``OSError`` on a file of the folder asks of the user, by errno; the others are said
#: with the system's words (:func:`file_error`).
_ERRNO_FIXES = {
    errno.ELOOP: "{path} is a symbolic link where a ledger file belongs; refusing it: rm {path}",
    errno.ENOSYS: "the filesystem of {parent} has no flock; put the ledger folder on a local one",
    errno.EACCES: "this account cannot {doing} {path}: fix its mode (chmod g+rw {path}) or remove it",
    errno.EPERM: "this account cannot {doing} {path}: fix its mode (chmod g+rw {path}) or remove it",
}


def file_error(exc: OSError, path: str | os.PathLike[str], doing: str) -> LedgerError:
    """The :class:`LedgerError` for ``exc``, raised while trying to ``doing`` (read, lock) ``path``."""
    fix = _ERRNO_FIXES.get(exc.errno or 0)
    if fix is None:
        return LedgerError(f"cannot {doing} {path}: {exc.strerror}")
    return LedgerError(fix.format(path=path, parent=os.path.dirname(path), doing=doing))


def symlink_refused(path: str | os.PathLike[str]) -> LedgerError:
    """The :class:`LedgerError` for a symbolic link found where a file of the folder belongs."""
    return file_error(OSError(errno.ELOOP, os.strerror(errno.ELOOP)), path, "open")


class FileTooLarge(Exception):
    """A file of the folder is larger than :data:`MAX_FILE_BYTES`."""


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


# --- the folder -----------------------------------------------------------------------------


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
        _make_folder(folder)
    st = _folder_stat(folder)
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise _world_writable(folder, mode)
    shared = bool(mode & stat.S_IWGRP)
    if shared:
        _check_group_folder(folder, st)
    elif st.st_uid != os.geteuid():
        make_group = _make_group(folder)
        raise LedgerError(
            f"the ledger folder {folder} belongs to {_user_name(st.st_uid)}; use a folder of your own "
            f"(GPUSHARE_LEDGER_DIR), or ask for a group folder shared by both accounts ({make_group})"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LedgerError(f"this account cannot write to the ledger folder {folder}")
    return LedgerFolder(path=folder, shared=shared, gid=st.st_gid)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger folder {folder}: {exc.strerror}") from None


def _folder_stat(folder: Path) -> os.stat_result:
    """The folder's own status (not a link's target); refuses anything but a real folder."""
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
    return st


def _make_group(folder: Path) -> str:
    return f"chgrp GROUP {folder} && chmod 2770 {folder}"


def _world_writable(folder: Path, mode: int) -> LedgerError:
    if mode & stat.S_ISVTX:
        return LedgerError(
            f"the ledger folder {folder} is a world-writable sticky folder like /tmp, where accounts "
            f"cannot replace each other's ledgers; use a folder of your own (mkdir -m 700 "
            f"{folder}/gpushare) or a group folder ({_make_group(folder)})"
        )
    return LedgerError(
        f"any account can replace the ledgers in {folder} (world-writable); fix it: chmod o-w {folder}"
    )


def _check_group_folder(folder: Path, st: os.stat_result) -> None:
    """A group-writable folder is shared only as a setgid folder without the sticky bit, owned by
    someone of the group, of a group this account is in (root may use any)."""
    mode = stat.S_IMODE(st.st_mode)
    me = os.geteuid()
    group = _group_name(st.st_gid)
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


# --- reading and writing -------------------------------------------------------------------


def read_file(folder: LedgerFolder, name: str, cap: int = MAX_FILE_BYTES) -> bytes | None:
    """The content of ``name`` in the folder, or None when it does not exist. Safe without the
    file's lock: files are replaced whole (:func:`write_file`), never written in place.

    Raises :class:`FileTooLarge` past ``cap`` bytes, and :class:`LedgerError` for a symbolic
    link or a file that :meth:`LedgerFolder.check_file` refuses.
    """
    path = os.path.join(folder.dir, name)
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise file_error(exc, path, "read") from None
    try:
        st = os.fstat(fd)
        folder.check_file(st, path)
        if st.st_size > cap:
            raise FileTooLarge(
                f"{format_size(st.st_size)}, more than the {format_size(cap)} a ledger may hold"
            )
        return _read_capped(fd, cap)
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
    tmp = folder.path / f".tmp-{tag}-{secrets.token_hex(4)}-{name}"
    try:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, folder.file_mode)
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
        fd = open_nofollow(os.path.join(folder.dir, name), os.O_RDONLY)
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
