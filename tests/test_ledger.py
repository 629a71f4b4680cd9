"""The lease ledger, one rule at a time, on real files (tests/test_ledger_processes.py runs the
multi-process tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_gpushare.errors import LeaseTimeout, LedgerError, NeverFits
from pytest_gpushare.ledger.access import lock_name
from pytest_gpushare.ledger.admission import Fit, evaluate, never_fits, place
from pytest_gpushare.ledger.folder import (
    KEEP_DAMAGED,
    MAX_FILE_BYTES,
    frame,
    open_ledger_folder,
    read_settled,
    unframe,
    write_file,
)
from pytest_gpushare.ledger.handle import (
    ALIVE_MAX_AGE_S,
    FULL_CHECK_S,
    Ledger,
    LedgerGpu,
    Need,
    Owner,
    default_ledger_dir,
    ledger_name,
    prepare_ledger_dir,
    read_status,
    waiting_lines,
)
from pytest_gpushare.ledger.liveness import HoldingsUnreadable, live_name, probe_alive, read_holdings
from pytest_gpushare.ledger.records import (
    BOOKING_FIELDS,
    CONTEXT,
    LEDGER_FRAME,
    TEST,
    Booking,
    GpuState,
    OwnerRecord,
    Waiter,
    dump_gpu_state,
    parse_gpu_state,
)
from pytest_gpushare.units import GiB, MemRequest, MiB

WORKER = Path(__file__).parent / "ledger_workers" / "worker.py"
IS_ROOT = os.geteuid() == 0


def gpu(n: int = 0, total: int = 16 * GiB, usable: int = 10 * GiB, capacity: int | None = None) -> LedgerGpu:
    return LedgerGpu(f"GPU-{n}", n, f"Sim {n}", total, usable if capacity is None else capacity, usable)


def need(size: float = 1, **kw: Any) -> Need:
    return Need(MemRequest(bytes=int(size * GiB)), **kw)


def state_of(folder: Path, uuid: str = "GPU-0") -> GpuState:
    """The GPU's ledger as a reader without the lock sees it (one that catches a write in place
    half-way reads again)."""
    data = read_settled(open_ledger_folder(folder, create=False), ledger_name(uuid), LEDGER_FRAME)
    assert data is not None, f"no ledger for {uuid}"
    return parse_gpu_state(data, uuid)


def leases_in(folder: Path, uuid: str = "GPU-0") -> list[Booking]:
    """The test leases (not the contexts) that the GPU's ledger file lists."""
    return [b for b in state_of(folder, uuid).bookings if b.kind == TEST]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "ledgers"


@pytest.fixture
def make(folder: Path) -> Iterator[Callable[..., Ledger]]:
    """Open ledgers in ``folder`` (one owner each, like separate processes) and close them after."""
    opened: list[Ledger] = []

    def factory(
        gpus: list[LedgerGpu] | None = None,
        session: str = "s1",
        worker: str = "gw0",
        context: int = 0,
        **kw: Any,
    ) -> Ledger:
        ledger = Ledger(folder, gpus or [gpu()], Owner.current(session, worker), context_bytes=context, **kw)
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        # Some tests break the folder on purpose; the liveness lock goes whatever close says.
        with contextlib.suppress(LedgerError):
            ledger.close()


class Spawned:
    """A worker process (tests/ledger_workers/worker.py) and its stdout events."""

    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), role, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def event(self, timeout: float = 30) -> dict[str, Any]:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        assert result and result[0], f"no event from worker {self.proc.args[2]} within {timeout}s"
        return json.loads(result[0])  # type: ignore[no-any-return]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def spawn() -> Iterator[Callable[[str, dict[str, Any]], Spawned]]:
    procs: list[Spawned] = []

    def factory(role: str, cfg: dict[str, Any]) -> Spawned:
        procs.append(Spawned(role, cfg))
        return procs[-1]

    yield factory
    for p in procs:
        p.finish()


def hold_cfg(folder: Path, size: float, gpus: list[LedgerGpu] | None = None, **kw: Any) -> dict[str, Any]:
    gpus = gpus or [gpu()]
    return {
        "folder": str(folder),
        "gpus": [g.__dict__ for g in gpus],
        "need": {"bytes": int(size * GiB), **kw.pop("need", {})},
        "test_id": kw.pop("test_id", "tests/test_x.py::test_other"),
        "session": kw.pop("session", "other-session"),
        "worker": kw.pop("worker", "gw7"),
        **kw,
    }


# --- the folder ---------------------------------------------------------------------------------


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
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert default_ledger_dir() == tmp_path / f"pytest-gpushare-{os.geteuid()}"


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
        assert stat.S_IMODE(st.st_mode) == 0o660, name
        assert st.st_gid == folder.stat().st_gid


def test_private_folder_files_are_private(folder: Path, make: Callable[..., Ledger]) -> None:
    make().acquire(need(1), "t", 1)
    for name in os.listdir(folder):
        assert stat.S_IMODE((folder / name).stat().st_mode) & 0o077 == 0, name


