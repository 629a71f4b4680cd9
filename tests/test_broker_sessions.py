"""Acceptance: the session broker under real ``pytest -n`` subprocesses, on simulated GPUs.

Under xdist the controller runs the session's broker and its workers lease through it; these
tests prove its crash semantics with SIGKILL, that ``-x``/``--maxfail`` end a session whose test
waits for memory another session holds, and that ``gpushare status`` lists each running test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from edge_support import stranger
from process_support import run_command

from pytest_gpushare.ledger import read_status

GiB = 2**30
PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly")

# A test that says it holds its lease (its pid in a file), then waits for a "go" file.
HOLD_SUITE = """
import os, time, pytest
@pytest.mark.gpu(mem="4GiB")
def test_hold(gpu):
    open(os.environ["MARK_DIR"] + "/started", "w").write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["MARK_DIR"] + "/go") and time.monotonic() < deadline:
        time.sleep(0.02)
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    marks = tmp_path / "marks"
    marks.mkdir()
    # The broker's socket folder goes under TMPDIR: a short private one, so that a controller
    # these tests kill leaves nothing in the real /tmp (a socket path must stay short).
    sockets = tempfile.mkdtemp(prefix="gsb-")
    values = {
        k: v for k, v in os.environ.items() if not k.startswith(("GPUSHARE_", "PYTEST_", "XDG_RUNTIME"))
    }
    values.update(
        GPUSHARE_LEDGER_DIR=str(tmp_path / "ledger"),
        GPUSHARE_OLLAMA="off",
        MARK_DIR=str(marks),
        TMPDIR=sockets,
    )
    yield values
    shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    folder = tmp_path / "suite"
    folder.mkdir()
    return folder


def booked(env: dict[str, str], session: str | None = None) -> int:
    """What the ledger books on its GPUs (for owners of ``session`` only, when given)."""
    total = 0
    for gpu in read_status(env["GPUSHARE_LEDGER_DIR"])["gpus"]:
        for lease in gpu["leases"]:
            if session is None or lease["owner"]["session_id"] == session:
                total += lease["bytes"]
    return total


@pytest.fixture
def started(env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    """Sessions a test starts (each in its own process group), killed at its end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start(
    started: list[subprocess.Popen[str]], suite: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*PYTEST, *args],
        cwd=suite,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    started.append(proc)
    return proc


def hold(
    started: list[subprocess.Popen[str]], suite: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], int]:
    """A ``-n 1`` session whose one test holds 4GiB until told to go; its controller and the
    pid of the worker that runs the test."""
    (suite / "test_hold.py").write_text(HOLD_SUITE)
    marks = Path(env["MARK_DIR"])
    controller = start(started, suite, env, "-n", "1", "--gpushare-simulate=8GiB", "-q")
    wait_until((marks / "started").exists, "the test holds its lease", timeout=120, proc=controller)
    return controller, int((marks / "started").read_text())


def test_a_killed_controllers_running_worker_keeps_its_memory_booked_until_it_dies(
    suite: Path, env: dict[str, str], started: list[subprocess.Popen[str]]
) -> None:
    controller, worker = hold(started, suite, env)
    assert booked(env) >= 4 * GiB
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait()
    # The worker runs on, holding the controller's liveness: its memory stays booked.
    for _ in range(3):
        assert booked(env) >= 4 * GiB
        time.sleep(0.2)  # a few looks apart: the ledger reclaims dead owners on each read
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: booked(env) == 0, "the dead worker's memory goes back", timeout=30)


KILLED_WORKER_SUITE = """
import os, signal, time, pytest

def mark(name, text=""):
    open(os.environ["MARK_DIR"] + "/" + name, "w").write(text)

def wait_for(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["MARK_DIR"] + "/" + name) and time.monotonic() < deadline:
        time.sleep(0.02)

@pytest.mark.gpu(mem="6GiB")
def test_crash(gpu):
    mark("holds")
    wait_for("waiting")
    time.sleep(0.3)  # the other worker's request has reached the broker
    mark("killed", repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)

@pytest.mark.gpu(mem="6GiB")
def test_after(gpu):
    mark("granted", repr(time.time()))
"""

# test_after asks for its lease only once test_crash holds its own (the lease is taken in the
# plugin's setup hook, after this tryfirst one).
WAIT_FOR_HOLDER = """
import os, time, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.name == "test_after":
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["MARK_DIR"] + "/holds") and time.monotonic() < deadline:
            time.sleep(0.02)
        open(os.environ["MARK_DIR"] + "/waiting", "w").close()
