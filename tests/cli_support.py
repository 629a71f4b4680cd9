"""What the ``gpushare`` command tests share: a ledger folder, a child script, the processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import wait_until

from pytest_gpushare.gpus import SimulatedProbe

SIM = "24GiB"
SIM_UUID = SimulatedProbe(SIM).probe().gpus[0].uuid

# The command that gpushare run runs in these tests. Children report through files written
# atomically, so a test waits for a file, never for a guessed time.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    mode, out = sys.argv[1], sys.argv[2]

    def put(name, text):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))

    def wait_for(name):
        # all.stop: the test is over, whatever happened
        deadline = time.monotonic() + 60
        while not any(os.path.exists(os.path.join(out, n)) for n in (name, "all.stop")):
            if time.monotonic() > deadline:
                sys.exit(99)
            time.sleep(0.01)

    if mode == "env":
        keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUSHARE_LEASED_GPUS")
        put("env.json", json.dumps({k: os.environ.get(k) for k in keys}))
        put("argv.json", json.dumps(sys.argv[4:]))
        sys.exit(int(sys.argv[3]))
    if mode == "hold":
        tag = sys.argv[3]
        put(tag + ".pid", str(os.getpid()))
        put(tag + ".start", repr(time.time()))
        wait_for(tag + ".stop")
        put(tag + ".end", repr(time.time()))
        sys.exit(0)
    if mode == "signal":
        signum, code = int(sys.argv[3]), int(sys.argv[4])

        def on_signal(got, frame):
            put("got-signal", str(got))
            sys.exit(code)

        signal.signal(signum, on_signal)
        put("ready", "")
        wait_for("never")
    if mode == "tty":
        interrupts = []

        def on_interrupt(got, frame):
            interrupts.append(got)
            put(f"sigint-{len(interrupts)}", "")

        def on_usr1(got, frame):
            put("interrupts", str(len(interrupts)))
            sys.exit(0)

        signal.signal(signal.SIGINT, on_interrupt)
        signal.signal(signal.SIGUSR1, on_usr1)
        put("ready", "")
        wait_for("never")
    if mode == "die":
        os.kill(os.getpid(), int(sys.argv[3]))
    """
)


class CliBox:
    """A ledger folder, a child script and the ``gpushare`` processes started on them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ledger = tmp / "ledger"
        self.out = tmp / "out"
        self.out.mkdir()
        self.child = tmp / "child.py"
        self.child.write_text(CHILD)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSHARE_", "PYTEST_"))}
        env.update(GPUSHARE_LEDGER_DIR=str(self.ledger), GPUSHARE_OLLAMA="off", PYTHONUNBUFFERED="1")
        for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
            env.pop(name, None)
        self.env = env
        self.procs: list[subprocess.Popen[str]] = []
        self.orphans: list[int] = []

    def child_cmd(self, mode: str, *args: object) -> list[str]:
        return [sys.executable, str(self.child), mode, str(self.out), *map(str, args)]

    def gpushare(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest_gpushare", *args],
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_run(self, *args: str) -> subprocess.Popen[str]:
        def default_signals() -> None:
            # An inherited "ignore" (a background job of a script) would stay ignored and not be forwarded.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)

        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_gpushare", "run", *args],
            env=self.env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signals,  # noqa: PLW1509 - the test process starts no threads that fork
        )
        self.procs.append(proc)
        return proc

    def status(self, *args: str) -> dict[str, Any]:
        done = self.gpushare("status", "--json", *args)
        assert done.returncode == 0, done.stderr
        document: dict[str, Any] = json.loads(done.stdout)
        return document

    def file(self, name: str) -> Path:
        return self.out / name

    def wait_file(self, name: str, proc: subprocess.Popen[str] | None = None) -> str:
        path = self.file(name)
        wait_until(path.exists, f"{name} to appear", proc=proc)
        return path.read_text()

    def cleanup(self) -> None:
        (self.out / "all.stop").touch()
        # Orphaned commands first: they hold the pipes of the gpushare run that started them.
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def run_leases(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        lease
        for gpu in document["gpus"]
        for lease in gpu["leases"]
        if lease["kind"] == "test" and lease["owner"].get("worker_id") == "gpushare-run"
    ]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