@pytest.mark.parametrize("which", ["json", "lock"])
def test_a_symlink_in_place_of_a_ledger_file_is_refused(
    folder: Path, make: Callable[..., Ledger], which: str
) -> None:
    prepare_ledger_dir(folder)
    target = folder.parent / "elsewhere"
    target.write_text("{}")
    name = ledger_name("GPU-0") if which == "json" else lock_name("GPU-0")
    (folder / name).symlink_to(target)
    with pytest.raises(LedgerError, match="symbolic link"):
        make()
    assert target.read_text() == "{}"


def test_a_fifo_in_place_of_a_ledger_is_refused_without_hanging(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    prepare_ledger_dir(folder)
    os.mkfifo(folder / ledger_name("GPU-0"))
    with pytest.raises(LedgerError, match="not a regular file"):
        make()


def test_a_ledger_file_others_can_write_is_refused(folder: Path, make: Callable[..., Ledger]) -> None:
    make().acquire(need(1), "t", 1)
    (folder / ledger_name("GPU-0")).chmod(0o666)
    with pytest.raises(LedgerError, match="chmod o-w"):
        make(worker="gw1")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file to another account")
def test_a_file_of_another_account_in_a_private_folder_is_refused(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    make().acquire(need(1), "t", 1)
    os.chown(folder / ledger_name("GPU-0"), 65534, 65534)
    with pytest.raises(LedgerError, match=r"belongs to .*uid 65534.*rm "):
        make(worker="gw1")


def test_writes_past_the_size_cap_are_refused(folder: Path) -> None:
    checked = open_ledger_folder(folder)
    with pytest.raises(LedgerError, match="would grow past"):
        write_file(checked, "x.json", b" " * (MAX_FILE_BYTES + 1), "t")
    assert not os.listdir(folder)


def test_odd_uuids_get_safe_distinct_file_names() -> None:
    names = {ledger_name("MIG-GPU-abc/1/0"), ledger_name("MIG-GPU-abc/1/1"), ledger_name("GPU-abc")}
    assert len(names) == 3
    assert all("/" not in n and n.startswith("gpu-") and n.endswith(".json") for n in names)


# --- owners and liveness ------------------------------------------------------------------------


def test_owner_current_records_the_process() -> None:
    owner = Owner.current("sess", "gw3", command="python x.py")
    assert (owner.pid, owner.session_id, owner.worker_id, owner.command) == (
        os.getpid(),
        "sess",
        "gw3",
        "python x.py",
    )
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert owner.start_time.startswith(boot + ":")
    assert owner.key.startswith(f"{os.getpid()}-")
    assert Owner.current("sess", "gw3").key != owner.key


def test_one_owner_cannot_open_two_ledgers_in_one_folder(folder: Path) -> None:
    owner = Owner.current("s", "w")
    with Ledger(folder, [gpu()], owner, context_bytes=0), pytest.raises(LedgerError, match="reuse it"):
        Ledger(folder, [gpu()], owner, context_bytes=0)


def test_a_killed_holder_is_reclaimed_at_the_next_access(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Spawned]
) -> None:
    lines: list[str] = []
    ledger = make(log=lines.append)
    other = spawn("hold", hold_cfg(folder, 8, test_id="tests/test_x.py::test_big"))
    held = other.event()
    assert held["event"] == "held"
    assert probe_alive(open_ledger_folder(folder), held["key"])
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4), "mine", 0.2)
    other.kill()
    lease = ledger.acquire(need(4), "mine", 5)
    assert lease.parts == (("GPU-0", 4 * GiB),)
    assert [b.test_id for b in leases_in(folder)] == ["mine"]
    reclaimed = [line for line in lines if "reclaimed" in line]
    assert reclaimed == [
        f"gpushare: reclaimed 8.0GiB on GPU 0 (Sim 0, GPU-0) held by test tests/test_x.py::test_big "
        f"(pid {held['pid']} on {os.uname().nodename}, session other-session, worker gw7): "
        "its process is gone"
    ]
    assert not (folder / live_name(held["key"])).exists()


def test_a_released_lease_from_another_process_frees_memory(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Spawned]
) -> None:
    other = spawn("hold", hold_cfg(folder, 8))
    assert other.event()["event"] == "held"
    ledger = make()
    waiting: list[Any] = []
    thread = threading.Thread(target=lambda: waiting.append(ledger.acquire(need(4), "mine", 20)))
    thread.start()
    deadline = time.monotonic() + 10
    while not state_of(folder).waiters:  # it waits for the other process's memory
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert other.proc.stdin is not None
    other.proc.stdin.close()
    assert other.event()["event"] == "released"
    thread.join(20)
    assert waiting and waiting[0].parts == (("GPU-0", 4 * GiB),)


