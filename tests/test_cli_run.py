"""``gpushare run`` as a user runs it: real processes on a real ledger folder, simulated GPUs,
no network (Ollama off)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import textwrap
import time

import pytest
from cli_support import SIM, SIM_UUID, CliBox, run_leases
from conftest import wait_until

from pytest_gpushare.commands.run import child_environment
from pytest_gpushare.commands.spawn import should_forward
from pytest_gpushare.gpus import Gpu, GpuInventory
from pytest_gpushare.ledger import Lease, Owner
from pytest_gpushare.planner import Budget, make_plan
from pytest_gpushare.units import GiB

# --- gpushare run ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 7])
def test_run_passes_the_exit_code_through_and_names_the_gpus(cli: CliBox, code: int) -> None:
    # A real GPU's UUID, as a worker of a session on real GPUs inherits: no simulated GPU is hidden.
    real = "GPU-aaaaaaaa-1111-2222-3333-000000000001"
    cli.env["CUDA_VISIBLE_DEVICES"] = real
    done = cli.gpushare("run", "--mem", "4GiB", "--simulate", SIM, "--", *cli.child_cmd("env", code))
    assert done.returncode == code, done.stderr
    seen = json.loads(cli.file("env.json").read_text())
    # Simulated GPUs have no CUDA device: CUDA_VISIBLE_DEVICES stays as inherited.
    assert seen == {
        "CUDA_VISIBLE_DEVICES": real,
        "CUDA_DEVICE_ORDER": None,
        "GPUSHARE_LEASED_GPUS": SIM_UUID,
    }
    document = cli.status()
    assert run_leases(document) == [] and document["reclaimed"] == []  # given back, not reclaimed


def test_run_passes_the_command_line_through_untouched(cli: CliBox) -> None:
    argv = ["--simulate", "x", "--timeout=1", "--", "--mem"]
    done = cli.gpushare("run", "--mem", "1GiB", "--simulate", SIM, "--", *cli.child_cmd("env", 0, *argv))
    assert done.returncode == 0, done.stderr
    assert json.loads(cli.file("argv.json").read_text()) == argv


def test_run_reports_a_command_killed_by_a_signal_as_shells_do(cli: CliBox) -> None:
    done = cli.gpushare("run", "--mem", "1GiB", "--simulate", SIM, "--", *cli.child_cmd("die", 9))
    assert done.returncode == 128 + 9


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"]
)
def test_run_forwards_signals_to_the_command(cli: CliBox, signum: int) -> None:
    run = cli.start_run("--mem", "1GiB", "--simulate", SIM, "--", *cli.child_cmd("signal", int(signum), 42))
    cli.wait_file("ready", run)
    run.send_signal(signum)
    assert run.wait(30) == 42
    assert cli.file("got-signal").read_text() == str(int(signum))
    assert run_leases(cli.status()) == []


def test_run_lets_a_terminal_interrupt_reach_the_command(cli: CliBox) -> None:
    # Ctrl-C on a terminal signals its whole foreground process group, the command included.
    # (A second, forwarded copy usually merges with the first, as pending signals do, so the
    # rule that prevents it is checked on its own below.)
    master, slave = os.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest_gpushare",
            "run",
            "--mem",
            "1GiB",
            "--simulate",
            SIM,
            "--",
            *cli.child_cmd("tty"),
        ],
        env=cli.env,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=own_terminal,  # noqa: PLW1509 - the test process starts no threads that fork
    )
    cli.procs.append(run)
    os.close(slave)
    try:
        cli.wait_file("ready", run)
        os.write(master, b"\x03")
        cli.wait_file("sigint-1", run)
        run.send_signal(signal.SIGUSR1)
        assert run.wait(30) == 0
    finally:
        os.close(master)
    assert cli.file("interrupts").read_text() == "1"


def test_only_signals_the_command_did_not_get_already_are_forwarded() -> None:
    si_user, si_kernel, ours, other = 0, 0x80, 100, 200
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        assert not should_forward(signum, si_kernel, ours, ours)  # the terminal signalled the group
        assert should_forward(signum, si_kernel, other, ours)  # the command left our group
        assert should_forward(signum, si_user, ours, ours)  # kill(2) aimed at gpushare run
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        assert should_forward(signum, si_kernel, ours, ours)


def test_run_that_can_never_fit_fails_at_once(cli: CliBox) -> None:
    done = cli.gpushare("run", "--mem", "40GiB", "--simulate", SIM, "--", *cli.child_cmd("env", 0))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "can never give" in done.stderr
    assert not cli.file("env.json").exists()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--mem", "4GiB", "--safety", "lots", "--", "true"], 4, "gpushare run: --safety: not a size"),
        (["--mem", "4GiB", "--safety=-1", "--", "true"], 4, "gpushare run: --safety: a size cannot be"),
        (["--mem", "4GiB", "--gpushare-safety=-1", "--", "true"], 4, "run: --gpushare-safety: a size"),
        (["--mem", "4GiB", "--safety", "--", "true"], 4, "gpushare run: --safety: expects a value"),
        (["--mem", "4GiB", "--enforce=maybe", "--", "true"], 4, "gpushare run: --enforce: not a flag"),
        (["--mem", "4", "--simulate", SIM, "--", "true"], 4, "gpushare run: --mem: a size needs a unit"),
        (["--mem", "4GiB", "--count", "0", "--", "true"], 2, "--count"),
        (["--mem", "4GiB", "--cuont", "2", "--", "true"], 2, "--cuont"),
        (["--simulate", SIM, "--", "true"], 2, "--mem is required"),
        (["--mem", "4GiB", "--simulate", SIM, "--"], 2, "no command"),
        (["--mem", "4GiB", "--simulate", SIM, "true"], 2, "put -- before the command"),
    ],
)
def test_run_usage_errors(cli: CliBox, args: list[str], code: int, words: str) -> None:
    done = cli.gpushare("run", *args)
    assert done.returncode == code
    assert words in done.stderr and done.stderr.count("\n") == 1


def test_run_help_says_simulated_gpus_keep_the_inherited_visibility(cli: CliBox) -> None:
    done = cli.gpushare("run", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "on real GPUs, CUDA_VISIBLE_DEVICES set to them" in text
    assert "simulated GPUs have no CUDA device, so there the inherited CUDA_VISIBLE_DEVICES stays" in text
    assert "--safety SIZE" in text and "--gpushare-NAME" in text


def test_run_refuses_an_unsafe_folder_in_one_line(cli: CliBox) -> None:
    cli.ledger.mkdir()
    cli.ledger.chmod(0o777)
    done = cli.gpushare("run", "--mem", "1GiB", "--simulate", SIM, "--", *cli.child_cmd("env", 0))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "world-writable" in done.stderr
    assert not cli.file("env.json").exists()


def test_run_of_a_missing_command_is_127(cli: CliBox) -> None:
    done = cli.gpushare("run", "--mem", "1GiB", "--simulate", SIM, "--", "no-such-command-gpushare")
    assert done.returncode == 127
    assert "no-such-command-gpushare: command not found" in done.stderr
    assert run_leases(cli.status()) == []


def test_runs_serialise_and_a_timed_out_wait_names_the_holder(cli: CliBox) -> None:
    # 16GiB + a 512MiB context twice is more than the 23GiB usable on 24GiB: one at a time.
    first = cli.start_run("--mem", "16GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "a"))
    cli.wait_file("a.start", first)

    late = cli.gpushare("run", "--mem", "16GiB", "--simulate", SIM, "--timeout", "0.3", "--", "true")
    assert late.returncode == 3
    assert "held by" in late.stderr and str(cli.child) in late.stderr

    second = cli.start_run("--mem", "16GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "b"))

    def waited_long() -> bool:
        # Past the second after which gpushare run says what it waits for.
        return any(w["waited_s"] > 1.5 for g in cli.status()["gpus"] for w in g["waiters"])

    wait_until(waited_long, "the second run to wait", proc=second)
    assert not cli.file("b.start").exists()
    cli.file("a.stop").touch()
    assert first.wait(30) == 0
    cli.wait_file("b.start", second)
    cli.file("b.stop").touch()
    assert second.wait(30) == 0
    _, err = second.communicate()
    assert "gpushare run: waiting for 16.0GiB" in err  # it waited more than a second
    a = float(cli.file("a.start").read_text()), float(cli.file("a.end").read_text())
    b = float(cli.file("b.start").read_text()), float(cli.file("b.end").read_text())
    assert a[1] <= b[0], (a, b)


def test_a_signal_while_waiting_withdraws_the_wait(cli: CliBox) -> None:
    first = cli.start_run("--mem", "16GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "a"))
    cli.wait_file("a.start", first)
    second = cli.start_run("--mem", "16GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "b"))
    wait_until(lambda: any(g["waiters"] for g in cli.status()["gpus"]), "the second run to wait", proc=second)
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 128 + signal.SIGTERM
    document = cli.status()
    assert all(not g["waiters"] for g in document["gpus"])
    assert document["reclaimed"] == []  # withdrawn by its owner, not reclaimed from the dead
    assert not cli.file("b.start").exists()
    cli.file("a.stop").touch()
    assert first.wait(30) == 0


# --- issue 9: gpushare run beside a pytest -n 2 session ----------------------------------------

SESSION_TESTS = textwrap.dedent(
    """
    import json, os, time

    import pytest

    from pytest_gpushare.ledger import read_status


    @pytest.mark.gpu(mem="8GiB")
    @pytest.mark.parametrize("n", range(4))
    def test_books_within_the_limit(n):
        (gpu,) = read_status(os.environ["GPUSHARE_LEDGER_DIR"])["gpus"]
        record = {
            "at": time.time(),
            "booked": gpu["booked_bytes"],
            "limit": gpu["limit_bytes"],
            "run_lease": any(l["owner"].get("worker_id") == "gpushare-run" for l in gpu["leases"]),
        }
        with open(os.path.join(os.environ["CLI_TEST_OUT"], f"test-{n}.json"), "w") as f:
            json.dump(record, f)
        assert gpu["booked_bytes"] <= gpu["limit_bytes"]
    """
)


def test_a_run_holds_memory_beside_a_pytest_session_and_frees_it_when_killed(cli: CliBox) -> None:
    project = cli.tmp / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_session.py").write_text(SESSION_TESTS)
    run = cli.start_run("--mem", "16GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "server"))
    cli.orphans.append(int(cli.wait_file("server.pid", run)))

    env = dict(cli.env, CLI_TEST_OUT=str(cli.out))
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", f"--gpushare-simulate={SIM}"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cli.procs.append(session)

    # 16GiB + 8GiB and their contexts exceed the 23GiB usable: the tests wait for the run.
    def session_waits() -> bool:
        return any(
            w["owner"].get("worker_id", "").startswith("gw")
            for g in cli.status()["gpus"]
            for w in g["waiters"]
        )

    wait_until(session_waits, "the pytest session's tests to wait", proc=session, timeout=45)
    assert not list(cli.out.glob("test-*.json"))

    run.send_signal(signal.SIGKILL)
    run.wait(30)
    killed_at = time.time()
    assert run_leases(cli.status()) == []  # freed at once, its command still running

    out, _ = session.communicate(timeout=60)
    assert session.returncode == 0, out
    assert "4 passed" in out
    records = [json.loads(p.read_text()) for p in sorted(cli.out.glob("test-*.json"))]
    assert len(records) == 4
    for record in records:
        assert record["booked"] <= record["limit"] == 23 * GiB
        assert not record["run_lease"]
        assert record["at"] >= killed_at - 1.0


def test_real_gpus_are_named_to_the_command_by_uuid_in_pci_order() -> None:
    gpus = tuple(
        Gpu(index=i, uuid=f"GPU-{i}", name="A100", total_bytes=80 * GiB, free_bytes=80 * GiB, used_bytes=0)
        for i in range(2)
    )
    plan = make_plan(GpuInventory(gpus, "NVML"), Budget(GiB, 3 * GiB, GiB // 2))
    owner = Owner.current("s", "gpushare-run", command="serve")
    lease = Lease("l1", "serve", owner, (("GPU-1", GiB), ("GPU-0", GiB)), 0.0, 0.0)
    env = child_environment(plan, lease, {"CUDA_VISIBLE_DEVICES": "0", "KEEP": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1,GPU-0"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["GPUSHARE_LEASED_GPUS"] == "GPU-1,GPU-0"
    assert env["KEEP"] == "1"


def test_run_reads_the_ini_file_and_conftest_hooks_like_pytest(cli: CliBox) -> None:
    # No --simulate on the command line: the ini file names the GPU, a conftest reserves 20GiB.
    (cli.tmp / "pytest.ini").write_text("[pytest]\ngpushare_simulate = 24GiB\n")
    (cli.tmp / "conftest.py").write_text(
        "from pytest_gpushare import Reservation\n"
        "def pytest_gpushare_reservations(config, gpus):\n"
        "    return [Reservation(g.index, 20 * 2**30, 'model server') for g in gpus]\n"
    )
    assert cli.gpushare("run", "--mem", "2GiB", "--", "true").returncode == 0
    done = cli.gpushare("run", "--mem", "4GiB", "--", "true")  # 24 - 20 - 1 safety = 3GiB usable
    assert done.returncode == 2 and "can never give" in done.stderr
