"""Worker pinning for real: ``pytest -n 4``, each worker's CUDA_VISIBLE_DEVICES and CUDA device,
and a controller that never starts CUDA."""

from __future__ import annotations

import re

from .box import Box
from .conftest import Hardware
from .kit import Record, mib, verdict
from .suites import PINNING, probes, suite

WORKERS = 4
TESTS = 8
UUID_RE = re.compile(r"^(GPU|MIG)-[0-9a-fA-F-]+$")


def test_workers_are_pinned_and_the_controller_stays_off_cuda(
    hardware: Hardware, box: Box, record: Record
) -> None:
    """Every worker starts with CUDA_VISIBLE_DEVICES naming GPUs by UUID, the first one this
    GPU's; every test sees one device, ``cuda:0``, that is its lease's GPU; the controller
    neither starts CUDA nor shows up in NVML's process list."""
    uuid = hardware.gpu.uuid
    folder = box.suite("pinning", suite(PINNING, COUNT=TESTS))
    run = box.pytest(folder, "-n", str(WORKERS), "--gpushare-report=report.json")
    assert run.rc == 0, run.failure
    box.report("pinning", folder / "report.json")
    workers, pinned, (controller,) = (
        probes(folder, "worker"),
        probes(folder, "pinned"),
        probes(folder, "controller"),
    )

    def uuids(cvd: str | None) -> list[str]:
        return (cvd or "").split(",")

    pins = {w["worker"]: w["cvd"] for w in workers}
    pinned_ok = len(workers) == WORKERS and all(
        uuids(cvd)[0] == uuid and all(UUID_RE.match(u) for u in uuids(cvd)) for cvd in pins.values()
    )
    devices = {(p["device"], p["tensor_device"], p["current_device"], p["device_count"]) for p in pinned}
    torch_uuids = {p["torch_uuid"] for p in pinned} - {""}
    devices_ok = (
        len(pinned) == TESTS
        and devices == {("cuda:0", "cuda:0", 0, len(uuids(pins.get("gw0"))))}
        and {p["uuid"] for p in pinned} == {uuid}
        and all(uuid.endswith(t) for t in torch_uuids)
    )
    # NVML per-process lists show whether the controller holds a context, where they show our PIDs.
    visible = [p for p in pinned if p["pid"] in p["nvml_pids"]]
    controller_listed = any(controller["pid"] in p["nvml_pids"] for p in pinned)
    inherited = box.env.get("CUDA_VISIBLE_DEVICES")  # the controller's own environment stays as it was
    controller_ok = (
        not controller["cuda_initialized"] and not controller_listed and controller["cvd"] == inherited
    )
    contexts = sorted({p["nvml_self"] for p in visible if p["nvml_self"] is not None})
    lines = [
        verdict(
            "pinning",
            pinned_ok,
            f"{len(workers)} workers: "
            + ", ".join(f"{w} CUDA_VISIBLE_DEVICES={c}" for w, c in sorted(pins.items()))
            + f"; CUDA_DEVICE_ORDER={sorted({str(w['order']) for w in workers})}",
        ),
        verdict(
            "worker devices",
            devices_ok,
            f"{len(pinned)} tests on {len({p['worker'] for p in pinned})} workers saw "
            f"(device, tensor, current_device, device_count) {sorted(devices, key=str)}, torch uuid {torch_uuids}",
        ),
        verdict(
            "controller",
            controller_ok,
            f"pid {controller['pid']}: torch imported {controller['torch_imported']}, "
            f"CUDA initialised {controller['cuda_initialized']}, CUDA_VISIBLE_DEVICES {controller['cvd']}; "
            f"in NVML's list: {controller_listed} (NVML lists our workers in {len(visible)}/{len(pinned)} tests; "
            f"worker contexts {[mib(c) for c in contexts]})",
        ),
    ]
    for line in lines:
        record.add(line)
    assert not any(line.failed for line in lines), [line.text for line in lines if line.failed]