def test_pid_reuse_does_not_keep_a_dead_owner_alive(folder: Path, make: Callable[..., Ledger]) -> None:
    """A record with our own pid but another start time and token is someone else: dead."""
    lines: list[str] = []
    ledger = make(log=lines.append)
    me = ledger.owner
    ghost = OwnerRecord(
        f"{me.pid}-deadbeefdeadbeef", me.pid, me.host, "boot:1", "old", "gw0", None, 10 * GiB, 1.0
    )
    state = state_of(folder)
    state.owners[ghost.key] = ghost
    state.bookings.append(Booking(f"{ghost.key}-1", ghost.key, "old::test", 9 * GiB, TEST, 1.0))
    (folder / ledger_name("GPU-0")).write_bytes(dump_gpu_state(state))
    # Its liveness file exists but nobody holds its lock: the process is gone.
    (folder / live_name(ghost.key)).write_text("")
    assert not probe_alive(open_ledger_folder(folder), ghost.key)
    ledger.acquire(need(9), "mine", 1)
    assert [b.test_id for b in leases_in(folder)] == ["mine"]
    assert any(
        "reclaimed 9.0GiB" in line and "old::test" in line and f"pid {me.pid}" in line for line in lines
    )
    assert not (folder / live_name(ghost.key)).exists()


def test_a_removed_liveness_file_is_recreated_and_bookings_restored(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    lines: list[str] = []
    mine = make(log=lines.append)
    lease = mine.acquire(need(6), "held", 1)
    (folder / live_name(mine.owner.key)).unlink()  # a temp cleaner, say
    # Until this process touches the ledger again, other processes take it for dead...
    code = "import sys; from pytest_gpushare.ledger.handle import read_status; read_status(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    assert leases_in(folder) == []
    # ...and then it proves alive again and restores what it holds.
    mine.snapshot()
    assert (folder / live_name(mine.owner.key)).exists()
    assert [b.test_id for b in leases_in(folder)] == ["held"]
    assert any("recreated" in line for line in lines)
    assert any("lacked 1 booking(s)" in line and "restored" in line for line in lines)
    mine.release(lease)


def test_a_planted_link_cannot_fake_a_live_owner(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    fake = "1-0123456789abcdef"
    # A link to a file whose lock is held (our own liveness file) must not pass for a live owner.
    (folder / live_name(fake)).symlink_to(folder / live_name(ledger.owner.key))
    assert not probe_alive(open_ledger_folder(folder), fake)


def test_an_alive_verdict_is_trusted_briefly_and_a_dead_one_never(
    folder: Path, spawn: Callable[..., Spawned]
) -> None:
    other = spawn("hold", hold_cfg(folder, 1))
    key = other.event()["key"]
    checked = open_ledger_folder(folder)
    assert probe_alive(checked, key, max_age_s=60)
    other.kill()
    # A caller that accepts an answer a minute old gets the last one: alive (the safe side).
    assert probe_alive(checked, key, max_age_s=60)
    # A caller that wants a fresh answer probes, finds it dead, and "dead" is never kept.
    assert not probe_alive(checked, key)
    assert not probe_alive(checked, key, max_age_s=60)


def test_a_killed_holder_is_reclaimed_within_the_age_of_alive_verdicts(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Spawned]
) -> None:
    ledger = make()
    other = spawn("hold", hold_cfg(folder, 8))
    assert other.event()["event"] == "held"
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4), "mine", 0.05)  # this process has just found the holder alive
    other.kill()
    killed = time.monotonic()
    assert ledger.acquire(need(4), "mine", 10).parts == (("GPU-0", 4 * GiB),)
    # Waiters look again at least every FULL_CHECK_S; the verdict is trusted ALIVE_MAX_AGE_S.
    assert time.monotonic() - killed < ALIVE_MAX_AGE_S + FULL_CHECK_S + 5


