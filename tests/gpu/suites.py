"""What the kit runs on the GPU: small generated test suites and helper scripts, as source text.

Each suite is a folder of its own (``Box.suite``) with :data:`PROBE_CONFTEST`, whose ``probe()``
keeps what a process saw as ``probes/<kind>-<pid>-<n>.json`` for the kit to read afterwards.
Everything that touches CUDA checks ``gpu.device`` first, so the same suites run on a simulated
GPU with CPU torch (tests/test_gpu_kit.py, where torch is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template
from typing import Any

PROBE_CONFTEST = '''\
"""Written by the real-GPU kit (tests/gpu/suites.py): what each process saw, kept as JSON."""

import json
import os
import sys
from pathlib import Path

PROBES = Path(__file__).parent / "probes"


def probe(kind, **data):
    """Keep one observation of this process as probes/<kind>-<pid>-<n>.json."""
    data.update(kind=kind, pid=os.getpid(), worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))
    PROBES.mkdir(exist_ok=True)
    n = 0
    while (PROBES / f"{kind}-{os.getpid()}-{n}.json").exists():
        n += 1
    tmp = PROBES / f".{kind}-{os.getpid()}-{n}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, PROBES / f"{kind}-{os.getpid()}-{n}.json")


def nvml_processes(uuid):
    """PID -> bytes on the GPU ``uuid``, as NVML lists them now (asked directly)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        env = os.environ
        probe("worker", cvd=env.get("CUDA_VISIBLE_DEVICES"), order=env.get("CUDA_DEVICE_ORDER"))


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):
        torch = sys.modules.get("torch")
        probe(
            "controller",
            torch_imported=torch is not None,
            cuda_initialized=bool(torch is not None and torch.cuda.is_initialized()),
            cvd=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
'''

NOOP = """\
import pytest
from conftest import probe


@pytest.mark.gpu(mem="1GiB")
def test_noop(gpu):
    probe("noop", uuid=gpu.uuid, device=gpu.device)
"""

PINNING = """\
import os

import pytest
import torch
from conftest import nvml_processes, probe


@pytest.mark.parametrize("i", range($COUNT))
@pytest.mark.gpu(mem="1GiB")
def test_pinned(gpu, i):
    x = torch.ones(1024, device=gpu.device)  # this worker's CUDA context, on its leased device
    cuda = x.is_cuda
    props = torch.cuda.get_device_properties(x.device) if cuda else None
    seen = nvml_processes(gpu.uuid) if cuda else {}
    probe(
        "pinned",
        test=i,
        cvd=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device=gpu.device,
        uuid=gpu.uuid,
        tensor_device=str(x.device),
        current_device=torch.cuda.current_device() if cuda else None,
        device_count=torch.cuda.device_count() if cuda else 0,
        torch_uuid=str(getattr(props, "uuid", "")) if cuda else None,
        nvml_pids=sorted(seen),
        nvml_self=seen.get(os.getpid()),
    )
"""

ALLOCATIONS = """\
import os

import pytest
import torch
from conftest import nvml_processes, probe

SIZES = $SIZES  # test id -> bytes the test allocates; each declares 1 GiB more


@pytest.mark.parametrize(
    "n", [pytest.param(n, marks=pytest.mark.gpu(mem=n + 2**30), id=name) for name, n in SIZES.items()]
)
def test_alloc(gpu, n):
    cuda = gpu.device.startswith("cuda")
    fresh = cuda and not torch.cuda.is_initialized()
    warm = torch.zeros(1, device=gpu.device)  # the CUDA context, where this test is the worker's first
    before = nvml_processes(gpu.uuid).get(os.getpid()) if cuda else None
    reserved = torch.cuda.memory_reserved(gpu.device) if cuda else 0
    x = torch.empty(n, dtype=torch.uint8, device=gpu.device)
    x.fill_(1)
    if cuda:
        torch.cuda.synchronize(gpu.device)
    probe(
        "alloc",
        n=n,
        fresh=fresh,
        nvml_before=before,
        nvml_after=nvml_processes(gpu.uuid).get(os.getpid()) if cuda else None,
        torch_delta=torch.cuda.memory_reserved(gpu.device) - reserved if cuda else None,
    )
    del x, warm
"""

OVER_USER = """\
import pytest
import torch  # imported before the test: --gpushare-enforce caps only a process that uses torch
from conftest import probe


@pytest.mark.gpu(mem=$DECLARED)
def test_over(gpu):
    x = torch.empty($ALLOCATED, dtype=torch.uint8, device=gpu.device)
    x.fill_(1)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    probe("over", n=x.numel())
"""

LEASE_IN_FULL = """\
import pytest
import torch
from conftest import probe


@pytest.mark.gpu(**$MARK)
def test_lease_in_full(gpu):
    # All the lease, allocated for real: the lease fits in what is really free.
    x = torch.empty(gpu.mem, dtype=torch.uint8, device=gpu.device)
    x.fill_(1)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    probe("in_full", mem=gpu.mem)
"""

MORE_THAN_IS_LEFT = """\
import pytest
from conftest import probe


@pytest.mark.gpu(mem=$MEM)
def test_more_than_is_left(gpu):
    probe("granted", mem=gpu.mem)
"""

HOLDER = """\
# Hold N bytes until READY.stop appears: python holder.py N READY [cuda|cpu|none]
import json
import os
import sys
import time

n, ready = int(sys.argv[1]), sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
data = {
    "pid": os.getpid(),
    "bytes": n,
    "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "order": os.environ.get("CUDA_DEVICE_ORDER"),
}
if device != "none":
    import torch

    x = torch.empty(n, dtype=torch.uint8, device=device)
    x.fill_(1)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        data.update(
            device_count=torch.cuda.device_count(),
            current_device=torch.cuda.current_device(),
            reserved=torch.cuda.memory_reserved(x.device),
        )
with open(ready + ".tmp", "w") as f:
    json.dump(data, f)
os.replace(ready + ".tmp", ready)
deadline = time.monotonic() + 900  # never outlive a forgotten kit by much
while not os.path.exists(ready + ".stop") and time.monotonic() < deadline:
    time.sleep(0.05)
"""

CONTEXT = """\
# One CUDA context on an idle GPU, measured by NVML: python context.py UUID
import json
import os
import sys

import pynvml
import torch

pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByUUID(sys.argv[1])
before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
x = torch.zeros(1, device="cuda")
torch.cuda.synchronize()
after = pynvml.nvmlDeviceGetMemoryInfo(handle).used
mine = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
print(json.dumps({
    "device_delta": after - before,
    "process": mine.get(os.getpid()),
    "torch_reserved": torch.cuda.memory_reserved(),
}))
"""


def suite(*test_files: str, **values: Any) -> dict[str, str]:
    """The files of one suite: the probe conftest, and ``test_kit.py`` (``test_kit_1.py``, ...)
    from ``test_files`` with ``$NAME`` filled in from ``values`` (as Python literals)."""
    literals = {k: repr(v) for k, v in values.items()}
    files = {"conftest.py": PROBE_CONFTEST}
    for i, text in enumerate(test_files):
        files[f"test_kit{f'_{i}' if i else ''}.py"] = Template(text).substitute(literals)
    return files


def probes(folder: Path, kind: str) -> list[dict[str, Any]]:
    """What the suite's processes kept with ``probe(kind, ...)``, oldest first per process."""
    return [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted((folder / "probes").glob(f"{kind}-*.json"))
    ]
