"""The examples on the real GPU: ``examples/basic`` and ``examples/pytorch`` at ``-n auto``, with
the JSON report and the timeline drawn from it."""

from __future__ import annotations

import re

from .box import ROOT, Box
from .conftest import Hardware
from .kit import Record, fold, gib, verdict
from .readings import parse_header


def test_examples_at_n_auto_with_report_and_timeline(hardware: Hardware, box: Box, record: Record) -> None:
    """All tests pass at ``-n auto``, no GPU test is left unrun or lost, every PyTorch test is
    measured (NVML or torch), and ``gpushare timeline`` draws the report as SVG."""
    report_path = box.work / "examples.json"
    svg = box.out / "timeline.svg"
    run = box.pytest(
        ROOT,
        "examples/basic",
        "examples/pytorch",
        "-n",
        "auto",
        f"--gpushare-report={report_path}",
        timeout=150,
    )
    assert run.rc == 0, run.failure
    report = box.report("examples", report_path)
    timeline = box.gpushare("timeline", str(report_path), "-o", str(svg))
    drawn = svg.read_text(encoding="utf-8")[:400] if svg.exists() else ""
    outcome = re.findall(r"=+ (.*) in [0-9.]+s", run.output)
    rows = [r for r in report["observed"] if r["test_id"].startswith("examples/pytorch")]
    peaks = [gib(g["peak_bytes"]) for g in report["gpus"].values()]
    line = record.add(
        fold(
            "examples",
            [
                verdict(
                    "run",
                    bool(outcome) and not re.search(r"failed|error|skipped", outcome[-1]),
                    f"{outcome[-1] if outcome else 'no summary'}; {parse_header(run.output).workers_line}; "
                    f"peak leased {peaks}",
                ),
                verdict(
                    "report",
                    not report["not_run"] and not report["lost"],
                    f"not run {report['not_run']}, lost {report['lost']}",
                ),
                verdict(
                    "measured",
                    bool(rows) and all(r["source"] != "not measurable" for r in rows),
                    ", ".join(f"{r['test_id'].split('::')[-1]} {r['source']}" for r in rows),
                ),
                verdict(
                    "timeline",
                    timeline.rc == 0 and "<svg" in drawn,
                    f"{svg.name} {svg.stat().st_size if svg.exists() else 0} bytes",
                ),
            ],
        )
    )
    assert not line.failed, line.text