def test_a_closed_ledger_refuses_work(make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.acquire(need(1), "t", 1)


def test_threads_of_one_process_never_overcommit(make: Callable[..., Ledger]) -> None:
    ledger = make(context=256 * MiB)
    peak: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                lease = ledger.acquire(need(3), "thread::test", 10)
                peak.append(state_of(ledger.folder).booked())
                ledger.release(lease)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(peak) == 120 and max(peak) <= 10 * GiB
    assert leases_in(ledger.folder) == []


def test_holdings_are_read_whole_or_not_at_all(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.acquire(need(2), "held::test", 1)
    checked = open_ledger_folder(folder)
    holdings = read_holdings(checked, ledger.owner.key)
    assert holdings is not None and b"held::test" in holdings
    path = folder / live_name(ledger.owner.key)
    whole = path.read_bytes()
    with open(path, "r+b") as f:  # a write caught half-way: the checksum no longer matches
        f.seek(len(whole) - 5)
        f.write(b"XXXXX")
    with pytest.raises(HoldingsUnreadable, match="does not match its checksum"):
        read_holdings(checked, ledger.owner.key)
    assert read_holdings(checked, "1-0123456789abcdef") is None


def test_a_forked_child_cannot_use_the_parents_ledger(make: Callable[..., Ledger]) -> None:
    ledger = make()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ledger.snapshot()
            message = b"used it"
        except LedgerError as exc:
            message = str(exc).encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        assert b"a forked child must open its own" in f.read()
    assert ledger.acquire(need(1), "parent still works", 1).parts


# --- admission ---------------------------------------------------------------------------------


def test_leases_stay_within_usable_memory(make: Callable[..., Ledger]) -> None:
    ledger = make()
    ledger.acquire(need(4), "a", 1)
    ledger.acquire(need(4), "b", 1)
    with pytest.raises(LeaseTimeout) as info:
        ledger.acquire(need(4), "c", 0.1)
    assert "2.0GiB of 10.0GiB free, 4.0GiB needed" in str(info.value)
    assert sorted(b.test_id for b in leases_in(folder=ledger.folder)) == ["a", "b"]
    assert ledger.acquire(need(2), "d", 1).parts == (("GPU-0", 2 * GiB),)


def test_timeout_names_the_holders(make: Callable[..., Ledger]) -> None:
    holder = make(session="sessA", worker="gw2")
    holder.acquire(need(7), "tests/test_a.py::test_big", 1)
    waiter = make(worker="gw0")
    start = time.monotonic()
    with pytest.raises(LeaseTimeout) as info:
        waiter.acquire(need(4), "tests/test_b.py::test_small", 0.3)
    assert 0.3 <= time.monotonic() - start < 5
    err = info.value
    assert err.waited >= 0.3
    assert err.holders == (
        "tests/test_a.py::test_big (7.0GiB on GPU 0 (Sim 0, GPU-0), session sessA, worker gw2, "
        f"pid {os.getpid()})",
    )
    assert "tests/test_b.py::test_small: no GPU memory for 4.0GiB after waiting" in str(err)
    assert "held by: tests/test_a.py::test_big" in str(err)
    assert state_of(waiter.folder).waiters == []  # the wait is withdrawn


def test_the_first_lease_books_the_context_until_close(make: Callable[..., Ledger]) -> None:
    ledger = make(context=512 * MiB)
    first = ledger.acquire(need(4), "a", 1)
    ledger.acquire(need(4), "b", 1)
    kinds = sorted((b.kind, b.bytes) for b in state_of(ledger.folder).bookings)
    assert kinds == [(CONTEXT, 512 * MiB), (TEST, 4 * GiB), (TEST, 4 * GiB)]
    # The context counts: 8.5GiB booked, so 1.5GiB fits and 2GiB does not.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(2), "c", 0.1)
    ledger.release(first)
    assert [b.kind for b in state_of(ledger.folder).bookings].count(CONTEXT) == 1
    ledger.close()
    assert state_of(ledger.folder).bookings == []
    assert state_of(ledger.folder).owners == {}


def test_a_multi_gpu_lease_checks_each_gpu_on_its_own(make: Callable[..., Ledger]) -> None:
    gpus = [gpu(0), gpu(1)]
    filler = make(gpus, worker="gw1")
    filler.acquire(need(5, allowed=("GPU-0",)), "f0", 1)
    filler.acquire(need(5, allowed=("GPU-1",)), "f1", 1)
    ledger = make(gpus)
    # 10GiB free in total, but only 5GiB on each: a 6GiB-per-GPU request must wait.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(6, count=2), "two", 0.1)
    for uuid in ("GPU-0", "GPU-1"):  # all or nothing: nothing was booked on either GPU
        assert [b.test_id for b in leases_in(ledger.folder, uuid)] == [f"f{uuid[-1]}"]
    lease = ledger.acquire(need(5, count=2), "two", 1)
    assert sorted(u for u, _ in lease.parts) == ["GPU-0", "GPU-1"]
    assert all(size == 5 * GiB for _, size in lease.parts)


def test_needs_that_can_never_fit_fail_at_once(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0), gpu(1, usable=6 * GiB)], context=512 * MiB)
    start = time.monotonic()
    with pytest.raises(NeverFits, match="needs 3 GPUs, but only 2 can serve it"):
        ledger.acquire(need(1, count=3), "t", 60)
    with pytest.raises(NeverFits) as info:
        ledger.acquire(need(10), "big", 60)
    assert time.monotonic() - start < 5  # at once, not after the 60s timeout
    assert info.value.reason == (
        "big needs 10.0GiB, which this box can never give: "
        "GPU 0 (Sim 0, GPU-0) can give at most 9.5GiB "
        "(capacity 10.0GiB less this process's 512.0MiB CUDA context); "
        "GPU 1 (Sim 1, GPU-1) can give at most 5.5GiB "
        "(capacity 6.0GiB less this process's 512.0MiB CUDA context)"
    )
    with pytest.raises(NeverFits, match=r"7\.0GiB on each of 2 GPUs"):
        ledger.acquire(need(7, count=2), "pair", 60)
    with pytest.raises(NeverFits, match="only 1 can serve it"):
        ledger.acquire(need(1, count=2, allowed=("GPU-1",)), "t", 60)


