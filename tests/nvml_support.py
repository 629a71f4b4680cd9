"""What the GPU probe tests share: UUIDs, fake boxes, and probing them."""

from __future__ import annotations

from fake_pynvml import FakeGpu, FakeMig

from pytest_gpushare.gpus import GpuInventory
from pytest_gpushare.gpus.nvml import NvmlProbe
from pytest_gpushare.units import GiB

A = "GPU-aaaaaaaa-1111-2222-3333-000000000001"
B = "GPU-bbbbbbbb-1111-2222-3333-000000000002"
C = "GPU-abcdef01-1111-2222-3333-000000000003"
M1 = "MIG-11111111-aaaa-bbbb-cccc-000000000001"
M2 = "MIG-22222222-aaaa-bbbb-cccc-000000000002"

ALL_PIDS = frozenset(range(1, 1 << 22))


def probe(visible: str | None = None, pids: frozenset[int] = ALL_PIDS) -> GpuInventory:
    return NvmlProbe(visible, pid_exists=pids.__contains__).probe()


def uuids(inventory: GpuInventory) -> list[str]:
    return [g.uuid for g in inventory.gpus]


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(A, name="NVIDIA GeForce RTX 4090", total=24 * GiB, used=2 * GiB, bus_id="00000000:01:00.0"),
        FakeGpu(B, name="NVIDIA RTX A6000", total=48 * GiB, used=0, bus_id="00000000:41:00.0"),
    ]


def mig_box() -> list[FakeGpu]:
    migs = [
        FakeMig(
            M1, name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=40 * GiB, used=1 * GiB, gpu_instance_id=1
        ),
        FakeMig(M2, name="NVIDIA A100-SXM4-80GB MIG 1g.10gb", total=10 * GiB, gpu_instance_id=9),
    ]
    return [
        FakeGpu(A, bus_id="00000000:01:00.0"),
        FakeGpu(B, name="NVIDIA A100-SXM4-80GB", total=80 * GiB, bus_id="00000000:81:00.0", mig=migs),
    ]
