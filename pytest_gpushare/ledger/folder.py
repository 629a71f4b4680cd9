"""The ledger folder: where it lives, who may use it, and the descriptor every file is opened through.

Nothing here knows what a lease is; :mod:`.files` reads and writes the folder's files,
:mod:`.locks` locks them, :mod:`.codec` says what is in them.

The folder is checked once, when it is opened (:func:`open_ledger_folder`): a folder that
another account could write to, other than a group folder made for sharing, is refused with the
commands that fix it, and so is a folder under a parent where any account could move it away and
put its own in its place (world-writable without the sticky bit). The check would be worth
little if the path were looked up again at every access: a folder swapped for a symbolic link
afterwards would redirect every write. So the checked folder is held open (:attr:`LedgerFolder.fd`)
and every file is opened relative to that descriptor (``openat``), never by its full path; the
path is only looked at again to notice that the folder was removed or replaced
(:meth:`LedgerFolder.moved`), which the ledger answers by checking the path anew.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pytest_gpushare.errors import LedgerError

__all__ = [
    "SHM",
    "LedgerFolder",
    "default_ledger_dir",
    "is_tmpfs",
    "ledger_dir_for",
    "open_ledger_folder",
    "prepare_ledger_dir",
    "user_name",
]

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, eq=False)
class LedgerFolder:
    """A checked ledger folder, held open.

    ``fd`` is a descriptor of the folder as it was checked: files are opened relative to it
    (:mod:`.files`). ``shared`` is True for a group folder (setgid, group-writable): files made
    there are given to the group with read and write for it, whatever the umask of the process
    says. ``ident`` is the folder's ``(st_dev, st_ino)``. :meth:`close` gives the descriptor back.
    """

    path: Path
    shared: bool
    gid: int
    fd: int
    ident: tuple[int, int]

    @property
    def file_mode(self) -> int:
        return 0o660 if self.shared else 0o600

    @functools.cached_property
    def dir(self) -> str:
        """``path`` as a string (pathlib is slow where a path is built on every access)."""
        return str(self.path)

    def moved(self) -> bool:
        """Whether the path no longer names this folder: it was removed, renamed or replaced."""
        try:
            st = os.lstat(self.dir)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    def untrusted(self, st: os.stat_result) -> str | None:
        """Why a file of the folder with status ``st`` is not ours to trust, or None when it is:
        not a regular file, or writable by others than the folder's users."""
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({_kind(st.st_mode)})"
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            return "writable by every account"
        if self.shared:
            if st.st_gid != self.gid:
                return f"not in the ledger folder's group {_group_name(self.gid)}"
            return None
        if st.st_uid != os.geteuid():
            return f"owned by {user_name(st.st_uid)} in a private ledger folder"
        if mode & stat.S_IWGRP:
            return "group-writable in a private ledger folder"
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> LedgerFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


def user_name(uid: int) -> str:
    """``name (uid N)``, or ``uid N`` for an account without a name."""
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


# --- where the folder is ------------------------------------------------------------------


#: The usual memory file system of Linux, for every account (sticky, like /tmp).
SHM = Path("/dev/shm")
_MOUNTS = Path("/proc/self/mounts")


def default_ledger_dir() -> Path:
    """The account's own ledger folder, on a memory file system where there is one (SPEC "Ledger
    folder"): every ledger write is a file replaced under a lock, and on a disk file system each
    costs a journal commit, on tmpfs only a page-cache copy.

    Under ``$XDG_RUNTIME_DIR`` when that is a private folder of this account (a tmpfs on systemd
    boxes), else under :data:`SHM` when it is a tmpfs, else under the system's temporary directory
    (the last two named for the uid, so accounts never collide there). It is created 0700 by
    :func:`prepare_ledger_dir`."""
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
    name = f"pytest-gpushare-{os.geteuid()}"
    if SHM.is_dir() and is_tmpfs(SHM):
        return SHM / name
    return Path(tempfile.gettempdir()) / name


def is_tmpfs(path: Path, mounts: Path = _MOUNTS) -> bool:
    """Whether ``path`` lies on a tmpfs, by the mount table (the longest mount point above it)."""
    try:
        table = mounts.read_text()
        target = os.path.realpath(path)
    except OSError:
        return False
    best, kind = "", ""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind == "tmpfs"