def test_full_for_now_waits_instead_of_never(make: Callable[..., Ledger]) -> None:
    """Capacity decides "never"; memory that is merely busy makes a request wait."""
    ledger = make([gpu(0, usable=2 * GiB, capacity=10 * GiB)])
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(6), "t", 0.1)


def test_percent_needs_resolve_per_gpu(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0, total=8 * GiB, usable=6 * GiB), gpu(1, total=16 * GiB, usable=12 * GiB)])
    lease = ledger.acquire(Need(MemRequest(percent=25), count=2), "pct", 1)
    assert dict(lease.parts) == {"GPU-0": 2 * GiB, "GPU-1": 4 * GiB}


def test_exclusive_takes_all_but_the_contexts_of_live_processes(make: Callable[..., Ledger]) -> None:
    sibling = make(worker="gw1", context=1 * GiB)
    done = sibling.acquire(need(1), "warm-up", 1)
    sibling.release(done)  # an idle sibling keeps only its context
    ledger = make(context=512 * MiB)
    lease = ledger.acquire(need(1, exclusive=True), "excl", 1)
    assert lease.exclusive
    assert lease.parts == (("GPU-0", 10 * GiB - GiB - 512 * MiB),)
    # Nobody else gets memory while it holds the GPU.
    with pytest.raises(LeaseTimeout):
        sibling.acquire(Need(MemRequest(bytes=1)), "tiny", 0.1)
    ledger.release(lease)
    busy = sibling.acquire(need(1), "busy", 1)
    with pytest.raises(LeaseTimeout, match="exclusive use waits for 1 lease"):
        ledger.acquire(need(1, exclusive=True), "excl", 0.1)
    sibling.release(busy)
    assert ledger.acquire(need(1, exclusive=True), "excl", 1).exclusive


def test_the_most_conservative_live_session_sets_the_limit(make: Callable[..., Ledger]) -> None:
    generous = make(session="A")  # usable 10GiB
    careful = make([gpu(usable=6 * GiB)], session="B")
    with pytest.raises(LeaseTimeout):
        generous.acquire(need(7), "a", 0.1)
    lease = generous.acquire(need(5), "a", 1)
    with pytest.raises(LeaseTimeout):
        careful.acquire(need(2), "b", 0.1)
    assert state_of(generous.folder).limit() == 6 * GiB
    careful.close()
    assert generous.acquire(need(4), "a2", 1)
    generous.release(lease)


def test_refresh_is_asked_while_waiting(make: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_gpushare.ledger.handle as ledger_module

    monkeypatch.setattr(ledger_module, "REFRESH_S", 0.05)
    calls: list[float] = []

    def refresh() -> dict[str, int]:
        calls.append(time.monotonic())
        return {"GPU-0": 10 * GiB if len(calls) > 2 else 2 * GiB}

    ledger = make([gpu(usable=2 * GiB, capacity=10 * GiB)], refresh=refresh)
    lease = ledger.acquire(need(5), "grows", 5)
    assert lease.parts == (("GPU-0", 5 * GiB),)
    assert len(calls) == 3
    assert state_of(ledger.folder).owners[ledger.owner.key].usable_bytes == 10 * GiB


def test_a_failing_refresh_is_logged_not_raised(
    make: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytest_gpushare.ledger.handle as ledger_module

    monkeypatch.setattr(ledger_module, "REFRESH_S", 0.02)
    lines: list[str] = []

    def refresh() -> dict[str, int]:
        raise RuntimeError("NVML went away")

    ledger = make([gpu(usable=2 * GiB, capacity=10 * GiB)], refresh=refresh, log=lines.append)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.2)
    assert "gpushare: could not refresh usable memory: NVML went away" in lines


def test_release_is_idempotent_and_only_for_the_owner(make: Callable[..., Ledger]) -> None:
    ledger = make()
    other = make(worker="gw1")
    lease = ledger.acquire(need(4), "a", 1)
    with pytest.raises(ValueError, match="belongs to another owner"):
        other.release(lease)
    ledger.release(lease)
    ledger.release(lease)
    assert leases_in(ledger.folder) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("spread", "GPU-1"), ("pack", "GPU-0")],
)
def test_placement_policy(make: Callable[..., Ledger], policy: str, expected: str) -> None:
    gpus = [gpu(0, usable=6 * GiB), gpu(1, usable=10 * GiB)]
    ledger = make(gpus, policy=policy)
    assert ledger.acquire(need(4), "t", 1).parts[0][0] == expected


