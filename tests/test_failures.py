"""What a user sees when the box, the folders or a worker fail under a session (issue 15): one
line, no traceback, the tests' outcomes left alone; and what a worker leaves to child sessions.

Real pytest subprocesses on simulated GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_support import isolate, run, set_setting, stranger

from pytest_gpushare.gpus import SimulatedProbe
from pytest_gpushare.planner import Budget, make_plan
from pytest_gpushare.runtime import Runtime
from pytest_gpushare.units import GiB, MemRequest, MiB

pytest_plugins = ["pytester"]

GPU_TEST = "import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_gpu(gpu):\n    pass\n"


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate(monkeypatch, tmp_path)


def assert_one_line_error(result: pytest.RunResult, line: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([line])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# --- the ledger folder stops taking writes (issue 15 #6) ----------------------------------------

FULL_DISK_CONFTEST = """
import errno, os

# The disk fills for every process of the session at once (under xdist the controller's broker
# writes the ledger): a flag file beside the ledger folder says so.
FULL = os.environ["GPUSHARE_LEDGER_DIR"] + ".full"
_open = os.open

def _full_disk_open(path, flags, *args, dir_fd=None, **kwargs):
    # A full disk in the ledger folder: no new file can be made there (the temporary files that
    # replace ledgers), whether opened by path or relative to the folder's descriptor.
    in_ledger = dir_fd is not None or str(path).startswith(os.environ["GPUSHARE_LEDGER_DIR"])
    if os.path.exists(FULL) and in_ledger and flags & os.O_EXCL:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _open(path, flags, *args, dir_fd=dir_fd, **kwargs)

os.open = _full_disk_open
"""


@pytest.mark.parametrize("args", [(), ("-n", "1")])
def test_a_lease_the_ledger_cannot_take_back_stays_booked_and_the_test_passes(
    pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    pytester.makeconftest(FULL_DISK_CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        from conftest import FULL

        @pytest.mark.gpu(mem="4GiB")
        def test_fills_the_disk(gpu):
            open(FULL, "w").close()
        """
    )
    result = run(pytester, "--gpushare-simulate=24GiB", *args)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    # In one process the test's own release says so (a note); under xdist the session's broker
    # does, in the controller's summary.
    said = "note: *" if not args else "gpushare: "
    result.stdout.fnmatch_lines(
        [
            f"{said}could not give back the lease of *::test_fills_the_disk*; it stays booked until this process*"
        ]
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "LedgerError" not in result.stdout.str() + result.stderr.str()
    assert len([x for x in result.stdout.lines if "could not give back" in x]) == 1


# --- the report path (issue 15 #7) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "source"),
    [("flag", "--gpushare-report"), ("env", "GPUSHARE_REPORT"), ("ini", "gpushare_report in tox.ini")],
)
def test_a_report_path_that_can_never_be_written_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, source: str
) -> None:
    pytester.makepyfile(GPU_TEST)
    args = set_setting(pytester, monkeypatch, how, "report", "/dev/null/r.json")
    result = run(pytester, "--gpushare-simulate=24GiB", *args)
    assert_one_line_error(
        result,
        f"ERROR: gpushare: {source}: cannot write the report to /dev/null/r.json: /dev/null is not a folder",
    )


def test_a_report_that_fails_to_write_at_the_end_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pathlib, shutil

        def test_replaces_the_report_folder_with_a_file():
            shutil.rmtree("out")
            pathlib.Path("out").write_text("a file now")
        """
    )
    (pytester.path / "out").mkdir()
    result = run(pytester, "--gpushare-simulate=24GiB", "--gpushare-report=out/r.json")
    assert result.ret == 0
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gpushare: could not write the report to */out/r.json: File exists"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# --- the ledger folder setting (issue 15 #8) ---------------------------------------------------


@pytest.mark.parametrize(
    ("how", "source"),
    [
        ("flag", "--gpushare-ledger-dir"),
        ("env", "GPUSHARE_LEDGER_DIR"),
        ("ini", "gpushare_ledger_dir in tox.ini"),
    ],
)
@pytest.mark.parametrize("workers", [(), ("-n", "2")])
def test_an_unusable_ledger_folder_names_its_source(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    source: str,
    workers: tuple[str, ...],
) -> None:
    pytester.makepyfile(GPU_TEST)
    monkeypatch.delenv("GPUSHARE_LEDGER_DIR")
    args = set_setting(pytester, monkeypatch, how, "ledger_dir", "/dev/null")
    result = run(pytester, "--gpushare-simulate=24GiB", *workers, *args)
    assert_one_line_error(result, f"ERROR: gpushare: ledger folder /dev/null ({source}): *")


# --- a worker crashes (issue 15 #11) -----------------------------------------------------------

CRASH_CONFTEST = """
import os, threading, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.name == "test_dies_waiting":
        # The worker dies while the test waits for its memory (before any fixture or body).
        threading.Timer(1.0, os._exit, (1,)).start()
"""

CRASH_SUITE = """
import os, pytest

def test_cpu_dies():
    os._exit(1)

@pytest.mark.gpu(mem="5GiB")
def test_dies_holding(gpu):
    os._exit(1)  # what pytest-timeout's --timeout-method=thread does to a test past its time

@pytest.mark.gpu(mem="20GiB")
def test_dies_waiting(gpu):
    pass

def test_after():
    pass
"""


def test_the_summary_names_only_leases_lost_with_a_worker(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CRASH_CONFTEST)
    pytester.makepyfile(test_crash=CRASH_SUITE)
    with stranger("24GiB", 10 * GiB, "stranger::job"):  # test_dies_waiting waits for it
        result = run(pytester, "-n", "1", "--gpushare-simulate=24GiB")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(
        [
            "GPU 0 Simulated GPU: peak leased 5.0GiB of 23.0GiB usable, 1 lease(s)",
            "lost: test_crash.py::test_dies_holding: its worker crashed holding 5.0GiB on GPU 0; "
            "the ledger reclaimed it",
        ]
    )
    lost = [x for x in result.stdout.lines if x.startswith("lost: test_crash.py")]
    assert len(lost) == 1, result.stdout.str()  # neither the CPU test nor the waiting one lost a lease


# --- a worker's home GPU and the pytest runs it starts ------------------------------------------


def test_a_child_session_of_a_worker_plans_on_its_own_box(pytester: pytest.Pytester) -> None:
    child = pytester.mkdir("child")
    (child / "test_child.py").write_text(GPU_TEST)
    pytester.makepyfile(
        test_parent=f"""
        import subprocess, sys, pytest

        @pytest.mark.gpu(mem="1GiB")
        def test_runs_a_child_session(gpu):
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", {str(child)!r},
                 "--gpushare-simulate=8GiB", "--rootdir", {str(child)!r}],
                capture_output=True, text=True, timeout=120,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        """
    )
    result = run(pytester, "-n", "1", "--gpushare-simulate=24GiB", "test_parent.py")
    result.assert_outcomes(passed=1)


def test_a_home_gpu_the_plan_does_not_know_is_ignored() -> None:
    plan = make_plan(SimulatedProbe("8GiB").probe(), Budget(GiB, 3 * GiB, 512 * MiB))
    rt = Runtime(
        plan=plan,
        session="s",
        worker="gw0",
        ledger_dir=None,
        context_bytes=0,
        policy="spread",
        timeout=1,
        home="GPU-of-another-box",
        default_mem=MemRequest(GiB),
    )
    assert rt.visible == (plan.gpus[0].gpu.uuid,)
