"""Acceptance: real ``pytest -n`` subprocesses with the plugin installed, on simulated GPUs.

Each test suite written here records, from inside its tests and through the ledger, what was
booked on the GPU while it ran; the assertions read those records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until
from edge_support import stranger

from pytest_gpushare.ledger import read_status

pytest_plugins = ["pytester"]

GiB = 2**30

# A conftest for the suites under test: each GPU test records the ledger's view of its GPU(s).
RECORDING_CONFTEST = """
import json, os, time
import pytest
from pytest_gpushare.ledger import read_status

@pytest.fixture
def record(request, gpus):
    folder = os.environ["GPUSHARE_LEDGER_DIR"]
    out = os.environ["RECORD_DIR"]
    def snap():
        status = read_status(folder)
        return [
            {"uuid": g["uuid"], "limit": g["limit_bytes"], "booked": g["booked_bytes"],
             "tests": [l["bytes"] for l in g["leases"] if l["kind"] == "test"]}
            for g in status["gpus"]
        ]
    views = [snap()]
    yield
    views.append(snap())
    name = request.node.nodeid.replace("/", "_").replace(":", "_")
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"test": request.node.nodeid, "pid": os.getpid(),
                   "devices": [g.device for g in gpus], "uuids": [g.uuid for g in gpus],
                   "mem": [g.mem for g in gpus], "views": views}, f)
"""


@pytest.fixture
def env(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    ledger = tmp_path / "ledger"
    records = tmp_path / "records"
    records.mkdir()
    values = {
        "GPUSHARE_LEDGER_DIR": str(ledger),
        "GPUSHARE_OLLAMA": "off",
        "RECORD_DIR": str(records),
        "PYTEST_XDIST_AUTO_NUM_WORKERS": "4",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("GPUSHARE_") and k not in values]:
        monkeypatch.delenv(key)
    pytester.makeconftest(RECORDING_CONFTEST)
    return values


def records(env: dict[str, str]) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(Path(env["RECORD_DIR"]).glob("*.json"))]


PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider")  # a session run with Popen


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


SPEC_FLAGS = (
    "--gpushare-simulate=24GiB:used=2GiB",
    "--gpushare-ollama-reserve=12GiB",
    "--gpushare-safety=1GiB",
    "--gpushare-worker-mem=3GiB",
    "--gpushare-workers-per-gb=0.25",
)


def test_spec_example_creates_two_workers(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    result = run(pytester, "-n", "auto", *SPEC_FLAGS)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "gpushare: VRAM analysis (source: simulated (24GiB:used=2GiB))",
            "*GPU 0 Simulated GPU*total 24.0GiB, free 22.0GiB, Ollama hold 12.0GiB, safety 1.0GiB -> usable 9.0GiB",
            "*workers: 2 (floor(9.0GiB / 3.0GiB) = 3; workers-per-gb cap floor(9.0 × 0.25) = 2;*bound by workers-per-gb)",
            "created: 2/2 workers",
        ]
    )


def test_two_80gib_gpus_give_the_formula_count(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile("def test_a(): pass\n")
    # 2 × floor(67GiB / 3GiB) = 44, capped by floor(134 × 0.25) = 33, by xdist's own count 4
    result = run(pytester, "-n", "auto", *SPEC_FLAGS[1:], "--gpushare-simulate=2x80GiB")
    result.stdout.fnmatch_lines(
        ["*workers: 4 (*= 44; workers-per-gb cap floor(134.0 × 0.25) = 33;*", "created: 4/4 workers"]
    )
    result = run(pytester, "-n", "auto", "--gpushare-simulate=2x80GiB", "--gpushare-max-workers=3")
    result.stdout.fnmatch_lines(["*bound by max-workers)", "created: 3/3 workers"])


def test_no_gpu_uses_xdists_count_and_says_why(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        "import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_g(): pass\ndef test_c(): pass\n"
    )
    result = run(pytester, "-n", "auto", "--gpushare-simulate=none", "-rs")
    result.stdout.fnmatch_lines(
        [
            "*no GPU: GPU tests follow --gpushare-fallback*",
            "*workers: 4 (no GPU found: xdist's own count 4; bound by no GPU found)",
            "created: 4/4 workers",
            "*1 GPU tests not run*",
        ]
    )
    result.assert_outcomes(passed=1, skipped=1)


CONTENTION_SUITE = """
import time, pytest

@pytest.mark.parametrize("i", range(6))
@pytest.mark.gpu(mem="6GiB")
def test_big(record, i):
    time.sleep(0.15)

@pytest.mark.parametrize("i", range(10))
@pytest.mark.gpu(mem="2GiB")
def test_small(record, i):
    time.sleep(0.05)

