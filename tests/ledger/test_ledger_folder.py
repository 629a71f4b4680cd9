"""The ledger folder: where it lives, which folders and files are refused as unsafe, and how its
files are written whole and read without a lock."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import ledger_support
import pytest
from ledger_support import need

from pytest_gpushare.errors import LeaseTimeout, LedgerError
from pytest_gpushare.ledger import default_ledger_dir, prepare_ledger_dir
from pytest_gpushare.ledger import folder as ledger_folder
from pytest_gpushare.ledger.access import ledger_name, lock_name
from pytest_gpushare.ledger.codec import frame
from pytest_gpushare.ledger.files import MAX_FILE_BYTES, read_file, read_head, write_file
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.handle import Ledger

IS_ROOT = os.geteuid() == 0


folder = pytest.fixture(ledger_support.folder)
make = pytest.fixture(ledger_support.make)


def test_default_folder_is_private_under_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    path = prepare_ledger_dir(default_ledger_dir())
    assert path == runtime / "pytest-gpushare"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_default_folder_falls_back_to_the_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_runtime = tmp_path / "run"
    shared_runtime.mkdir()
    shared_runtime.chmod(0o777)  # not a private folder: not used
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared_runtime))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(ledger_folder, "SHM", tmp_path / "no-shm")  # no memory file system either
    assert default_ledger_dir() == tmp_path / f"pytest-gpushare-{os.geteuid()}"


def test_default_folder_is_on_dev_shm_without_a_private_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    if not (ledger_folder.SHM.is_dir() and ledger_folder.is_tmpfs(ledger_folder.SHM)):
        pytest.skip("no tmpfs at /dev/shm on this box")
    assert default_ledger_dir() == ledger_folder.SHM / f"pytest-gpushare-{os.geteuid()}"
    not_tmpfs = tmp_path / "shm"
    not_tmpfs.mkdir()
    monkeypatch.setattr(ledger_folder, "SHM", not_tmpfs)  # a disk folder at that place is not used
    assert default_ledger_dir().parent == Path(tempfile.gettempdir())


def test_tmpfs_is_told_by_the_longest_mount_point(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\ntmpfs /mnt/my\\040disk tmpfs rw 0 0\n"
    )
    assert ledger_folder.is_tmpfs(Path("/dev/shm/x"), mounts)
    assert not ledger_folder.is_tmpfs(Path("/dev/shmother"), mounts)
    assert ledger_folder.is_tmpfs(Path("/mnt/my disk/y"), mounts)
    assert not ledger_folder.is_tmpfs(Path("/home"), mounts)
    assert not ledger_folder.is_tmpfs(Path("/home"), tmp_path / "missing")


def test_a_missing_folder_is_created_private(folder: Path) -> None:
    assert prepare_ledger_dir(folder) == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(LedgerError, match=f"symbolic link; point at the real folder \\({real}\\)"):
        prepare_ledger_dir(tmp_path / "link")


@pytest.mark.parametrize(
    ("mode", "fix"),
    [
        (0o777, "chmod o-w"),
        (0o1777, "world-writable sticky folder"),
        (0o770, "chmod g\\+s"),
        (0o3770, "chmod -t"),
    ],
)
def test_folders_others_could_redirect_are_refused(folder: Path, mode: int, fix: str) -> None:
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(LedgerError, match=fix):
        prepare_ledger_dir(folder)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a folder to another account")
def test_a_folder_of_another_account_is_refused(folder: Path) -> None:
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(LedgerError, match=r"belongs to .*uid 65534"):
        prepare_ledger_dir(folder)


def test_a_group_folder_makes_group_writable_files_whatever_the_umask(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    folder.mkdir()
    folder.chmod(0o2770)
    assert open_ledger_folder(folder).shared
    old = os.umask(0o077)
    try:
        ledger = make()
        ledger.acquire(need(1), "t", 1)
    finally:
        os.umask(old)
    names = [n for n in os.listdir(folder) if not n.startswith(".")]
    assert {n.split("-")[0] for n in names} == {"gpu", "live"}
    for name in names:
        st = (folder / name).stat()
        # Liveness files are the owner's alone to write: others read them and probe their lock.
        assert stat.S_IMODE(st.st_mode) == (0o640 if name.startswith("live-") else 0o660), name
        assert st.st_gid == folder.stat().st_gid


def test_private_folder_files_are_private(folder: Path, make: Callable[..., Ledger]) -> None:
    make().acquire(need(1), "t", 1)
    for name in os.listdir(folder):
        assert stat.S_IMODE((folder / name).stat().st_mode) & 0o077 == 0, name


JUNK: dict[str, Callable[[Path], None]] = {
    "symlink": lambda path: path.symlink_to(path.parent.parent / "elsewhere"),
    "directory": lambda path: path.mkdir(),
    "fifo": os.mkfifo,
}


@pytest.mark.parametrize("which", ["json", "lock"])
@pytest.mark.parametrize("junk", JUNK)
def test_junk_in_place_of_a_ledger_file_is_set_aside(
    folder: Path, make: Callable[..., Ledger], which: str, junk: str
) -> None:
    """A link, directory or FIFO where a ledger or lock file belongs is renamed aside with a log
    line, never followed, opened for reading or refused (every GPU test would error until a
    person acts, issue 15)."""
    prepare_ledger_dir(folder)
    target = folder.parent / "elsewhere"
    target.write_text("{}")
    name = ledger_name("GPU-0") if which == "json" else lock_name("GPU-0")
    JUNK[junk](folder / name)
    lines: list[str] = []
    ledger = make(log=lines.append)
    assert ledger.acquire(need(1), "t", 5).parts
    assert target.read_text() == "{}"
    assert (folder / name).is_file() and not (folder / name).is_symlink()
    (aside,) = [n for n in os.listdir(folder) if n.startswith(name + ".damaged-")]
    assert any(aside in line and "moved it to" in line for line in lines), lines


def test_a_ledger_file_others_can_write_is_set_aside_and_rebuilt(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    make().acquire(need(6), "kept", 1)
    (folder / ledger_name("GPU-0")).chmod(0o666)
    lines: list[str] = []
    other = make(worker="gw1", log=lines.append)
    (repaired,) = [line for line in lines if "unreadable (writable by every account)" in line]
    assert "rebuilt it from the" in repaired
    with pytest.raises(LeaseTimeout):  # the live holder's 6GiB came back from its holdings
        other.acquire(need(5), "t", 0.1)
    assert stat.S_IMODE((folder / ledger_name("GPU-0")).stat().st_mode) == 0o600


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file to another account")
def test_a_file_of_another_account_in_a_private_folder_is_set_aside(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    make().acquire(need(1), "t", 1)
    os.chown(folder / ledger_name("GPU-0"), 65534, 65534)
    lines: list[str] = []
    make(worker="gw1", log=lines.append)
    assert any("owned by" in line and "uid 65534" in line and "moved it to" in line for line in lines), lines
    assert (folder / ledger_name("GPU-0")).stat().st_uid == os.geteuid()


def test_writes_past_the_size_cap_are_refused(folder: Path) -> None:
    checked = open_ledger_folder(folder)
    with pytest.raises(LedgerError, match="would grow past"):
        write_file(checked, "x.json", b" " * (MAX_FILE_BYTES + 1), "t")
    assert not os.listdir(folder)


def test_files_are_replaced_whole_and_read_without_the_lock(folder: Path) -> None:
    checked = open_ledger_folder(folder)
    assert read_head(checked, "x.json") is None
    assert read_file(checked, "x.json") is None
    whole = frame("LEDGER", b"x" * 200, 5)
    write_file(checked, "x.json", whole, "t")
    assert read_head(checked, "x.json") == whole[:80]
    assert read_file(checked, "x.json") == whole
    assert os.listdir(folder) == ["x.json"]  # no temporary file is left behind


def test_a_folder_swapped_for_a_symlink_after_opening_cannot_redirect_writes(
    tmp_path: Path, folder: Path, make: Callable[..., Ledger]
) -> None:
    """Issue 15: the folder was checked only when opened; a symlink put in its place afterwards
    redirected every write. Files are opened relative to the folder held open, and the swap is
    noticed and refused."""
    ledger = make()
    lease = ledger.acquire(need(2), "t", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.rename(tmp_path / "moved")
    folder.symlink_to(elsewhere)
    with pytest.raises(LedgerError, match="symbolic link"):
        ledger.acquire(need(1), "t2", 1)
    with pytest.raises(LedgerError):
        ledger.release(lease)
    assert os.listdir(elsewhere) == []


def test_a_folder_under_a_world_writable_parent_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    """Any account could rename the folder away and put its own in its place."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(
        LedgerError, match=rf"{parent} is world-writable without the sticky bit; fix it: chmod \+t"
    ):
        prepare_ledger_dir(parent / "ledgers")
    parent.chmod(0o1777)  # like /tmp: only an entry's owner may rename it
    assert prepare_ledger_dir(parent / "ledgers") == parent / "ledgers"