def test_the_preferred_gpu_wins_when_it_can_serve_now(make: Callable[..., Ledger]) -> None:
    gpus = [gpu(0, usable=6 * GiB), gpu(1, usable=10 * GiB)]
    ledger = make(gpus)
    assert ledger.acquire(need(4, prefer="GPU-0"), "home", 1).parts[0][0] == "GPU-0"
    # GPU-0 has 2GiB left: a 4GiB test goes elsewhere rather than wait.
    assert ledger.acquire(need(4, prefer="GPU-0"), "moved", 1).parts[0][0] == "GPU-1"
    # Restricted to its home GPU it waits.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(4, prefer="GPU-0", allowed=("GPU-0",)), "stuck", 0.1)


def test_multi_gpu_parts_start_with_the_preferred_gpu(make: Callable[..., Ledger]) -> None:
    ledger = make([gpu(0), gpu(1), gpu(2, usable=12 * GiB)])
    lease = ledger.acquire(need(2, count=2, prefer="GPU-1"), "t", 1)
    assert [u for u, _ in lease.parts] == ["GPU-1", "GPU-2"]


def test_bad_needs_are_value_errors(make: Callable[..., Ledger]) -> None:
    ledger = make()
    with pytest.raises(ValueError, match="count must be at least 1"):
        ledger.acquire(need(1, count=0), "t", 1)
    with pytest.raises(ValueError, match="unknown GPU"):
        ledger.acquire(need(1, allowed=("GPU-9",)), "t", 1)
    with pytest.raises(ValueError, match="policy"):
        make(policy="random")


# --- waiting and fairness -----------------------------------------------------------------------