@pytest.mark.gpu(mem="3GiB", count=2)
def test_two(record, gpus):
    assert len({g.uuid for g in gpus}) == 2
    time.sleep(0.05)

@pytest.mark.gpu(exclusive=True)
def test_alone(record, gpu):
    time.sleep(0.1)
"""


@pytest.mark.parametrize("workers", ["2", "4"])
def test_leases_never_exceed_usable(pytester: pytest.Pytester, env: dict[str, str], workers: str) -> None:
    pytester.makepyfile(CONTENTION_SUITE)
    result = run(pytester, "-n", workers, "--gpushare-simulate=2x12GiB", "--gpushare-report=report.json")
    result.assert_outcomes(passed=18)
    recs = records(env)
    assert len(recs) == 18
    usable = 11 * GiB  # 12GiB - 1GiB safety
    for rec in recs:
        for view in rec["views"]:  # type: ignore[union-attr]
            for gpu in view:
                assert gpu["limit"] == usable
                assert gpu["booked"] <= gpu["limit"], rec["test"]
                # tests needing more than half the usable memory never overlap
                assert sum(1 for b in gpu["tests"] if b > usable // 2) <= 1, rec["test"]
    two = next(r for r in recs if "test_two" in str(r["test"]))
    assert len(set(two["uuids"])) == 2  # type: ignore[arg-type]
    alone = next(r for r in recs if "test_alone" in str(r["test"]))
    for gpu in alone["views"][0]:  # type: ignore[index]
        if gpu["uuid"] == alone["uuids"][0]:  # type: ignore[index]
            assert len(gpu["tests"]) == 1  # only its own lease on its GPU
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["version"] == 1
    assert len(report["leases"]) == 18
    for uuid, gpu in report["gpus"].items():
        assert gpu["peak_bytes"] <= report["usable_bytes"][uuid]


def test_two_sessions_share_a_gpu_without_overcommit(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        """
        import time, pytest
        @pytest.mark.parametrize("i", range(6))
        @pytest.mark.gpu(mem="5GiB")
        def test_hold(record, i):
            time.sleep(0.1)
        """
    )
    cmd = [*PYTEST, "-n", "2", "--gpushare-simulate=16GiB", "-q"]
    procs = [
        subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    recs = records(env)
    assert len(recs) == 6  # the same node ids: the files of the two sessions overwrite per test
    for rec in recs:
        for view in rec["views"]:  # type: ignore[union-attr]
            for gpu in view:
                assert gpu["booked"] <= gpu["limit"] == 15 * GiB


def test_worker_killed_mid_test_leaves_no_lease(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        """
        import os, signal, time, pytest
        @pytest.mark.gpu(mem="4GiB")
        def test_crash(gpu):
            os.kill(os.getpid(), signal.SIGKILL)

        @pytest.mark.parametrize("i", range(4))
        @pytest.mark.gpu(mem="4GiB")
        def test_after(record, i):
            time.sleep(0.05)
        """
    )
    result = run(pytester, "-n", "2", "--gpushare-simulate=8GiB")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*lost: *test_crash*"])
    status = read_status(env["GPUSHARE_LEDGER_DIR"])
    for gpu in status["gpus"]:
        assert gpu["leases"] == []
    # the replacement worker got a home GPU: its tests leased and ran
    assert len(records(env)) == 4


FALLBACK_SUITE = """
import pytest
@pytest.mark.gpu(mem="1GiB")
def test_gpu(gpu):
    assert gpu.is_cpu and gpu.device == "cpu"
