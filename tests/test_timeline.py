"""The SVG timeline: geometry read back from the picture's own axes, escaping, validation, the command."""

from __future__ import annotations

import copy
import itertools
import json
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_gpushare.commands.timeline import cmd_timeline
from pytest_gpushare.gpus import SimulatedProbe
from pytest_gpushare.planner import Budget, make_plan
from pytest_gpushare.report import json_report, summarize, worker_wait_text
from pytest_gpushare.runtime import LeaseRecord
from pytest_gpushare.timeline import render_svg

GIB = 2**30
NS = {"s": "http://www.w3.org/2000/svg"}
STARTED, FINISHED = 1000.0, 1100.0
ODD_ID = "tests/test_a.py::test_x[<a&b>-\"q\"-'r']"
ODD_NAME = 'RTX <4090> & "Ti"'


def gpu_entry(index: int, uuid: str, name: str, total: int, usable: int) -> dict[str, Any]:
    gpu = {"index": index, "uuid": uuid, "name": name, "total_bytes": total, "free_bytes": total}
    return {
        "gpu": gpu,
        "usable_bytes": usable,
        "capacity_bytes": usable,
        "reservations": [],
        "safety_bytes": GIB,
    }


def lease(
    test_id: str, worker: str, parts: list[tuple[str, int, int]], taken: float, released: float | None
) -> dict[str, Any]:
    return {
        "test_id": test_id,
        "worker": worker,
        "gpus": [{"uuid": u, "index": i, "bytes": b} for u, i, b in parts],
        "waited_s": 0.5,
        "taken_at": taken,
        "released_at": released,
        "held_s": None if released is None else released - taken,
        "outcome": "passed",
    }


