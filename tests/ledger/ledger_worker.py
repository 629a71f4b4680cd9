"""Processes for the ledger's multi-process tests: ``python ledger_worker.py ROLE CONFIG_JSON``.

Roles talk to the test through stdout lines (one JSON object each) and result files; a role that
must stay alive until the test says so waits for its stdin to close.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from pytest_gpushare.errors import LeaseTimeout
from pytest_gpushare.ledger import read_status
from pytest_gpushare.ledger.access import UNVERIFIED_TRUST_S, ledger_name, lock_name
from pytest_gpushare.ledger.admission import LedgerGpu, Need
from pytest_gpushare.ledger.codec import Damaged, parse_gpu_state
from pytest_gpushare.ledger.files import read_file
from pytest_gpushare.ledger.folder import open_ledger_folder
from pytest_gpushare.ledger.handle import Ledger
from pytest_gpushare.ledger.locks import locked
from pytest_gpushare.ledger.records import UNKNOWN, Owner
from pytest_gpushare.units import MemRequest


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def gpus_of(cfg: dict[str, Any]) -> list[LedgerGpu]:
    return [LedgerGpu(**g) for g in cfg["gpus"]]


def open_ledger(cfg: dict[str, Any], log: list[str]) -> Ledger:
    owner = Owner.current(cfg.get("session", "s"), cfg.get("worker", "w"))

    def record(line: str) -> None:
        # Reported at once: a process killed later still leaves its reclaim lines behind.
        log.append(line)
        say(event="log", line=line)

    return Ledger(
        cfg["folder"],
        gpus_of(cfg),
        owner,
        context_bytes=cfg.get("context", 0),
        policy=cfg.get("policy", "spread"),
        log=record,
        fair_after=cfg.get("fair_after", 2.0),
        trust_s=cfg.get("trust_s", UNVERIFIED_TRUST_S),
    )


def need_of(spec: dict[str, Any]) -> Need:
    mem = MemRequest(percent=spec["percent"]) if "percent" in spec else MemRequest(bytes=spec["bytes"])
    allowed = tuple(spec["allowed"]) if spec.get("allowed") else None
    return Need(mem, spec.get("count", 1), spec.get("exclusive", False), spec.get("prefer"), allowed)


def wait_for_file(path: str | None) -> None:
    if path is None:
        return
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.005)


def role_hold(cfg: dict[str, Any]) -> None:
    """Take one lease, report it, hold it until stdin closes (or until killed). With
    ``status_first``, report what ``read_status`` says first."""
    if cfg.get("status_first"):
        say(event="status", doc=read_status(cfg["folder"]))
    log: list[str] = []
    ledger = open_ledger(cfg, log)
    try:
        lease = ledger.acquire(need_of(cfg["need"]), cfg.get("test_id", "hold"), cfg.get("timeout", 10))
    except LeaseTimeout as exc:
        say(event="timeout", key=ledger.owner.key, error=str(exc), holders=list(exc.holders))
        ledger.close()
        return
    say(
        event="held",
        key=ledger.owner.key,
        pid=os.getpid(),
        parts=lease.parts,
        waited=lease.waited_s,
        at=time.time(),
    )
    if cfg.get("fork"):
        child = os.fork()
        if child == 0:
            # The child must neither keep the parent's liveness lock nor use its ledger.
            try:
                ledger.snapshot()
                outcome = "used the parent's ledger"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            Path(cfg["child_report"]).write_text(outcome)
            time.sleep(60)
            os._exit(0)
        say(event="forked", child=child)
    sys.stdin.read()
    ledger.release(lease)
    ledger.close()
    say(event="released", log=log)


def role_owners(cfg: dict[str, Any]) -> None:
    """Open ``count`` ledgers, one owner each, and keep them open until stdin closes."""
    ledgers = [open_ledger(dict(cfg, worker=f"owner{n}"), []) for n in range(cfg["count"])]
    say(event="ready", keys=[ledger.owner.key for ledger in ledgers])
    sys.stdin.read()
    for ledger in ledgers:
        ledger.close()


def role_few_descriptors(cfg: dict[str, Any]) -> None:
    """With at most ``nofile`` descriptors, open a ledger and cycle leases; report errors."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["nofile"], hard))
    errors = []
    try:
        ledger = open_ledger(cfg, [])
        for n in range(cfg["cycles"]):
            ledger.release(ledger.acquire(need_of(cfg["need"]), f"cycle{n}", 10))
        read_status(cfg["folder"])
        ledger.close()
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    say(event="done", errors=errors)