"""


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("skip", {"skipped": 1}), ("cpu", {"passed": 1}), ("fail", {"errors": 1})],
)
def test_fallback_modes(
    pytester: pytest.Pytester, env: dict[str, str], mode: str, outcome: dict[str, int]
) -> None:
    pytester.makepyfile(FALLBACK_SUITE)
    result = run(pytester, "--gpushare-simulate=none", f"--gpushare-fallback={mode}")
    result.assert_outcomes(**outcome)
    result.stdout.fnmatch_lines(["*1 GPU tests not run*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("mem='-1GiB'", "*the marker on test_bad.py::test_bad: a size cannot be negative*"),
        ("mem='lots'", "*the marker on test_bad.py::test_bad: not a size*"),
        ("mem=0", "*the marker on test_bad.py::test_bad: must be larger than zero*"),
        ("count=0", "*count must be an integer >= 1*"),
        ("mem='1GiB', colour='red'", "*unknown keyword 'colour'*"),
        ("mem='150%'", "*percentage must lie in (0, 100]*"),
    ],
)
def test_bad_marker_fails_only_that_test(
    pytester: pytest.Pytester, env: dict[str, str], marker: str, message: str
) -> None:
    pytester.makepyfile(
        test_bad=f"import pytest\n@pytest.mark.gpu({marker})\ndef test_bad(): pass\ndef test_ok(): pass\n"
    )
    result = run(pytester, "--gpushare-simulate=24GiB")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([message])


def test_need_that_never_fits_is_skipped_or_fails(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        "import pytest\n@pytest.mark.gpu(mem='30GiB')\ndef test_huge(): pass\n"
        "@pytest.mark.gpu(mem='1GiB', count=3)\ndef test_three(): pass\n"
    )
    result = run(pytester, "--gpushare-simulate=24GiB", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*2 GPU tests not run*"])
    result.stdout.fnmatch_lines(["SKIPPED ?1? test_need*.py:*: gpushare: *test_huge needs 30.0GiB*"])
    result = run(pytester, "--gpushare-simulate=24GiB", "--gpushare-fallback=fail")
    result.assert_outcomes(errors=2)


def test_waiting_line_names_the_holder(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    # A stranger holds the GPU through the ledger (a `gpushare run` stand-in) until its stdin closes.
    out = pytester.path / "session.out"
    with stranger("8GiB", 6 * GiB, "stranger::big_job") as holder:
        pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='4GiB')\ndef test_wait(gpu): pass\n")
        with out.open("w") as sink:
            session = subprocess.Popen(
                [*PYTEST, "-n", "1", "--gpushare-simulate=8GiB", "--gpushare-notice-after=0.2"],
                cwd=pytester.path,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                lambda: " has waited " in out.read_text(), "the waiting line", timeout=120, proc=session
            )
            assert holder.stdin is not None
            holder.stdin.close()  # the stranger leaves
            assert session.wait(timeout=120) == 0, out.read_text()
        finally:
            session.kill()
            session.wait()
    result = pytest.LineMatcher(out.read_text().splitlines())
    result.fnmatch_lines(["*::test_wait (gw0) has waited *s for 4.0GiB; held by stranger::big_job*"])
    result.fnmatch_lines(["*1 passed*"])
    result.fnmatch_lines(["*waited longest for memory:*", "*s *::test_wait"])


def test_plugin_disabled_runs_marked_suite(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='4GiB')\ndef test_g(): pass\n")
    result = run(pytester, "-p", "no:gpushare", "-n", "2")
    result.assert_outcomes(passed=1)
    assert "gpushare" not in result.stdout.str().split("short test summary")[0].split("created")[0].lower()


def test_bad_setting_is_a_usage_error(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile("def test_a(): pass\n")
    result = run(pytester, "-n", "auto", "--gpushare-safety=-1GiB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpushare-safety: a size cannot be negative: '-1GiB'*"])


def test_help_and_markers_never_plan(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    # A probe that would fail loudly if asked: --help and --markers must not ask it.
    pytester.makeconftest(
        "import pytest\n@pytest.hookimpl(tryfirst=True)\ndef pytest_gpushare_probe(config):\n"
        "    raise RuntimeError('probed')\n"
    )
    for args in (["--help"], ["--markers"], ["-n", "auto", "--help"], ["--version"]):
        result = run(pytester, *args)
        assert result.ret == 0, args
        assert "probed" not in result.stdout.str() + result.stderr.str()
    assert "gpu(mem=None, count=1, exclusive=False)" in run(pytester, "--markers").stdout.str()


def test_strict_markers_accept_gpu(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_g(gpu): pass\n")
    result = run(pytester, "--strict-markers", "-W", "error", "--gpushare-simulate=8GiB")
    result.assert_outcomes(passed=1)


def test_keyboard_interrupt_releases_the_lease(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        "import pytest\n@pytest.mark.gpu(mem='4GiB')\ndef test_int(gpu):\n    raise KeyboardInterrupt\n"
    )
    result = run(pytester, "--gpushare-simulate=8GiB")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert all(g["leases"] == [] for g in read_status(env["GPUSHARE_LEDGER_DIR"])["gpus"])


def test_sigkilled_single_process_lease_is_reclaimed(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    flag = pytester.path / "holding"
    pytester.makepyfile(
        f"""
        import pathlib, time, pytest
        @pytest.mark.gpu(mem="6GiB")
        def test_hold(gpu):
            pathlib.Path({str(flag)!r}).write_text("x")
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [*PYTEST, "--gpushare-simulate=8GiB"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(flag.exists, "the test to hold its lease", timeout=60, proc=proc)
    assert any(g["leases"] for g in read_status(env["GPUSHARE_LEDGER_DIR"])["gpus"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = read_status(env["GPUSHARE_LEDGER_DIR"])
    assert all(g["leases"] == [] for g in status["gpus"])
    assert any("test_hold" in json.dumps(r) for r in status["reclaimed"])


def test_report_has_each_tests_outcome_and_lease_blocks(
    pytester: pytest.Pytester, env: dict[str, str]
) -> None:
    pytester.makepyfile(
        """
        import pytest
        import pytest_gpushare

        @pytest.fixture(scope="module")
        def model():
            with pytest_gpushare.lease(mem="2GiB", name="the model") as gpus:
                yield gpus[0]

        @pytest.mark.gpu(mem="1GiB")
        def test_fails(gpu, model):
            assert model.mem == 2 * 2**30
            assert False

        @pytest.mark.gpu(mem="1GiB")
        def test_passes(gpu, model):
            pass
        """
    )
    result = run(pytester, "-n", "2", "--gpushare-simulate=24GiB", "--gpushare-report=report.json")
    result.assert_outcomes(passed=1, failed=1)
    report = json.loads((pytester.path / "report.json").read_text())
    outcomes = {x["test_id"].split("::")[-1]: x["outcome"] for x in report["leases"]}
    assert outcomes["test_fails"] == "failed"
    assert outcomes["test_passes"] == "passed"
    blocks = [x for x in report["leases"] if x["outcome"] == "lease()"]
    assert blocks and all(b["test_id"] == "the model [lease()]" for b in blocks)
    assert all(b["gpus"][0]["bytes"] == 2 * GiB for b in blocks)


def test_unsafe_ledger_folder_is_a_usage_error(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    folder = pytester.path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    pytester.makepyfile("import pytest\n@pytest.mark.gpu(mem='1GiB')\ndef test_a(): pass\n")
    result = run(pytester, f"--gpushare-ledger-dir={folder}", "--gpushare-simulate=24GiB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gpushare: ledger folder *shared*chmod*"])


def test_a_skipped_gpu_test_takes_no_lease(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.skipif(True, reason='not today')\n@pytest.mark.gpu(mem='4GiB')\ndef test_s(gpu): pass\n"
        "@pytest.mark.skip\n@pytest.mark.gpu(mem='4GiB')\ndef test_t(gpu): pass\n"
    )
    result = run(pytester, "--gpushare-simulate=24GiB", "--gpushare-report=report.json")
    result.assert_outcomes(skipped=2)
    assert json.loads((pytester.path / "report.json").read_text())["leases"] == []


def test_status_json_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_gpushare", "status", "--json", "--ledger-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written (`| head` that quit)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_marker_validation_is_per_marker_even_when_cached(
    pytester: pytest.Pytester, env: dict[str, str]
) -> None:
    # 1 == True in Python: a per-process cache of validated markers must still tell them apart.
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.gpu(mem=1)\ndef test_one_byte(gpu): assert gpu.mem == 1\n"
        "@pytest.mark.gpu(mem=True)\ndef test_bool(gpu): pass\n"
        "@pytest.mark.gpu(mem=1)\ndef test_one_byte_again(gpu): assert gpu.mem == 1\n"
    )
    result = run(pytester, "--gpushare-simulate=8GiB")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the marker on *::test_bool: not a size: True*"])


def test_bad_lease_arguments_name_the_lease(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    pytester.makepyfile(
        """
        import pytest
        import pytest_gpushare

        @pytest.fixture(scope="module")
        def model():
            with pytest_gpushare.lease(mem="-1GiB", name="the model") as gpus:
                yield gpus[0]

        def test_uses(model):
            pass
        """
    )
    result = run(pytester, "--gpushare-simulate=8GiB")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*pytest_gpushare.lease() of the model: a size cannot be negative: '-1GiB'*"]
    )


def test_lease_in_a_fixture_before_any_gpu_test(pytester: pytest.Pytester, env: dict[str, str]) -> None:
    # The session's first lease comes from a fixture of a test that is not a GPU test itself.
    pytester.makepyfile(
        """
        import pytest
        import pytest_gpushare

        @pytest.fixture(scope="module")
        def model():
            with pytest_gpushare.lease(mem="2GiB", name="the model") as gpus:
                yield gpus[0]

        def test_uses(model):
            assert model.mem == 2 * 2**30
        """
    )
    result = run(pytester, "--gpushare-simulate=8GiB", "--gpushare-report=report.json")
    result.assert_outcomes(passed=1)
    leases = json.loads((pytester.path / "report.json").read_text())["leases"]
    assert [x["test_id"] for x in leases] == ["the model [lease()]"]
