"""The plugin's own hooks, used from a conftest as a user would (real pytest subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSHARE_LEDGER_DIR", str(tmp_path / "ledger"))
    monkeypatch.setenv("GPUSHARE_OLLAMA", "off")
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "16")


def test_a_conftest_reservation_shows_with_its_reason_and_cuts_the_worker_count(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        from pytest_gpushare import Reservation

        def pytest_gpushare_reservations(config, gpus):
            return [Reservation(g.index, 12 * 2**30, "vLLM server") for g in gpus]
        """
    )
    pytester.makepyfile("def test_a(): pass\n")
    without = pytester.runpytest_subprocess(
        "-n", "auto", "--gpushare-simulate=24GiB", "-p", "no:cacheprovider"
    )
    without.stdout.fnmatch_lines(
        ["*vLLM server 12.0GiB, safety 1.0GiB -> usable 11.0GiB", "created: 3/3 workers"]
    )
    pytester.makeconftest("")
    plain = pytester.runpytest_subprocess("-n", "auto", "--gpushare-simulate=24GiB", "-p", "no:cacheprovider")
    plain.stdout.fnmatch_lines(["*reserve 0B, safety 1.0GiB -> usable 23.0GiB", "created: 7/7 workers"])


def test_a_probe_plugin_replaces_nvml(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        from pytest_gpushare.gpus.model import Gpu, GpuInventory

        def pytest_gpushare_probe(config):
            gpu = Gpu(0, "GPU-rocm-0000", "AMD Instinct MI300X", 192 * 2**30, 180 * 2**30, 12 * 2**30, ())
            return GpuInventory((gpu,), "rocm-smi (conftest)")
        """
    )
    pytester.makepyfile("def test_a(): pass\n")
    result = pytester.runpytest_subprocess("-n", "auto", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "gpushare: VRAM analysis (source: rocm-smi (conftest))",
            "*GPU 0 AMD Instinct MI300X (GPU-rocm-0000): total 192.0GiB, free 180.0GiB*usable 179.0GiB",
            "created: 16/16 workers",
        ]
    )


def test_lease_events_arrive_in_the_worker_with_the_lease(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import json, os
        EVENTS = os.path.join(os.path.dirname(__file__), "events.jsonl")

        def _write(kind, gpus, test_id, seconds):
            with open(EVENTS, "a") as f:
                f.write(json.dumps({"kind": kind, "pid": os.getpid(), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                                    "test_id": test_id, "mem": [g.mem for g in gpus],
                                    "uuids": [g.uuid for g in gpus], "seconds": seconds}) + "\\n")

        def pytest_gpushare_lease_acquired(gpus, test_id, waited):
            _write("acquired", gpus, test_id, waited)

        def pytest_gpushare_lease_released(gpus, test_id, held):
            _write("released", gpus, test_id, held)
        """
    )
    pytester.makepyfile(
        """
        import json, os, pytest

        @pytest.mark.gpu(mem="3GiB", count=2)
        def test_two(gpus):
            with open(os.path.join(os.path.dirname(__file__), "seen.json"), "w") as f:
                json.dump({"pid": os.getpid(), "uuids": [g.uuid for g in gpus]}, f)
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--gpushare-simulate=2x24GiB", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    events = [json.loads(line) for line in (pytester.path / "events.jsonl").read_text().splitlines()]
    seen = json.loads((pytester.path / "seen.json").read_text())
    assert [e["kind"] for e in events] == ["acquired", "released"]
    for e in events:
        assert e["pid"] == seen["pid"] and e["worker"] in ("gw0", "gw1")
        assert e["test_id"] == "test_lease_events_arrive_in_the_worker_with_the_lease.py::test_two"
        assert e["mem"] == [3 * 2**30, 3 * 2**30] and e["uuids"] == seen["uuids"]
    assert events[1]["seconds"] >= 0


def test_a_raising_reservation_hook_is_a_usage_error_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_gpushare_reservations(config, gpus):
            raise ConnectionError("inference server down")
        """
    )
    pytester.makepyfile("def test_a(): pass\n")
    result = pytester.runpytest_subprocess(
        "-n", "auto", "--gpushare-simulate=24GiB", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*gpushare: pytest_gpushare_reservations in *conftest.py raised ConnectionError: inference server down"
        ]
    )


def test_a_reservation_hook_returning_garbage_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("def pytest_gpushare_reservations(config, gpus):\n    return [12]\n")
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_a(): pass\n")
    result = pytester.runpytest_subprocess("--gpushare-simulate=24GiB", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pytest_gpushare_reservations in *conftest.py returned 12: expected Reservation*"]
    )


def test_a_raising_observer_is_reported_and_the_test_passes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "def pytest_gpushare_lease_acquired(gpus, test_id, waited):\n    raise ValueError('metrics down')\n"
    )
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_a(gpu): pass\n")
    result = pytester.runpytest_subprocess("--gpushare-simulate=24GiB", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*pytest_gpushare_lease_acquired in *conftest.py raised ValueError: metrics down (ignored)"]
    )


def test_lease_events_reach_wrappers_and_every_observer_even_past_a_raising_one(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        import os, pytest
        EVENTS = os.path.join(os.path.dirname(__file__), "events.txt")

        def _write(line):
            with open(EVENTS, "a") as f:
                f.write(line + "\\n")

        @pytest.hookimpl(wrapper=True, specname="pytest_gpushare_lease_acquired")
        def pytest_around_lease_acquired(test_id):  # pytest takes only pytest_* names
            _write("wrapper saw " + test_id)
            try:
                return (yield)
            except ValueError as exc:
                _write(f"wrapper saw it raise {exc}")
                raise

        def pytest_gpushare_lease_acquired(test_id):
            raise ValueError("metrics down")

        class Other:
            def pytest_gpushare_lease_acquired(self, test_id):
                _write("other observer saw " + test_id)

        def pytest_configure(config):
            config.pluginmanager.register(Other(), "other-observer")
        """
    )
    pytester.makepyfile(test_a="import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_a(gpu): pass\n")
    result = pytester.runpytest_subprocess("--gpushare-simulate=24GiB", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*pytest_gpushare_lease_acquired in *conftest.py raised ValueError: metrics down (ignored)"]
    )
    events = (pytester.path / "events.txt").read_text().splitlines()
    assert sorted(events) == [
        "other observer saw test_a.py::test_a",
        "wrapper saw it raise metrics down",
        "wrapper saw test_a.py::test_a",
    ]
