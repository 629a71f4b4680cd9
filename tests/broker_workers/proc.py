"""Processes for the broker's tests: ``python proc.py controller|worker CONFIG_JSON``.

Both print one JSON object per line on stdout (events) and take one JSON object per line on
stdin (commands); both end when stdin closes.

* ``controller``: runs a :class:`Broker` on the config's folder and GPUs, prints
  ``{"event": "ready", "input": <worker input>, "key": <controller owner key>}``; commands
  ``{"op": "cancel"}`` (prints ``cancelled`` with the count and the seconds it took).
* ``worker``: connects as ``worker_id``, prints ``connected``; commands
  ``{"op": "acquire", "need": {...}, "test_id": ..., "timeout": ...}`` (prints ``granted`` with
  the lease, or ``refused`` with the error's class and text) and
  ``{"op": "release", "lease_id": ...}`` (prints ``released``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pytest_gpushare.broker import Broker, BrokerClient
from pytest_gpushare.ledger import Lease, Ledger, LedgerGpu, Need, Owner
from pytest_gpushare.units import MemRequest


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def need_of(spec: dict[str, Any]) -> Need:
    mem = MemRequest(percent=spec["percent"]) if "percent" in spec else MemRequest(bytes=spec["bytes"])
    allowed = tuple(spec["allowed"]) if spec.get("allowed") else None
    return Need(mem, spec.get("count", 1), spec.get("exclusive", False), spec.get("prefer"), allowed)


def commands() -> Any:
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


def controller(cfg: dict[str, Any]) -> None:
    gpus = [LedgerGpu(**g) for g in cfg["gpus"]]

    def open_ledger(owner: Owner, context_bytes: int) -> Ledger:
        return Ledger(
            cfg["folder"], gpus, owner, context_bytes=context_bytes, fair_after=cfg.get("fair_after", 2.0)
        )

    broker = Broker(
        open_ledger,
        session_id=cfg.get("session", "broker-session"),
        context_bytes=cfg.get("context", 0),
        linger_s=cfg.get("linger", 60.0),
        log=lambda line: say(event="log", line=line),
    )
    say(event="ready", input=broker.worker_input(), key=broker.box.key)
    for cmd in commands():
        if cmd["op"] == "cancel":
            start = time.monotonic()
            count = broker.cancel()
            say(event="cancelled", count=count, took=time.monotonic() - start)
    broker.close()


def worker(cfg: dict[str, Any]) -> None:
    client = BrokerClient(cfg["input"], cfg["worker_id"], grace_s=cfg.get("grace", 5.0))
    say(event="connected")
    leases: dict[str, Lease] = {}
    for cmd in commands():
        if cmd["op"] == "acquire":
            try:
                lease = client.acquire(need_of(cmd["need"]), cmd["test_id"], cmd.get("timeout", 10.0))
            except Exception as exc:
                say(event="refused", test_id=cmd["test_id"], error=type(exc).__name__, text=str(exc))
                continue
            leases[lease.lease_id] = lease
            say(event="granted", test_id=cmd["test_id"], lease_id=lease.lease_id, parts=lease.parts)
        elif cmd["op"] == "release":
            client.release(leases.pop(cmd["lease_id"]))
            say(event="released", lease_id=cmd["lease_id"])
    client.close()


if __name__ == "__main__":
    {"controller": controller, "worker": worker}[sys.argv[1]](json.loads(sys.argv[2]))
