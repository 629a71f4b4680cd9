"""What-if patches: measure a proposed change to the ledger before anyone makes it.

Not part of the plugin. Each patch replaces one piece of :mod:`pytest_gpushare.ledger.handle` in the
running process, so a benchmark can show what the change would buy. Call :func:`install`, or
load this module as a pytest plugin (``-p whatif`` with ``bench/`` on ``PYTHONPATH``) with
``BENCH_WHATIF=name[,name]`` in the environment. Importing it changes nothing.

* ``handover``: a lease given back is parked, not written: when the same process next asks for
  the same need and no request waits on its GPUs (the ledgers are read without the lock, and only
  when their header line changed since the last look), the parked lease is handed to the new
  holder with no locked access at all. Anything else gives the parked lease back first, as does a timer
  50 ms after parking, so memory is held for nobody at most that long.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pytest_gpushare.errors import LedgerError
from pytest_gpushare.ledger import folder as ledgerfs
from pytest_gpushare.ledger import handle as _ledger
from pytest_gpushare.ledger.codec import Damaged, parse_gpu_state

ENV = "BENCH_WHATIF"
PARK_S = 0.05


# --- handover -------------------------------------------------------------------------------


def _install_handover() -> None:
    cls = _ledger.Ledger
    orig_acquire, orig_release, orig_close = cls.acquire, cls.release, cls.close

    def state(self: Any) -> dict[str, Any]:
        if "_whatif" not in self.__dict__:
            self.__dict__["_whatif"] = {
                "parked": None,
                "need": None,
                "seen": {},
                "deadline": None,
                "wake": None,
            }
        return self.__dict__["_whatif"]

    def nobody_waits(self: Any, uuids: Sequence[str]) -> bool:
        """No request waits on these GPUs: read without the lock (a torn read is read again),
        and only when a ledger changed since the last look."""
        seen = state(self)["seen"]
        for uuid, sig in zip(uuids, self._signature(list(uuids)), strict=True):
            if sig is None:
                return False
            if seen.get(uuid, (None,))[0] != sig:
                data = ledgerfs.read_file(self._folder, _ledger.ledger_name(uuid))
                if data is None:
                    return False
                try:
                    seen[uuid] = (sig, not parse_gpu_state(data, uuid).waiters)
                except Damaged:
                    return False
            if not seen[uuid][1]:
                return False
        return True

    def give_back_parked(self: Any) -> None:
        st = state(self)
        parked, st["parked"], st["deadline"] = st["parked"], None, None
        if parked is not None:
            orig_release(self, parked)

    def watch(self: Any) -> None:
        # One thread per ledger gives a parked lease back once it has waited PARK_S for a taker.
        # It never holds its condition while taking the ledger's mutex (release takes them the
        # other way round).
        st = state(self)
        while not self._closed:
            with st["wake"]:
                deadline = st["deadline"]
                if deadline is None:
                    st["wake"].wait()
                    continue
                if deadline > time.monotonic():
                    st["wake"].wait(deadline - time.monotonic())
                    continue
            with self._mutex, contextlib.suppress(LedgerError):
                due = st["deadline"]
                if not self._closed and due is not None and due <= time.monotonic():
                    give_back_parked(self)

    def acquire(self: Any, need: Any, test_id: str, timeout: float) -> Any:
        with self._mutex:
            st = state(self)
            parked = st["parked"]
            if parked is not None and st["need"] == need and nobody_waits(self, [u for u, _ in parked.parts]):
                st["parked"], st["deadline"] = None, None
                return replace(parked, test_id=test_id, taken_at=time.time(), waited_s=0.0)
            give_back_parked(self)
        lease = orig_acquire(self, need, test_id, timeout)
        state(self)["need"] = need
        return lease

    def release(self: Any, lease: Any) -> None:
        with self._mutex:
            st = state(self)
            give_back_parked(self)
            if st["wake"] is None:
                st["wake"] = threading.Condition(threading.Lock())
                threading.Thread(target=watch, args=(self,), name="gpushare-parked", daemon=True).start()
            with st["wake"]:
                st["parked"], st["deadline"] = lease, time.monotonic() + PARK_S
                st["wake"].notify()

    def close(self: Any) -> None:
        with self._mutex:
            st = state(self)
            if not self._closed:
                with contextlib.suppress(LedgerError):
                    give_back_parked(self)
        orig_close(self)
        if st["wake"] is not None:
            with st["wake"]:
                st["wake"].notify()

    cls.acquire = acquire  # type: ignore[method-assign]
    cls.release = release  # type: ignore[method-assign]
    cls.close = close  # type: ignore[method-assign]


PATCHES = {"handover": _install_handover}
_installed: set[str] = set()


def install(names: str | Sequence[str]) -> None:
    """Apply the named patches (comma-separated or a list) in this process, once each."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for name in wanted:
        if not name or name in _installed:
            continue
        if name not in PATCHES:
            raise SystemExit(f"unknown what-if patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
        _installed.add(name)


def pytest_configure(config: Any) -> None:
    """Loaded as a pytest plugin (``-p whatif``): apply the patches ``BENCH_WHATIF`` names, in the
    controller and in every xdist worker, before any ledger is opened."""
    install(os.environ.get(ENV, ""))