"""


def test_a_killed_workers_leases_return_at_once(
    suite: Path, env: dict[str, str], started: list[subprocess.Popen[str]]
) -> None:
    # Two 6GiB tests on a 7GiB GPU, one per worker: the second waits for the first, whose
    # worker is killed holding its lease; the broker sees the connection close and grants.
    (suite / "conftest.py").write_text(WAIT_FOR_HOLDER)
    (suite / "test_crash.py").write_text(KILLED_WORKER_SUITE)
    proc = start(started, suite, env, "-n", "2", "--gpushare-simulate=8GiB")
    output, _ = proc.communicate(timeout=180)
    assert "1 failed, 1 passed" in output, output
    marks = Path(env["MARK_DIR"])
    killed = float((marks / "killed").read_text())
    granted = float((marks / "granted").read_text())
    assert 0 < granted - killed < 3.0, "the killed worker's lease went back at once"
    assert booked(env) == 0


STOP_SUITE = """
import os, time, pytest

@pytest.mark.gpu(mem="4GiB")
def test_wait(gpu):
    pass

def test_fail():
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["MARK_DIR"] + "/waiting") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # test_wait's request has reached the broker
    assert False
"""

ANNOUNCE_WAIT = """
import os, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.name == "test_wait":
        open(os.environ["MARK_DIR"] + "/waiting", "w").close()
"""


@pytest.mark.parametrize("stop", ["-x", "--maxfail=1"])
def test_stopping_ends_a_session_whose_test_waits_for_another_sessions_memory(
    suite: Path,
    env: dict[str, str],
    started: list[subprocess.Popen[str]],
    stop: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", env["GPUSHARE_LEDGER_DIR"])  # the stranger's folder
    (suite / "conftest.py").write_text(ANNOUNCE_WAIT)
    (suite / "test_stop.py").write_text(STOP_SUITE)
    with stranger("8GiB", 6 * GiB, "stranger::big_job"):
        began = time.monotonic()
        proc = start(started, suite, env, "-n", "2", stop, "--gpushare-simulate=8GiB", "-rs")
        output, _ = proc.communicate(timeout=120)
        took = time.monotonic() - began
    assert took < 30, f"the session took {took:.1f}s to stop:\n{output}"
    assert "1 failed" in output, output
    assert "the session is stopping; its wait for GPU memory was cancelled" in output, output


def test_status_lists_each_running_test_of_a_broker_session(
    suite: Path, env: dict[str, str], started: list[subprocess.Popen[str]]
) -> None:
    controller, _ = hold(started, suite, env)

    def status(*flags: str) -> str:
        done = run_command(
            [sys.executable, "-m", "pytest_gpushare", "status", "--simulate=8GiB", *flags], env=env
        )
        assert done.returncode == 0, done.stdout
        return done.stdout

    wait_until(lambda: "test_hold.py::test_hold  (gw0, " in status(), "status lists the test", timeout=30)
    text = status()
    assert "running tests of session " in text, text
    assert "  test     4.0GiB on GPU 0  test_hold.py::test_hold  (gw0, " in text, text
    (session,) = json.loads(status("--json"))["sessions"]
    (lease,) = session["leases"]
    assert lease["test_id"] == "test_hold.py::test_hold" and lease["worker_id"] == "gw0"
    assert lease["parts"][0][1] == 4 * GiB
    (Path(env["MARK_DIR"]) / "go").touch()
    assert controller.wait(timeout=120) == 0


def test_ctrl_c_ends_a_session_whose_test_waits_for_another_sessions_memory(
    suite: Path, env: dict[str, str], started: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", env["GPUSHARE_LEDGER_DIR"])  # the stranger's folder
    (suite / "conftest.py").write_text(ANNOUNCE_WAIT)
    (suite / "test_wait.py").write_text(
        "import pytest\n@pytest.mark.gpu(mem='4GiB')\ndef test_wait(gpu): pass\n"
    )
    with stranger("8GiB", 6 * GiB, "stranger::big_job"):
        proc = start(started, suite, env, "-n", "2", "--gpushare-simulate=8GiB")
        wait_until((Path(env["MARK_DIR"]) / "waiting").exists, "the test waits", timeout=120, proc=proc)
        time.sleep(0.3)  # its request has reached the broker
        began = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # the controller only, as a terminal's Ctrl-C reaches it first
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - began
    # Without the cancel, xdist takes its workers down only after its own grace (about 5 s).
    assert took < 3, f"the session took {took:.1f}s to stop:\n{output}"
    assert "KeyboardInterrupt" in output or "Interrupted" in output, output


def test_a_run_without_gpu_tests_starts_no_broker(suite: Path, env: dict[str, str]) -> None:
    # Workers are pinned (the box has a GPU), and get the broker's address; nobody connects, so
    # no broker opens an owner in the ledger.
    (suite / "test_plain.py").write_text("def test_a(): pass\ndef test_b(): pass\n")
    done = run_command([*PYTEST, "-n", "2", "--gpushare-simulate=8GiB"], cwd=suite, env=env)
    assert "2 passed" in done.stdout, done.stdout
    assert not list(Path(env["GPUSHARE_LEDGER_DIR"]).glob("gpu-*")), "a ledger was written"
    assert not list(Path(env["TMPDIR"]).glob("gpushare-broker-*")), "the socket folder is left behind"


# --- leases carried from a test to the next --------------------------------------------------

# Each test writes its lease's id and size where the test can read them (the plugin's own state
# of the running test), and may hold until told to go.
CARRY_CONFTEST = """
import os, time, pytest
from pytest_gpushare.fixtures import STATE_KEY

