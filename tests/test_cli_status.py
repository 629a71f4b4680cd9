"""``gpushare status`` as a user runs it: real processes on a real ledger folder, simulated GPUs,
no network (Ollama off)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli_support import SIM, SIM_UUID, CliBox, alive, run_leases

from pytest_gpushare.commands.status import status_document, status_lines
from pytest_gpushare.gpus import GpuInventory, SimulatedProbe
from pytest_gpushare.units import GiB

# --- gpushare status ---------------------------------------------------------------------------


def test_status_of_a_missing_folder_is_no_leases(cli: CliBox) -> None:
    done = cli.gpushare("status")
    assert done.returncode == 0, done.stderr
    assert f"ledger folder {cli.ledger} (GPUSHARE_LEDGER_DIR)" in done.stdout
    assert "no leases" in done.stdout
    assert not cli.ledger.exists()  # looking does not create it


def test_status_json_is_one_document_with_devices_beside_the_ledgers(cli: CliBox) -> None:
    run = cli.start_run("--mem", "4GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "a"))
    cli.wait_file("a.start", run)
    done = cli.gpushare("status", "--json", "--simulate", SIM)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # the whole of stdout is one document
    assert document["folder"] == str(cli.ledger)
    assert document["folder_source"] == "GPUSHARE_LEDGER_DIR"
    assert document["reclaimed"] == [] and document["repaired"] == [] and document["log"] == []
    (gpu,) = document["gpus"]
    assert gpu["uuid"] == SIM_UUID
    assert gpu["limit_bytes"] == 23 * GiB  # 24GiB less the 1GiB safety buffer
    assert gpu["leased_bytes"] == 4 * GiB
    assert gpu["booked_bytes"] == 4 * GiB + gpu["context_bytes"] > 4 * GiB
    # A simulated GPU is seen as a real one would be: the holder uses what it booked.
    booked = gpu["booked_bytes"]
    assert gpu["device"] == {
        "index": 0,
        "name": "Simulated GPU",
        "total_bytes": 24 * GiB,
        "free_bytes": 24 * GiB - booked,
        "used_bytes": booked,
        "simulated": True,
    }
    assert document["devices"]["source"] == f"simulated ({SIM})"
    assert document["devices"]["gpus"][0]["in_ledger"] is True
    (lease,) = run_leases(document)
    assert lease["bytes"] == 4 * GiB and lease["age_s"] >= 0
    assert lease["owner"]["pid"] == run.pid
    assert "child.py hold" in lease["owner"]["command"]
    assert lease["test_id"] == lease["owner"]["command"]
    cli.file("a.stop").touch()
    assert run.wait(30) == 0


def test_status_shows_the_ledgers_of_this_probe_and_those_with_live_bookings(cli: CliBox) -> None:
    other = "16GiB:name=Other"
    run = cli.start_run("--mem", "4GiB", "--simulate", other, "--", *cli.child_cmd("hold", "o"))
    cli.wait_file("o.start", run)
    cli.gpushare("run", "--mem", "1GiB", "--simulate", SIM, "--", "true")  # leaves an idle ledger
    document = cli.status("--simulate", SIM)
    # The GPU seen now, and the other spec's GPU while someone books it.
    assert [g["uuid"] for g in document["gpus"]] == [SIM_UUID, SimulatedProbe(other).probe().gpus[0].uuid]
    assert document["gpus"][1]["device"] is None and document["idle_ledgers"] == []
    cli.file("o.stop").touch()
    assert run.wait(30) == 0
    # Once nobody books it, a GPU of another spec is left out, counted in one line.
    document = cli.status("--simulate", SIM)
    assert [g["uuid"] for g in document["gpus"]] == [SIM_UUID]
    assert document["idle_ledgers"] == [SimulatedProbe(other).probe().gpus[0].uuid]
    text = cli.gpushare("status", "--simulate", SIM).stdout
    assert "not shown: 1 ledger(s) that nobody books, of GPUs not seen here" in text
    assert "Other" not in text


def test_status_says_once_when_nvml_fails(cli: CliBox) -> None:
    done = cli.gpushare("status")
    document = cli.status()
    assert done.returncode == 0
    error = document["devices"]["error"]
    if error is None:
        assert document["devices"]["source"].startswith("NVML")
    else:
        assert done.stdout.count("NVML failed") == 1
        assert f"NVML failed: {error}" in done.stdout


def test_status_refuses_an_unsafe_folder_in_one_line(cli: CliBox) -> None:
    cli.ledger.mkdir()
    cli.ledger.chmod(0o777)
    for args in (["status"], ["status", "--json"]):
        done = cli.gpushare(*args)
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert "world-writable" in done.stderr and "chmod o-w" in done.stderr


def test_status_takes_the_folder_from_its_flag_first(cli: CliBox, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for flag in ("--ledger-dir", "--gpushare-ledger-dir"):
        document = cli.status(flag, str(other))
        assert document["folder"] == str(other)
        assert document["folder_source"] == flag  # as typed


def test_status_help_shows_the_short_spelling_and_says_the_long_works(cli: CliBox) -> None:
    done = cli.gpushare("status", "--help")
    assert done.returncode == 0, done.stderr
    assert "--ledger-dir PATH" in done.stdout and "--simulate SPEC" in done.stdout
    assert "--gpushare-ledger-dir" not in done.stdout
    assert "also works as --gpushare-NAME" in " ".join(done.stdout.split())


def test_status_names_a_bad_setting_as_typed(cli: CliBox) -> None:
    done = cli.gpushare("status", "--simulate=lots")
    assert done.returncode == 4
    assert done.stderr.startswith("gpushare status: --simulate: ") and done.stderr.count("\n") == 1


def test_a_killed_run_loses_its_lease_at_once_while_its_command_lives(cli: CliBox) -> None:
    run = cli.start_run("--mem", "4GiB", "--simulate", SIM, "--", *cli.child_cmd("hold", "k"))
    child = int(cli.wait_file("k.pid", run))
    cli.orphans.append(child)
    text = cli.gpushare("status")
    assert text.returncode == 0
    assert "command: " in text.stdout and "child.py hold" in text.stdout
    assert "gpushare-run" in text.stdout

    run.send_signal(signal.SIGKILL)
    run.wait(30)
    assert alive(child)  # the command does not hold the ledger's liveness lock

    document = cli.status()
    assert run_leases(document) == []
    assert all(gpu["booked_bytes"] == 0 for gpu in document["gpus"])
    reclaimed = [r for r in document["reclaimed"] if r["kind"] == "test"]
    assert len(reclaimed) == 1
    assert reclaimed[0]["owner"]["pid"] == run.pid
    assert "child.py hold" in reclaimed[0]["test_id"]
    assert document["log"] and "its process is gone" in document["log"][0]
    assert cli.status()["reclaimed"] == []  # reclaimed once


def test_status_reads_the_ledger_folder_from_the_ini_file(cli: CliBox, tmp_path: Path) -> None:
    folder = tmp_path / "from-ini"
    (cli.tmp / "pytest.ini").write_text(f"[pytest]\ngpushare_ledger_dir = {folder}\n")
    env_free = {k: v for k, v in os.environ.items() if k != "GPUSHARE_LEDGER_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest_gpushare", "status", "--json"],
        cwd=cli.tmp,
        env=env_free,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["folder"] == str(folder)
    assert document["folder_source"] == "gpushare_ledger_dir in pytest.ini"


def test_status_says_what_the_probe_corrected() -> None:
    note = "GPU 0 (GPU-x): NVML reported free 16777216.0TiB of 24.0GiB; taken as total - used = 22.0GiB"
    devices = GpuInventory((), "NVML (driver 1)", notes=(note,))
    document = status_document({"folder": "/f", "gpus": []}, devices, folder_source="x")
    assert document["devices"]["notes"] == [note]
    assert f"NVML (driver 1): {note}" in status_lines(document)


def test_status_shows_what_cannot_be_verified_now() -> None:
    # Issue 15: a denial of service by a planted owner is bounded in time and visible in status.
    snapshot = {
        "folder": "/f",
        "gpus": [],
        "unverifiable": [
            {"key": "1-deadbeefdeadbeef", "why": "its liveness file is missing", "trusted_for_s": 7.2}
        ],
    }
    document = status_document(snapshot, GpuInventory((), "simulated"), folder_source="x")
    assert (
        "gpushare: owner 1-deadbeefdeadbeef is unverifiable (its liveness file is missing); "
        "its bookings count for at most 7s more"
    ) in status_lines(document)
