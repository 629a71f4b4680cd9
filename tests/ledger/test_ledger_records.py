"""What the ledger files record: an owner as the calling process makes it, and a GPU's limit."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_gpushare.ledger.records import KEY_RE, GpuState, Owner


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
    assert owner.key.startswith(f"{os.getpid()}-") and KEY_RE.match(owner.key)
    assert Owner.current("sess", "gw3").key != owner.key
    assert (owner.usable_bytes, owner.joined_at) == (None, 0.0)  # what a ledger adds


def test_the_limit_is_the_least_usable_memory_of_the_owners_that_recorded_one() -> None:
    owners = [
        Owner(f"{n}-aaaaaaaaaaaaaaaa", n, "h", "t", "s", "w", None, usable, 0.0)
        for n, usable in [(1, 10), (2, 6), (3, None)]
    ]
    assert GpuState("GPU-0", owners={o.key: o for o in owners}).limit() == 6
    assert GpuState("GPU-0").limit() is None