def test_waiters_are_visible_while_they_wait(make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    lease = holder.acquire(need(8), "holder::test", 1)
    waiter = make(session="s1", worker="gw0")
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(waiter.acquire(need(4), "waiter::test", 10)))
    thread.start()
    deadline = time.monotonic() + 5
    while not holder.snapshot()["gpus"][0]["waiters"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    snap = holder.snapshot()
    json.dumps(snap)
    (w,) = snap["gpus"][0]["waiters"]
    assert (w["test_id"], w["bytes"], w["owner"]["worker_id"]) == ("waiter::test", 4 * GiB, "gw0")
    lines = waiting_lines(snap, session_id="s1", min_wait_s=0)
    assert lines == [
        f"gpushare: waiter::test (gw0) has waited {w['waited_s']:.0f}s for 4.0GiB; "
        "held by holder::test (8.0GiB, session s1)"
    ]
    assert waiting_lines(snap, session_id="other", min_wait_s=0) == []
    holder.release(lease)
    thread.join(10)
    assert outcome and state_of(holder.folder).waiters == []


def fit_on(state: GpuState, size: float, since: float, ticket: str, now: float, **kw: Any) -> Fit:
    return evaluate(
        state,
        gpu(),
        need(size, **kw),
        owner="1-aaaaaaaaaaaaaaaa",
        context_bytes=0,
        ticket=ticket,
        since=since,
        now=now,
        fair_after=2.0,
    )


def fairness_state(waiter_size: float, exclusive: bool = False) -> GpuState:
    owner = OwnerRecord("1-aaaaaaaaaaaaaaaa", 1, "h", "t", "s", "w", None, 10 * GiB, 0.0)
    state = GpuState("GPU-0", owners={owner.key: owner})
    state.bookings.append(Booking("x", owner.key, "busy", 5 * GiB, TEST, 0.0))
    state.waiters.append(
        Waiter("old", owner.key, "big", int(waiter_size * GiB), 0, 1, exclusive, since=100.0)
    )
    return state


def test_before_aging_younger_requests_pass_a_waiter() -> None:
    state = fairness_state(waiter_size=8)
    assert fit_on(state, 2, since=101.0, ticket="young", now=101.5).ok


def test_an_aged_waiter_keeps_what_it_needs_from_younger_requests() -> None:
    state = fairness_state(waiter_size=4)
    # 5GiB free; the old waiter needs 4: a 2GiB request would leave 3, a 1GiB one leaves 4.
    blocked = fit_on(state, 2, since=103.0, ticket="young", now=103.0)
    assert not blocked.ok and "kept for big" in blocked.why
    assert fit_on(state, 1, since=103.0, ticket="young", now=103.0).ok
    # Requests older than the waiter are not held back by it.
    assert fit_on(state, 2, since=99.0, ticket="older", now=103.0).ok


def test_an_aged_exclusive_waiter_blocks_every_younger_lease() -> None:
    state = fairness_state(waiter_size=1, exclusive=True)
    assert not fit_on(state, 0.001, since=103.0, ticket="young", now=103.0).ok


def test_place_and_never_fits_are_pure() -> None:
    fits = {"a": Fit(True, 1, 0, 5), "b": Fit(True, 1, 0, 9), "c": Fit(False, 1, 0, 0)}
    index = {"a": 0, "b": 1, "c": 2}
    assert place(need(1), fits, ["a", "b", "c"], "spread", index) == ["b"]
    assert place(need(1), fits, ["a", "b", "c"], "pack", index) == ["a"]
    assert place(need(1, count=3), fits, ["a", "b", "c"], "pack", index) is None
    assert never_fits(need(1), [gpu()], 0, "t") is None
    assert never_fits(need(1), [], 0, "t") == "t needs 1 GPUs, but no GPU can serve it"


# --- damage -------------------------------------------------------------------------------------


def valid_ledger(folder: Path) -> bytes:
    """The JSON document of GPU-0's ledger, without its header line."""
    return unframe(LEDGER_FRAME, (folder / ledger_name("GPU-0")).read_bytes())[0]


def framed(payload: bytes) -> bytes:
    return frame(LEDGER_FRAME, payload, 7)


def mutate(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The document changed, framed again (a well-formed file whose content is wrong)."""
    parsed = json.loads(data)
    change(parsed)
    return framed(json.dumps(parsed).encode())


def first_booking(field: str, value: Any) -> Callable[[bytes], bytes]:
    """The first booking's ``field`` set to ``value`` (bookings are rows of BOOKING_FIELDS)."""

    def change(d: dict[str, Any]) -> None:
        d["bookings"][0][BOOKING_FIELDS.index(field)] = value

    return lambda data: mutate(data, change)


def torn(data: bytes) -> bytes:
    """A rewrite in place cut short: the new header, the start of the new document, then the
    end of the old one."""
    old, new = framed(data), framed(data.replace(b'"kept::test"', b'"kept::test, renamed"'))
    return new[: len(new) // 2] + old[len(new) // 2 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda data: b"\x00\xffthis is not json",
    "empty": lambda data: b"",
    "truncated": lambda data: framed(data)[: len(data) // 2],
    "torn write": torn,
    "no header": lambda data: data,
    "not json": lambda data: framed(b"\x00\xffthis is not json"),
    "not an object": lambda data: framed(b"[1, 2, 3]"),
    "bytes as text": first_booking("bytes", "6GiB"),
    "negative bytes": first_booking("bytes", -1),
    "bool bytes": first_booking("bytes", True),
    "absurd bytes": first_booking("bytes", 10**30),
    "nan time": first_booking("taken_at", float("nan")),
    "short row": lambda data: mutate(data, lambda d: d["bookings"][0].pop()),
    "booking as object": lambda data: mutate(data, lambda d: d["bookings"].append({"bytes": 1})),
    "owners as object": lambda data: mutate(data, lambda d: d.update(owners={})),
    "owner twice": lambda data: mutate(data, lambda d: d["owners"].append(d["owners"][0])),
    "missing waiters": lambda data: mutate(data, lambda d: d.pop("waiters")),
    "unknown kind": first_booking("kind", "gift"),
    "dangling owner": lambda data: mutate(data, lambda d: d["owners"].clear()),
    "path in a key": first_booking("owner", "../../etc"),
    "other gpu": lambda data: mutate(data, lambda d: d.update(uuid="GPU-9")),
    "future version": lambda data: mutate(data, lambda d: d.update(version=99)),
    "huge": lambda data: framed(data) + b" " * MAX_FILE_BYTES,
    "deep nesting": lambda data: framed(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_ledger_is_set_aside_and_rebuilt_from_live_owners(
    folder: Path, make: Callable[..., Ledger], damage: str
) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    path = folder / ledger_name("GPU-0")
    path.write_bytes(DAMAGE[damage](valid_ledger(folder)))
    lines: list[str] = []
    ledger = make(log=lines.append)
    # The live holder's 6GiB survived the damage: 5GiB more would overcommit.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.1)
    assert ledger.acquire(need(4), "t", 1)
    assert sorted(b.test_id for b in leases_in(folder)) == ["kept::test", "t"]
    (repaired,) = [line for line in lines if "unreadable" in line]
    assert repaired.startswith("gpushare: the ledger of GPU 0 (Sim 0, GPU-0) was unreadable (")
    assert "rebuilt it from the 2 live owner(s) that use it" in repaired
    aside = [n for n in os.listdir(folder) if n.startswith(ledger_name("GPU-0") + ".damaged-")]
    assert len(aside) == 1 and aside[0] in repaired


def test_a_deleted_ledger_is_rebuilt_from_live_owners(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    (folder / ledger_name("GPU-0")).unlink()
    lines: list[str] = []
    ledger = make(log=lines.append)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(5), "t", 0.1)
    assert [b.test_id for b in leases_in(folder)] == ["kept::test"]
    assert lines == [
        "gpushare: the ledger of GPU 0 (Sim 0, GPU-0) was missing; "
        "rebuilt it from the 2 live owner(s) that use it"
    ]


def test_unreadable_holdings_of_a_live_owner_block_the_gpu_until_it_speaks(
    folder: Path, make: Callable[..., Ledger]
) -> None:
    lines: list[str] = []
    holder = make(worker="gw1", log=lines.append)
    holder.acquire(need(6), "kept::test", 1)
    with open(folder / live_name(holder.owner.key), "r+b") as f:
        f.write(b"garbage")
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    ledger = make()
    # Unknown holdings: never guess low, so nothing fits until the holder shows what it holds.
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t", 0.1)
    holder.snapshot()
    assert any("lacked 1 booking(s)" in line for line in lines)
    holdings = read_holdings(open_ledger_folder(folder), holder.owner.key)
    assert holdings is not None and json.loads(holdings)["bookings"]["GPU-0"][0][2] == "kept::test"
    assert ledger.acquire(need(4), "t", 1)
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t2", 0.1)


def test_holdings_readable_again_replace_the_placeholder(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(worker="gw1")
    holder.acquire(need(6), "kept::test", 1)
    live = folder / live_name(holder.owner.key)
    good = live.read_bytes()
    with open(live, "r+b") as f:
        f.write(b"garbage")
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    ledger = make()
    with pytest.raises(LeaseTimeout):
        ledger.acquire(need(1), "t", 0.1)  # the placeholder holds the GPU
    with open(live, "r+b") as f:  # the holdings are whole again (the owner rewrote them, say)
        f.write(good)
    assert ledger.acquire(need(4), "t", 1)
    assert sorted(b.test_id for b in leases_in(folder)) == ["kept::test", "t"]


def test_only_a_few_damaged_copies_are_kept(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make()
    for _ in range(KEEP_DAMAGED + 3):
        (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
        ledger.snapshot()
    aside = [n for n in os.listdir(folder) if ".damaged-" in n]
    assert len(aside) == KEEP_DAMAGED


# --- locks and status ---------------------------------------------------------------------------


def test_a_hung_lock_holder_fails_loudly(folder: Path, make: Callable[..., Ledger]) -> None:
    ledger = make(lock_timeout=0.3)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)",
            str(folder / lock_name("GPU-0")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerError, match=r"could not lock .* in time"):
            ledger.acquire(need(1), "t", 5)
    finally:
        holder.kill()
        holder.wait()
    assert ledger.acquire(need(1), "t", 5)


def test_status_reclaims_and_reports_in_json(
    folder: Path, make: Callable[..., Ledger], spawn: Callable[..., Spawned]
) -> None:
    live = make(session="live", worker="gw0")
    live.acquire(need(2), "tests/test_live.py::test_a", 1)
    other = spawn("hold", hold_cfg(folder, 3, test_id="tests/test_dead.py::test_b"))
    held = other.event()
    other.kill()
    lines: list[str] = []
    status = read_status(folder, log=lines.append)
    assert json.loads(json.dumps(status)) == status
    (g,) = status["gpus"]
    assert g["uuid"] == "GPU-0" and g["name"] == "Sim 0" and g["limit_bytes"] == 10 * GiB
    assert [(x["test_id"], x["bytes"], x["owner"]["session_id"]) for x in g["leases"]] == [
        ("tests/test_live.py::test_a", 2 * GiB, "live")
    ]
    (reclaimed,) = status["reclaimed"]
    assert reclaimed["test_id"] == "tests/test_dead.py::test_b"
    assert reclaimed["owner"]["pid"] == held["pid"]
    assert reclaimed["bytes"] == 3 * GiB and "its process is gone" in reclaimed["reason"]
    assert len(lines) == 1 and "tests/test_dead.py::test_b" in lines[0]
    assert g["history"][-1]["event"] == "reclaimed"
    # A second look finds nothing more to reclaim.
    assert read_status(folder)["reclaimed"] == []


def test_status_rebuilds_a_damaged_ledger_from_live_owners(folder: Path, make: Callable[..., Ledger]) -> None:
    holder = make(session="live")
    holder.acquire(need(3), "kept::test", 1)
    (folder / ledger_name("GPU-0")).write_bytes(frame(LEDGER_FRAME, b"{broken", 3))
    status = read_status(folder)
    (repair,) = status["repaired"]
    assert repair["reason"].startswith("not JSON") and repair["moved_to"]
    (g,) = status["gpus"]
    assert [(x["test_id"], x["kind"]) for x in g["leases"]] == [("kept::test", TEST)]


def test_status_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    status = read_status(tmp_path / "nothing")
    assert status["gpus"] == [] and status["reclaimed"] == []
    assert not (tmp_path / "nothing").exists()


def test_status_sets_an_unreadable_ledger_aside(folder: Path, make: Callable[..., Ledger]) -> None:
    make().close()
    (folder / ledger_name("GPU-0")).write_bytes(b"garbage")
    lines: list[str] = []
    status = read_status(folder, log=lines.append)
    assert status["gpus"] == []
    assert status["repaired"][0]["moved_to"].startswith(ledger_name("GPU-0") + ".damaged-")
    assert "unreadable" in lines[0]
