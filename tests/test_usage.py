"""usage.py: lease holders' real use credited through the ledger and the process tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pytest_gpushare.credits import fresh_usable, holder_credits, parent_pid
from pytest_gpushare.gpus.model import Gpu, GpuInventory, GpuProcess
from pytest_gpushare.ledger import Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.planner import Budget, credit_for, make_plan
from pytest_gpushare.units import GiB, MemRequest, MiB

UUID = "GPU-12345678-0000-0000-0000-000000000000"


def test_parent_pid_reads_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert parent_pid(child.pid) == os.getpid()
    finally:
        child.communicate(b"")
    assert parent_pid(2**22 + 7) is None


def test_credit_for_counts_a_holders_children_together() -> None:
    gpu = Gpu(0, UUID, "X", 24 * GiB, 10 * GiB, 14 * GiB, (GpuProcess(11, 3 * GiB), GpuProcess(12, 3 * GiB)))
    # 11 and 12 are children of holder 10, which booked 4GiB: together they get at most 4GiB
    assert credit_for(gpu, {10: 4 * GiB}, {11: 10, 12: 10}) == 4 * GiB
    assert credit_for(gpu, {10: 4 * GiB}) == 0  # without the tree, nothing is ours


def test_a_gpushare_run_style_holder_is_credited_for_its_child(tmp_path: Path) -> None:
    ledger = Ledger(
        tmp_path,
        [LedgerGpu(UUID, 0, "X", 24 * GiB, 23 * GiB, 23 * GiB)],
        Owner.current("s", "gpushare-run"),
        context_bytes=0,
    )
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        ledger.acquire(Need(MemRequest(6 * GiB)), "cmd", 5)
        # NVML sees the child (the command) using 5GiB and a stranger using 2GiB.
        gpu = Gpu(
            0,
            UUID,
            "X",
            24 * GiB,
            17 * GiB,
            7 * GiB,
            (GpuProcess(child.pid, 5 * GiB), GpuProcess(1, 2 * GiB)),
        )
        assert holder_credits((gpu,), str(tmp_path)) == {UUID: 5 * GiB}
        plan = make_plan(GpuInventory((gpu,), "NVML"), Budget(GiB, 3 * GiB, 512 * MiB))
        fresh = fresh_usable(plan, str(tmp_path), lambda: GpuInventory((gpu,), "NVML"))
        assert fresh == {UUID: 17 * GiB + 5 * GiB - GiB}  # free + the child's use - safety
    finally:
        child.communicate(b"")
        ledger.close()


def test_untrusted_or_simulated_gpus_get_no_credit(tmp_path: Path) -> None:
    untrusted = Gpu(0, UUID, "X", 24 * GiB, 17 * GiB, 7 * GiB, None)
    simulated = Gpu(
        0, UUID, "X", 24 * GiB, 17 * GiB, 7 * GiB, (GpuProcess(os.getpid(), GiB),), simulated=True
    )
    assert holder_credits((untrusted,), str(tmp_path)) == {}
    assert holder_credits((simulated,), str(tmp_path)) == {}