def role_stress(cfg: dict[str, Any]) -> None:
    """Random acquire/release cycles; a victim stops while holding a lease and waits to be killed."""
    rng = random.Random(cfg["seed"])
    log: list[str] = []
    ledger = open_ledger(cfg, log)
    say(event="ready", key=ledger.owner.key, pid=os.getpid())
    wait_for_file(cfg.get("go"))
    uuids = [g["uuid"] for g in cfg["gpus"]]
    stats: dict[str, Any] = {"grants": 0, "timeouts": 0, "overrun": [], "errors": [], "max_wait": 0.0}
    for cycle in range(cfg["cycles"]):
        roll = rng.random()
        spec: dict[str, Any] = {"bytes": rng.choice(cfg["sizes"])}
        if roll < 0.15 and len(uuids) > 1:
            spec["count"] = 2
        elif roll < 0.18:
            spec = {"bytes": cfg["sizes"][0], "exclusive": True}
        elif roll < 0.25:
            spec = {"percent": rng.choice([5, 10])}
        if rng.random() < 0.5:
            spec["prefer"] = rng.choice(uuids)
        timeout = 0.05 if rng.random() < 0.05 else cfg["timeout"]
        start = time.monotonic()
        try:
            lease = ledger.acquire(need_of(spec), f"stress::{cfg['worker']}::{cycle}", timeout)
        except LeaseTimeout:
            elapsed = time.monotonic() - start
            stats["timeouts"] += 1
            if elapsed > timeout + cfg["slack"]:
                stats["overrun"].append([timeout, elapsed])
            continue
        except Exception as exc:
            stats["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        elapsed = time.monotonic() - start
        stats["grants"] += 1
        stats["max_wait"] = max(stats["max_wait"], elapsed)
        if elapsed > timeout + cfg["slack"]:
            stats["overrun"].append([timeout, elapsed])
        if cycle == cfg.get("die_at"):
            say(event="holding", key=ledger.owner.key, parts=lease.parts)
            time.sleep(120)
        time.sleep(rng.uniform(0, cfg["hold_max"]))
        ledger.release(lease)
    ledger.close()
    stats["log"] = log
    Path(cfg["result"]).write_text(json.dumps(stats))
    say(event="done")


def role_audit(cfg: dict[str, Any]) -> None:
    """Read every ledger continuously, without the lock and under it, until the stop file shows."""
    folder = open_ledger_folder(cfg["folder"], create=False)
    uuids = [g["uuid"] for g in cfg["gpus"]]
    report: dict[str, Any] = {"reads": 0, "locked_reads": 0, "unreadable": [], "over": [], "peak": {}}
    floor = cfg.get("limit_floor", {})
    while not os.path.exists(cfg["stop"]):
        for n, uuid in enumerate(uuids):
            name = ledger_name(uuid)
            under_lock = report["reads"] % 7 == n
            try:
                if under_lock:
                    with locked(folder, [lock_name(uuid)], 30):
                        data = read_file(folder, name)
                    report["locked_reads"] += 1
                else:
                    # Ledgers are replaced whole: a read without the lock sees one version or
                    # the next, never half of one (it would count as unreadable here).
                    data = read_file(folder, name)
                report["reads"] += 1
                if data is None:
                    continue
                state = parse_gpu_state(data, uuid)
            except (Damaged, OSError) as exc:
                report["unreadable"].append(f"{uuid}: {exc}")
                continue
            booked = sum(b.bytes for b in state.bookings if b.kind != UNKNOWN)
            limit = state.limit()
            if limit is not None and booked > limit:
                report["over"].append([uuid, booked, limit])
            if uuid in floor and len(state.owners) >= floor[uuid][1]:
                # Every session is there: the strictest one's limit holds.
                report["peak_all"] = max(report.get("peak_all", 0), booked)
                if booked > floor[uuid][0]:
                    report["over"].append([uuid, booked, floor[uuid][0], "floor"])
            report["peak"][uuid] = max(report["peak"].get(uuid, 0), booked)
    Path(cfg["result"]).write_text(json.dumps(report))


def role_stream(cfg: dict[str, Any]) -> None:
    """Small leases one after another until the stop file shows."""
    rng = random.Random(cfg["seed"])
    log: list[str] = []
    ledger = open_ledger(cfg, log)
    say(event="ready", key=ledger.owner.key)
    grants = []
    while not os.path.exists(cfg["stop"]):
        lease = ledger.acquire(need_of(cfg["need"]), f"small::{cfg['worker']}", 60)
        grants.append(time.time())
        time.sleep(rng.uniform(cfg["hold_max"] / 2, cfg["hold_max"]))
        ledger.release(lease)
    ledger.close()
    Path(cfg["result"]).write_text(json.dumps({"grants": grants}))


def role_drop_privileges(cfg: dict[str, Any]) -> None:
    """Import everything as root, become another account, then hold a lease like role_hold."""
    warmup = Path(cfg["warmup"])
    warm = dict(cfg, folder=str(warmup), need={"bytes": 1}, test_id="warmup")
    ledger = open_ledger(warm, [])
    ledger.release(ledger.acquire(need_of(warm["need"]), "warmup", 1))
    ledger.snapshot()
    ledger.close()
    try:
        ledger.acquire(need_of(warm["need"]), "warmup", 0)
    except Exception as exc:  # closed: imports the error path too
        str(exc)
    os.setgroups([cfg["gid"]])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    os.umask(0o077)  # the folder's files must still come out group-writable
    role_hold(cfg)


ROLES = {
    "hold": role_hold,
    "stress": role_stress,
    "audit": role_audit,
    "stream": role_stream,
    "drop": role_drop_privileges,
    "owners": role_owners,
    "few_descriptors": role_few_descriptors,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