def ledger_dir_for(configured: str | os.PathLike[str] | None) -> Path:
    """The ledger folder a session uses: the configured one (``--gpushare-ledger-dir``, its ini key
    or environment variable), else :func:`default_ledger_dir`. The one place this choice is made."""
    return Path(configured) if configured else default_ledger_dir()


def prepare_ledger_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (0700) when missing, check it as :func:`open_ledger_folder` does, and return it."""
    with open_ledger_folder(path) as folder:
        return folder.path


# --- the check ----------------------------------------------------------------------------


def open_ledger_folder(path: str | os.PathLike[str], *, create: bool = True) -> LedgerFolder:
    """Check that ``path`` is safe to keep ledgers in, creating it (0700) when missing, and hold
    it open; the caller closes the :class:`LedgerFolder` it gets.

    Accepted: a folder of this account that no other account can write to (private), or a group
    folder (setgid, group-writable, no sticky bit) of a group this account is in, owned by this
    account, root, or a member of that group; in both cases under parents where no account can
    replace it (none world-writable without the sticky bit). Anything else raises
    :class:`LedgerError` with a message that says how to fix it.
    """
    folder = Path(os.path.abspath(os.fspath(path)))
    if create:
        _make_folder(folder)
    _check_parents(folder)
    fd = _open_folder(folder)
    try:
        st = os.fstat(fd)
        shared = _check_folder(folder, st)
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
            raise LedgerError(f"this account cannot write to the ledger folder {folder}")
    except BaseException:
        os.close(fd)
        raise
    return LedgerFolder(path=folder, shared=shared, gid=st.st_gid, fd=fd, ident=(st.st_dev, st.st_ino))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger folder {folder}: {exc.strerror}") from None


def _open_folder(folder: Path) -> int:
    """A descriptor of the folder itself (a symbolic link is refused, not followed)."""
    try:
        return os.open(folder, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        raise LedgerError(f"the ledger folder {folder} does not exist") from None
    except OSError as exc:
        if os.path.islink(folder):
            raise LedgerError(
                f"the ledger folder {folder} is a symbolic link; point at the real folder "
                f"({os.path.realpath(folder)}) instead"
            ) from None
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise LedgerError(f"the ledger folder {folder} is not a folder") from None
        raise LedgerError(f"cannot use the ledger folder {folder}: {exc.strerror}") from None


def _check_parents(folder: Path) -> None:
    """Refuse a folder that any account could move away and replace: one under a world-writable
    parent without the sticky bit (the sticky bit, as on /tmp, lets only its owner rename it)."""
    parent = Path(os.path.realpath(folder.parent))
    for above in (parent, *parent.parents):
        try:
            st = os.stat(above)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise LedgerError(
                f"any account can move the ledger folder {folder} away and put its own in its place: "
                f"{above} is world-writable without the sticky bit; fix it: chmod +t {above} "
                f"(or chmod o-w {above})"
            )


def _check_folder(folder: Path, st: os.stat_result) -> bool:
    """Check the folder's own status; True for a group folder."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise _world_writable(folder, mode)
    shared = bool(mode & stat.S_IWGRP)
    if shared:
        _check_group_folder(folder, st)
    elif st.st_uid != os.geteuid():
        raise LedgerError(
            f"the ledger folder {folder} belongs to {user_name(st.st_uid)}; use a folder of your own "
            f"(GPUSHARE_LEDGER_DIR), or ask for a group folder shared by both accounts "
            f"({_make_group(folder)})"
        )
    return shared


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
            f"the group ledger folder {folder} belongs to {user_name(st.st_uid)}, who is not in its "
            f"group {group} and could redirect its files; fix it: chown root {folder}"
        )
    if st.st_uid != me and not _in_group(st.st_gid) and me != 0:
        raise LedgerError(
            f"this account is not in group {group} of the ledger folder {folder}; ask an admin to add "
            f"it (usermod -aG {group} {user_name(me).split()[0]}) or use a folder of your own"
        )