def make_report(leases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": 1,
        "started": STARTED,
        "finished": FINISHED,
        "plan": {
            "gpus": [
                gpu_entry(0, "GPU-aaa", ODD_NAME, 24 * GIB, 20 * GIB),
                gpu_entry(1, "GPU-bbb", "A100", 80 * GIB, 70 * GIB),
            ],
            "inventory": {},
            "budget": {"context_bytes": GIB // 2},
        },
        "usable_bytes": {"GPU-aaa": 20 * GIB, "GPU-bbb": 70 * GIB},
        "leases": leases,
        "gpus": {},
        "waited_longest": [],
        "not_run": [],
        "lost": [],
        "log": [],
    }


A, B = ("GPU-aaa", 0), ("GPU-bbb", 1)
LEASES = [
    lease(ODD_ID, "gw0", [(*A, 4 * GIB)], 1010, 1040),
    lease("t::overlapping", "gw1", [(*A, 8 * GIB)], 1020, 1060),
    lease("t::on_top_then_settles", "gw0", [(*A, 1 * GIB)], 1025, 1090),
    lease("t::after_first", "gw0", [(*A, 2 * GIB)], 1045, 1070),
    lease("t::two_gpus", "gw1", [(*A, 3 * GIB), (*B, 10 * GIB)], 1065, 1080),
    lease("t::never_released", "gw2", [(*B, 20 * GIB)], 1050, None),
    lease("t::back_to_back", "gw2", [(*B, 5 * GIB)], 1030, 1050),
]


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def panel_of(root: ET.Element, uuid: str) -> ET.Element:
    (panel,) = [g for g in root.iter(f"{{{NS['s']}}}g") if g.get("data-uuid") == uuid]
    return panel


def line(panel: ET.Element, cls: str) -> ET.Element:
    (found,) = [x for x in panel.iter(f"{{{NS['s']}}}line") if x.get("class") == cls]
    return found


class Geometry:
    """Time and bytes -> pixels, read from the panel's baseline (0 bytes, started to finished) and total."""

    def __init__(self, panel: ET.Element, total: int) -> None:
        base = line(panel, "baseline")
        self.left, self.right = float(base.get("x1", "")), float(base.get("x2", ""))
        self.base = float(base.get("y1", ""))
        self.px_per_byte = (self.base - float(line(panel, "total").get("y1", ""))) / total

    def x(self, t: float) -> float:
        return self.left + (t - STARTED) / (FINISHED - STARTED) * (self.right - self.left)

    def y(self, n_bytes: float) -> float:
        return self.base - n_bytes * self.px_per_byte


def bands(panel: ET.Element) -> list[tuple[str, str, list[tuple[float, float, float, float]]]]:
    """``(tooltip, fill, [(x, y, width, height), ...])`` per band."""
    out = []
    for g in panel.iter(f"{{{NS['s']}}}g"):
        if g.get("class") != "band":
            continue
        title = g.find("s:title", NS)
        assert title is not None
        rects = [
            tuple(float(r.get(k, "")) for k in ("x", "y", "width", "height")) for r in g.findall("s:rect", NS)
        ]
        out.append((title.text or "", g.get("fill", ""), rects))
    return out  # type: ignore[return-value]


def leased_at(leases: list[dict[str, Any]], uuid: str, t: float) -> int:
    total = 0
    for x in leases:
        end = FINISHED if x["released_at"] is None else x["released_at"]
        if x["taken_at"] <= t < end:
            total += sum(p["bytes"] for p in x["gpus"] if p["uuid"] == uuid)
    return total


def sample_times(leases: list[dict[str, Any]]) -> list[float]:
    """Midpoints between consecutive lease events: never on a band's edge."""
    edges = sorted(
        {STARTED, FINISHED} | {x["taken_at"] for x in leases} | {x["released_at"] or FINISHED for x in leases}
    )
    return [(a + b) / 2 for a, b in itertools.pairwise(edges)]


@pytest.fixture(scope="module")
def svg() -> str:
    return render_svg(make_report(LEASES))


@pytest.mark.parametrize(("uuid", "total"), [("GPU-aaa", 24 * GIB), ("GPU-bbb", 80 * GIB)])
def test_one_band_per_lease_part(svg: str, uuid: str, total: int) -> None:
    got = sorted(t.splitlines()[0] for t, _, _ in bands(panel_of(parse(svg), uuid)))
    want = sorted(x["test_id"] for x in LEASES for p in x["gpus"] if p["uuid"] == uuid)
    assert got == want


@pytest.mark.parametrize(("uuid", "total"), [("GPU-aaa", 24 * GIB), ("GPU-bbb", 80 * GIB)])
def test_bands_never_overlap(svg: str, uuid: str, total: int) -> None:
    rects = [r for _, _, rs in bands(panel_of(parse(svg), uuid)) for r in rs]
    assert len(rects) >= 3
    for i, (x1, y1, w1, h1) in enumerate(rects):
        for x2, y2, w2, h2 in rects[i + 1 :]:
            overlap_x = min(x1 + w1, x2 + w2) - max(x1, x2)
            overlap_y = min(y1 + h1, y2 + h2) - max(y1, y2)
            assert overlap_x <= 0.02 or overlap_y <= 0.02, ((x1, y1, w1, h1), (x2, y2, w2, h2))


@pytest.mark.parametrize(("uuid", "total"), [("GPU-aaa", 24 * GIB), ("GPU-bbb", 80 * GIB)])
def test_stack_height_equals_leased_total_at_every_moment(svg: str, uuid: str, total: int) -> None:
    panel = panel_of(parse(svg), uuid)
    geo = Geometry(panel, total)
    rects = [r for _, _, rs in bands(panel) for r in rs]
    for t in sample_times(LEASES):
        x = geo.x(t)
        here = [r for r in rects if r[0] < x < r[0] + r[2]]
        want = leased_at(LEASES, uuid, t)
        assert sum(r[3] for r in here) == pytest.approx(want * geo.px_per_byte, abs=0.05), t
        if want:
            # No hole: the stack sits on the baseline and its top is the leased total.
            assert max(r[1] + r[3] for r in here) == pytest.approx(geo.base, abs=0.02), t
            assert min(r[1] for r in here) == pytest.approx(geo.y(want), abs=0.05), t


def test_a_band_settles_when_a_lease_below_it_ends(svg: str) -> None:
    (settles,) = [rs for t, _, rs in bands(panel_of(parse(svg), "GPU-aaa")) if "on_top_then_settles" in t]
    assert len(settles) > 1
    assert settles[0][1] < settles[-1][1]  # smaller y is higher: it moved down


def test_usable_and_total_lines(svg: str) -> None:
    panel = panel_of(parse(svg), "GPU-aaa")
    usable, total, base = line(panel, "usable"), line(panel, "total"), line(panel, "baseline")
    y_base, y_total = float(base.get("y1", "")), float(total.get("y1", ""))
    assert float(usable.get("y1", "")) == pytest.approx(y_base - (y_base - y_total) * 20 / 24, abs=0.02)
    assert usable.get("stroke-dasharray")
    assert total.get("stroke-dasharray") is None
    assert usable.get("x2") == base.get("x2")


def label_y(panel: ET.Element, cls: str) -> float:
    (text,) = [t for t in panel.iter(f"{{{NS['s']}}}text") if (t.text or "").startswith(f"{cls} ")]
    return float(text.get("y", "")) + float(text.get("dy", "0"))


@pytest.mark.parametrize("usable", [24 * GIB, 24 * GIB - 1, 23 * GIB, 22 * GIB, 20 * GIB, 0])
def test_total_and_usable_labels_never_overlap(usable: int) -> None:
    report = make_report(LEASES)
    report["plan"]["gpus"][0] = gpu_entry(0, "GPU-aaa", "X", 24 * GIB, usable)
    report["usable_bytes"]["GPU-aaa"] = usable
    panel = panel_of(parse(render_svg(report)), "GPU-aaa")
    total_y, usable_y = label_y(panel, "total"), label_y(panel, "usable")
    assert usable_y - total_y >= 12  # 11px text: the total's label above, the usable's below
    # Each label stays by its own line, whichever way it had to move.
    for cls, y in (("total", total_y), ("usable", usable_y)):
        assert abs(y - 4 - float(line(panel, cls).get("y1", ""))) <= 12


def test_unreleased_lease_is_drawn_to_the_end_of_the_run(svg: str) -> None:
    panel = panel_of(parse(svg), "GPU-bbb")
    (rects,) = [rs for t, _, rs in bands(panel) if t.startswith("t::never_released")]
    (tip,) = [t for t, _, _ in bands(panel) if t.startswith("t::never_released")]
    assert rects[-1][0] + rects[-1][2] == pytest.approx(
        float(line(panel, "baseline").get("x2", "")), abs=0.02
    )
    assert "still held when the run finished" in tip


def test_tooltip_names_size_worker_waited_and_held(svg: str) -> None:
    tips = {t.splitlines()[0]: t for t, _, _ in bands(panel_of(parse(svg), "GPU-bbb"))}
    assert tips["t::two_gpus"].splitlines()[1:4] == [
        "10.0GiB on GPU 1 (one of 2 GPUs)",
        "worker gw1",
        "waited 0.5s, held 15.0s",
    ]


def test_text_is_escaped(svg: str) -> None:
    assert "<a&b>" not in svg and ODD_NAME not in svg
    root = parse(svg)
    tips = [t for t, _, _ in bands(panel_of(root, "GPU-aaa"))]
    assert any(t.splitlines()[0] == ODD_ID for t in tips)
    texts = ["".join(x.itertext()) for x in root.iter(f"{{{NS['s']}}}text")]
    assert f"GPU 0 {ODD_NAME}: peak 13.0GiB of 20.0GiB usable, 5 lease(s)" in texts


def test_control_characters_and_lone_surrogates_still_make_xml() -> None:
    report = make_report([lease("t::bad[\x01\ud800]", "gw0", [(*A, GIB)], 1010, 1020)])
    parse(render_svg(report))


def test_colour_per_worker_and_legend(svg: str) -> None:
    root = parse(svg)
    fills: dict[str, set[str]] = {}
    for panel in ("GPU-aaa", "GPU-bbb"):
        for tip, fill, _ in bands(panel_of(root, panel)):
            fills.setdefault(tip.splitlines()[2], set()).add(fill)
    assert all(len(f) == 1 for f in fills.values())
    assert len({f for fs in fills.values() for f in fs}) == 3
    texts = {"".join(x.itertext()) for x in root.iter(f"{{{NS['s']}}}text")}
    assert {"worker gw0", "worker gw1", "worker gw2"} <= texts


@pytest.mark.parametrize("with_gpus", [True, False])
def test_no_leases_is_a_readable_picture(with_gpus: bool) -> None:
    report = make_report([])
    if not with_gpus:
        report["plan"]["gpus"], report["usable_bytes"] = [], {}
    root = parse(render_svg(report))
    text = " ".join("".join(x.itertext()) for x in root.iter(f"{{{NS['s']}}}text"))
    assert "no leases" in text
    assert ("no leases on this GPU" in text) is with_gpus


def test_the_report_the_plugin_writes_renders() -> None:
    """Guards against the writer and the reader drifting apart."""
    inventory = SimulatedProbe("24GiB,16GiB:name=RTX <&>").probe()
    plan = make_plan(inventory, Budget(safety_bytes=GIB, worker_mem_bytes=3 * GIB, context_bytes=GIB // 2))
    g0, g1 = inventory.gpus
    done = LeaseRecord("t::one", "gw0", [(g0.uuid, 0, 2 * GIB)], 0.1, STARTED + 1, STARTED + 3)
    both = LeaseRecord("t::two", "gw1", [(g0.uuid, 0, GIB), (g1.uuid, 1, GIB)], 0.0, STARTED + 2)
    collected = [{"test_id": r.test_id, "lease": r.to_dict(), "outcome": "passed"} for r in (done, both)]
    report = json.loads(
        json.dumps(json_report(plan, summarize(collected, [], STARTED + 5, plan), STARTED, STARTED + 5))
    )
    root = parse(render_svg(report))
    assert len(bands(panel_of(root, g0.uuid))) == 2
    assert len(bands(panel_of(root, g1.uuid))) == 1


def test_a_lease_on_a_gpu_missing_from_the_plan_still_gets_a_panel() -> None:
    report = make_report([lease("t::elsewhere", "gw0", [("GPU-ccc", 2, 6 * GIB)], 1010, 1020)])
    report["usable_bytes"]["GPU-ccc"] = 9 * GIB
    root = parse(render_svg(report))
    panel = panel_of(root, "GPU-ccc")
    assert len(bands(panel)) == 1
    texts = ["".join(x.itertext()) for x in panel.iter(f"{{{NS['s']}}}text")]
    assert "GPU 2 (not in the plan): peak 6.0GiB of 9.0GiB usable, 1 lease(s)" in texts


# --- the waits ---------------------------------------------------------------------------------


def wait_rows(root: ET.Element) -> dict[str, ET.Element]:
    (waits,) = [g for g in root.iter(f"{{{NS['s']}}}g") if g.get("class") == "waits"]
    return {
        g.get("data-worker", ""): g for g in waits.iter(f"{{{NS['s']}}}g") if g.get("class") == "wait-row"
    }


def spans(row: ET.Element, cls: str) -> list[tuple[float, float]]:
    (group,) = [g for g in row.iter(f"{{{NS['s']}}}g") if g.get("class") == cls]
    return [(float(r.get("x", "")), float(r.get("x", "")) + float(r.get("width", ""))) for r in group]


def test_each_wait_is_drawn_with_its_stretch_of_room() -> None:
    waits = [
        {**lease("t::holds", "gw0", [(*A, 16 * GIB)], 1010, 1050), "waited_s": 0.0},
        # Waits over [1020, 1050) with 20 - 16 - gw0's 0.5GiB context = 3.5GiB free: t::small's 2GiB
        # fits until it starts at 1040, and after that no other test is left.
        {**lease("t::waits", "gw1", [(*A, 8 * GIB)], 1050, 1060), "waited_s": 30.0},
        {**lease("t::small", "gw2", [(*A, 2 * GIB)], 1040, 1045), "waited_s": 0.0},
    ]
    root = parse(render_svg(make_report(waits)))
    rows = wait_rows(root)
    assert list(rows) == ["gw1"]  # only workers that waited have a row
    geo = Geometry(panel_of(root, "GPU-aaa"), 24 * GIB)
    ((x1, x2),) = spans(rows["gw1"], "wait")
    assert (x1, x2) == (pytest.approx(geo.x(1020), abs=0.02), pytest.approx(geo.x(1050), abs=0.02))
    ((r1, r2),) = spans(rows["gw1"], "room")
    assert (r1, r2) == (pytest.approx(geo.x(1020), abs=0.02), pytest.approx(geo.x(1040), abs=0.02))
    title = rows["gw1"].find("s:title", NS)
    assert title is not None and title.text == worker_wait_text("gw1", 30.0, 20.0)
    texts = ["".join(x.itertext()) for x in rows["gw1"].iter(f"{{{NS['s']}}}text")]
    assert texts == ["gw1", "30.0s, 20.0s room"]


def test_a_run_without_waits_says_so() -> None:
    leases = [{**x, "waited_s": 0.0} for x in LEASES]
    root = parse(render_svg(make_report(leases)))
    assert wait_rows(root) == {}
    texts = {"".join(x.itertext()) for x in root.iter(f"{{{NS['s']}}}text")}
    assert "no test waited for memory" in texts


def test_the_waits_shown_are_the_reports_per_worker_figures() -> None:
    inventory = SimulatedProbe("12GiB").probe()
    plan = make_plan(inventory, Budget(safety_bytes=GIB, worker_mem_bytes=3 * GIB, context_bytes=GIB // 2))
    (g,) = inventory.gpus
    records = [
        LeaseRecord("t::big", "gw0", [(g.uuid, 0, 8 * GIB)], 0.0, STARTED + 1, STARTED + 4),
        LeaseRecord("t::next", "gw1", [(g.uuid, 0, 8 * GIB)], 2.5, STARTED + 4, STARTED + 5),
        LeaseRecord("t::small", "gw0", [(g.uuid, 0, GIB)], 0.0, STARTED + 6, STARTED + 7),
    ]
    collected = [{"test_id": r.test_id, "lease": r.to_dict(), "outcome": "passed"} for r in records]
    report = json.loads(
        json.dumps(json_report(plan, summarize(collected, [], STARTED + 9, plan), STARTED, STARTED + 9))
    )
    (waited,) = [w for w in report["workers"] if w["waited_s"]]
    assert waited == {"worker": "gw1", "waited_s": 2.5, "waited_with_room_s": 2.5}
    title = wait_rows(parse(render_svg(report)))["gw1"].find("s:title", NS)
    assert title is not None and title.text == worker_wait_text("gw1", 2.5, 2.5)


def _mutate(report: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    *parents, last = path
    for key in parents:
        report = report[key]
    if value is KeyError:
        del report[last]
    else:
        report[last] = value


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("version",), 2, "version 2"),
        (("version",), KeyError, "version None"),
        (("started",), "soon", "'started' must be a finite number"),
        (("finished",), float("nan"), "'finished' must be a finite number"),
        (("plan",), KeyError, "missing 'plan'"),
        (("leases",), {}, "'leases' must be a list"),
        (("leases", 0, "taken_at"), KeyError, "leases[0]: missing 'taken_at'"),
        (("leases", 0, "taken_at"), True, "'taken_at' must be a finite number"),
        (("leases", 1, "gpus", 0, "bytes"), -1, "leases[1].gpus[0]: 'bytes' must be a whole number"),
        (("leases", 1, "worker"), None, "'worker' must be a string"),
        (("plan", "gpus", 0, "gpu", "total_bytes"), KeyError, "plan.gpus[0].gpu: missing 'total_bytes'"),
        (("plan", "budget", "context_bytes"), KeyError, "plan.budget: missing 'context_bytes'"),
        (("plan", "budget"), KeyError, "report plan: missing 'budget'"),
    ],
)
def test_bad_reports_raise_one_line_value_errors(path: tuple[Any, ...], value: Any, words: str) -> None:
    report = copy.deepcopy(make_report(LEASES))
    _mutate(report, path, value)
    with pytest.raises(ValueError, match=r"^[^\n]+$") as info:
        render_svg(report)
    assert words in str(info.value)


def test_not_an_object_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="expected a JSON object"):
        render_svg([1, 2])  # type: ignore[arg-type]


def test_ten_thousand_leases_make_a_file_of_sane_size() -> None:
    rng = random.Random(7)
    gpus = [A, B]
    clocks = {f"gw{i}": STARTED for i in range(8)}
    leases = []
    for n in range(10_000):
        worker = f"gw{n % 8}"
        start = clocks[worker] + rng.uniform(0, 0.05)
        end = start + rng.uniform(0.05, 2.0)
        clocks[worker] = end
        home = gpus[n % 8 // 4]
        parts = [(*g, rng.randint(1, 16) * GIB // 4) for g in gpus] if n % 50 == 0 else [(*home, GIB)]
        leases.append(lease(f"tests/test_big.py::test_{n}[param-{n}]", worker, parts, start, end))
    report = make_report(leases)
    report["finished"] = max(clocks.values())
    svg = render_svg(report)
    root = parse(svg)
    assert sum(len(bands(panel_of(root, u))) for u in ("GPU-aaa", "GPU-bbb")) == 10_000 + 200
    assert len(svg.encode()) < 4_000_000


# --- the command ---------------------------------------------------------------------------------


def test_command_writes_the_picture_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "run.json"
    report.write_text(json.dumps(make_report(LEASES)))
    out = tmp_path / "pics" / "run.svg"
    out.parent.mkdir()
    assert cmd_timeline([str(report), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(bands(panel_of(parse(out.read_text(encoding="utf-8")), "GPU-bbb"))) == 3


def test_command_defaults_to_the_report_name_with_svg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "run.json"
    report.write_text(json.dumps(make_report([])))
    assert cmd_timeline([str(report)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run.svg")
    parse((tmp_path / "run.svg").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        # json.loads recurses once per level: deep enough nesting raises RecursionError.
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        (json.dumps({"version": 9}), "unsupported report version 9"),
        (json.dumps(make_report([{"test_id": "t"}])), "leases[0]: missing"),
    ],
)
def test_command_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, words: str
) -> None:
    report = tmp_path / "run.json"
    if content is not None:
        report.write_text(content)
    assert cmd_timeline([str(report), "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpushare timeline: ") and words in err
    assert not (tmp_path / "x.svg").exists()


def test_command_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_timeline([]) == 2
    assert "REPORT" in capsys.readouterr().err


def test_gpushare_timeline_runs_as_a_program(tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    report.write_text(json.dumps(make_report(LEASES)))
    done = subprocess.run(
        [sys.executable, "-m", "pytest_gpushare", "timeline", str(report), "-o", str(tmp_path / "t.svg")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "t.svg")
    parse((tmp_path / "t.svg").read_text(encoding="utf-8"))
