"""A fake NVML box whose per-process figures are what the processes say they use.

For conftests of generated suites (tests/test_observed_acceptance.py, tests/test_docs.py): a
process "uses" memory by writing its figure to a file named after its PID in ``$USAGE_DIR``,
which the fake's per-process list (tests/fake_pynvml.py) reads; ``PID_OFFSET`` stands in for
another PID namespace (NVML lists host PIDs this process cannot see).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from fake_pynvml import FakeGpu, FakeNvml

GiB = 2**30
CONTEXT = 300 * 2**20  # what a worker's CUDA context uses on the fake box
USAGE = os.environ.get("USAGE_DIR", "")
box: FakeNvml | None = None


def usage() -> list[tuple[int, int]]:
    out = []
    for name in os.listdir(USAGE):
        if not name.startswith("."):
            with open(os.path.join(USAGE, name)) as f:
                out.append((int(name), int(f.read())))
    return out


def install(uuid: str, **gpu: Any) -> FakeNvml:
    """Put the fake ``pynvml`` of a one-GPU box in place; a worker's context is in use at once."""
    global box
    box = FakeNvml(gpus=[FakeGpu(uuid=uuid, usage=usage, **gpu)])
    sys.modules["pynvml"] = box.module
    if os.environ.get("PYTEST_XDIST_WORKER"):
        use(CONTEXT)  # the worker's CUDA context, there before its first test
    return box


def use(n_bytes: int) -> None:
    # Atomic, as another worker's sampler may read the folder at any moment.
    pid = os.getpid() + int(os.environ.get("PID_OFFSET", "0"))
    fd, tmp = tempfile.mkstemp(dir=USAGE, prefix=".")
    with os.fdopen(fd, "w") as f:
        f.write(str(n_bytes))
    os.replace(tmp, os.path.join(USAGE, str(pid)))


def wait_for_samples(n: int = 3, deadline_s: float = 30.0) -> None:
    """Until the sampler has read the process list ``n`` more times."""
    assert box is not None
    start, end = box.process_reads, time.monotonic() + deadline_s
    while box.process_reads < start + n:
        assert time.monotonic() < end, "the sampler never read the process list"
        time.sleep(0.005)


def peak(n_bytes: int) -> None:
    """Use ``n_bytes`` beside the context until the sampler has seen it, then let go."""
    use(CONTEXT + n_bytes)
    wait_for_samples()
    use(CONTEXT)