@pytest.fixture(autouse=True)
def record_lease(request):
    grant = request.node.stash[STATE_KEY].grant
    if grant is not None:
        with open(os.environ["MARK_DIR"] + "/leases", "a") as f:
            f.write(f"{request.node.name} {grant.lease.lease_id} {grant.lease.parts[0][1]}\\n")

@pytest.fixture
def hold(request):
    marks = os.environ["MARK_DIR"]
    open(f"{marks}/{request.node.name}-started", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{marks}/{request.node.name}-go") and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def leases_of(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Each test's lease id and bytes, as CARRY_CONFTEST wrote them."""
    lines = (Path(env["MARK_DIR"]) / "leases").read_text().split("\n")
    return {name: (lease_id, int(size)) for name, lease_id, size in (x.split() for x in lines if x)}


def test_a_carried_lease_shows_its_new_test_in_status(
    suite: Path, env: dict[str, str], started: list[subprocess.Popen[str]]
) -> None:
    (suite / "conftest.py").write_text(CARRY_CONFTEST)
    (suite / "test_chain.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.gpu(mem='1GiB')\n"
        "def test_warm(): pass\n"  # a worker's first lease books its context: it goes back
        "def test_a(hold): pass\n"
        "def test_b(hold): pass\n"
    )
    marks = Path(env["MARK_DIR"])
    controller = start(started, suite, env, "-n", "1", "--gpushare-simulate=8GiB", "-q")

    def running() -> list[tuple[str, str]]:
        done = run_command([sys.executable, "-m", "pytest_gpushare", "status", "--json"], env=env)
        return [
            (x["test_id"], x["lease_id"]) for s in json.loads(done.stdout)["sessions"] for x in s["leases"]
        ]

    for name in ("test_a", "test_b"):
        wait_until((marks / f"{name}-started").exists, f"{name} runs", timeout=120, proc=controller)
        lease_id = leases_of(env)[name][0]
        shown = [(f"test_chain.py::{name}", lease_id)]
        wait_until(lambda shown=shown: running() == shown, f"status shows {name}")
        (marks / f"{name}-go").touch()
    assert controller.wait(timeout=120) == 0
    ids = leases_of(env)
    assert ids["test_a"] == ids["test_b"], "test_b did not get test_a's lease"
    assert ids["test_warm"] != ids["test_a"]


def test_a_test_of_another_need_never_takes_a_carried_lease(suite: Path, env: dict[str, str]) -> None:
    (suite / "conftest.py").write_text(CARRY_CONFTEST)
    (suite / "test_needs.py").write_text(
        "import pytest\n"
        "GiB = 2**30\n"
        "@pytest.mark.gpu(mem='1GiB')\ndef test_warm(gpu): pass\n"
        "@pytest.mark.gpu(mem='1GiB')\ndef test_one(gpu): assert gpu.mem == GiB\n"
        "@pytest.mark.gpu(mem='2GiB')\ndef test_two(gpu): assert gpu.mem == 2 * GiB\n"
        "@pytest.mark.gpu(mem='1GiB')\ndef test_one_again(gpu): assert gpu.mem == GiB\n"
        "@pytest.mark.gpu(mem='1GiB')\ndef test_home_only(): pass\n"  # no fixture: its home GPU only
        "@pytest.mark.gpu(mem='1GiB')\ndef test_home_again(): pass\n"
    )
    done = run_command([*PYTEST, "-n", "1", "--gpushare-simulate=8GiB,8GiB", "-q"], cwd=suite, env=env)
    assert "6 passed" in done.stdout, done.stdout
    ids = {name: lease_id for name, (lease_id, _) in leases_of(env).items()}
    assert len({ids["test_warm"], ids["test_one"], ids["test_two"], ids["test_one_again"]}) == 4
    assert ids["test_home_only"] != ids["test_one_again"], "a test placed differently took the lease"
    assert ids["test_home_again"] == ids["test_home_only"]


def test_a_request_that_waits_makes_the_carrier_give_the_memory_back_at_its_next_test(
    suite: Path, env: dict[str, str], tmp_path: Path
) -> None:
    (suite / "conftest.py").write_text(CARRY_CONFTEST)
    # Two leases of 60% never fit at once: gw1's test waits while gw0 carries its lease on.
    (suite / "test_chain.py").write_text(
        "import time, pytest\n"
        "@pytest.mark.gpu(mem='60%')\n"
        "@pytest.mark.parametrize('i', range(40))\n"
        "def test_chain(i): time.sleep(0.1)\n"
    )
    (suite / "test_other.py").write_text(
        "import time, pytest\n"
        "def test_first(): time.sleep(0.5)\n"
        "@pytest.mark.gpu(mem='60%')\n"
        "def test_late(): pass\n"
    )
    report = tmp_path / "report.json"
    done = run_command(
        [*PYTEST, "-n", "2", "--dist", "loadfile", "--gpushare-simulate=8GiB", f"--gpushare-report={report}"],
        cwd=suite,
        env=env,
    )
    assert "42 passed" in done.stdout, done.stdout
    leases = json.loads(report.read_text())["leases"]
    late = next(x for x in leases if x["test_id"].endswith("test_late"))
    chain = sorted((x for x in leases if "test_chain" in x["test_id"]), key=lambda x: x["taken_at"])
    assert late["taken_at"] < chain[-1]["taken_at"], "test_late waited until the chain ended"
    for x in chain:  # records lie within their leases: two of 60% never overlap
        assert x["released_at"] <= late["taken_at"] or x["taken_at"] >= late["released_at"], (x, late)
    # Before test_late asked, each chain test (past the first, whose lease booked gw0's context
    # and went back) got its predecessor's lease.
    asked = late["taken_at"] - late["waited_s"]
    ids = leases_of(env)
    before = [i for i in range(1, 39) if chain[i + 1]["taken_at"] < asked]
    assert before, "test_late asked before the chain carried anything"
    assert all(ids[f"test_chain[{i}]"][0] == ids[f"test_chain[{i + 1}]"][0] for i in before), ids
