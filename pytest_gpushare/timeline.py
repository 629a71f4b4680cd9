"""``gpushare timeline``: an SVG picture of a run's leases per GPU, from the ``--gpushare-report`` JSON.

One panel per GPU: x is seconds since the run started, y is leased memory. Each lease part on the
GPU is one band, coloured by worker, with a tooltip. Bands are stacked like a stacked area chart:
a new lease sits on top of the leases alive when it starts, and when a lease ends the leases above
it settle down by its size. A band that settles is drawn as several rects, one per stretch at one
height. A fixed y per lease (first-fit interval packing) cannot do this in general: it leaves holes
once a lower lease ends, so the stack would rise above the leased total and could cross the usable
line although the ledger never overcommitted. Stacking this way keeps the top of the stack equal to
the leased total at every moment, which is what the picture is for.

Below the GPUs, one row per worker that waited for memory: each wait a pale bar, the stretches
of it that had room for another pending test solid (:mod:`pytest_gpushare.waits`), and the
worker's totals, the report's ``workers`` figures, at the right.

``render_svg`` is pure (no I/O): :mod:`pytest_gpushare.timeline_input` reads the report for it,
and :mod:`pytest_gpushare.commands.timeline` is the command around it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_gpushare.report import NOTABLE_WAIT_S, peak_concurrent, worker_wait_text
from pytest_gpushare.timeline_input import Panel, Part, Run, read_run
from pytest_gpushare.units import GiB, KiB, MiB, format_size
from pytest_gpushare.waits import Wait, WorkerWaits

__all__ = ["render_svg"]

# Tableau 10: distinct in print and for the common colour-vision deficiencies.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
WIDTH = 960
PLOT_LEFT = 80
PLOT_RIGHT = WIDTH - 120  # room for the "usable"/"total" labels at the right end of their lines
PLOT_HEIGHT = 180
PANEL_TITLE = 26
PANEL_AXIS = 40
HEADER = 64
HEADROOM = 1.06  # so the total line does not sit on the panel's top edge
LABEL_GAP = 13  # px between the baselines of two labels at the right of the plot (11px text)
WAIT_ROW = 16  # px per worker in the waits panel
WAIT_BAR = 10
WAIT_PALE = 0.3  # fill opacity of a wait; its stretches with room are solid
SEPARATE_BANDS_BELOW = 400  # a white outline tells neighbouring leases apart until bands get too thin


# --- stacking ----------------------------------------------------------------------------------


def _stack(parts: Sequence[Part]) -> list[list[tuple[float, float, int]]]:
    """For each part, its ``(start, end, offset)`` stretches, ``offset`` in bytes from the bottom.

    Alive parts are kept in the order they started, each on top of the ones before it, so at any
    moment they fill ``[0, leased total)`` with no hole and no overlap. Releases at an instant are
    applied before grants at the same instant, as the ledger does.
    """
    # kind 0: end of a part that lasts; 1: start; 2: end of a part of zero length (after its start)
    events = []
    for i, p in enumerate(parts):
        events.append((p.start, 1, i))
        events.append((p.end, 0 if p.end > p.start else 2, i))
    events.sort()
    stretches: list[list[tuple[float, float, int]]] = [[] for _ in parts]
    alive: list[int] = []
    offset: dict[int, int] = {}
    since: dict[int, float] = {}
    top = 0

    def close(i: int, now: float) -> None:
        if now > since[i]:
            stretches[i].append((since[i], now, offset[i]))
        since[i] = now

    for now, kind, i in events:
        if kind == 1:
            alive.append(i)
            offset[i], since[i] = top, now
            top += parts[i].bytes
            continue
        pos = alive.index(i)
        close(i, now)
        del alive[pos]
        top -= parts[i].bytes
        for j in alive[pos:]:
            close(j, now)
            offset[j] -= parts[i].bytes
    return stretches


# --- drawing -----------------------------------------------------------------------------------

# Characters XML 1.0 cannot carry at all (control characters, lone surrogates from JSON "\ud800").
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _esc(text: str) -> str:
    text = _NOT_XML.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


def _n(value: float) -> str:
    """A coordinate with at most two decimals and no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _nice_step(span: float, steps: Sequence[float]) -> float:
    for step in steps:
        if step >= span:
            return step
    return steps[-1] * math.ceil(span / steps[-1])


def _size_step(ymax: float) -> float:
    unit = GiB if ymax >= 2 * GiB else MiB if ymax >= 2 * MiB else KiB if ymax >= 2 * KiB else 1
    decades = [m * 10**e for e in range(7) for m in (1, 2, 5)]
    return unit * _nice_step(ymax / unit / 5, decades)


def _time_step(span: float) -> float:
    steps = [m * 10.0**e for e in range(-3, 1) for m in (1, 2, 5)]
    steps += [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
    return _nice_step(span / 8, steps)


def _duration(seconds: float, step: float) -> str:
    if step < 60:
        return f"{seconds:.{max(0, -math.floor(math.log10(step)))}f}s"
    hours, minutes = divmod(round(seconds / 60), 60)
    if not hours:
        return f"{minutes}m"
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


def _tooltip(p: Part) -> str:
    where = f"GPU {p.gpu_index}" + (f" (one of {p.gpu_count} GPUs)" if p.gpu_count > 1 else "")
    held = "still held when the run finished" if p.held_s is None else f"held {p.held_s:.1f}s"
    lines = [p.test_id, f"{format_size(p.bytes)} on {where}", f"worker {p.worker}"]
    lines.append(f"waited {p.waited_s:.1f}s, {held}")
    if p.outcome:
        lines.append(p.outcome)
    return "\n".join(lines)


def _x_scale(run: Run) -> Callable[[float], float]:
    """Seconds since the epoch -> x, the same in every panel."""
    span = run.t1 - run.t0 or 1.0

    def x_at(t: float) -> float:
        return round(PLOT_LEFT + (t - run.t0) / span * (PLOT_RIGHT - PLOT_LEFT), 2)

    return x_at


def _time_axis(out: list[str], run: Run, x_at: Callable[[float], float], base: float) -> None:
    """Ticks and labels in seconds since the run started, under a panel whose bottom is ``base``."""
    tstep = _time_step(run.t1 - run.t0 or 1.0)
    # Ticks count from the start of the run, which may lie after the first lease (clocks of workers).
    first = math.ceil((run.t0 - run.started) / tstep - 1e-9)
    last = math.floor((run.t1 - run.started) / tstep + 1e-9)
    for k in range(first, last + 1):
        x = _n(x_at(run.started + k * tstep))
        out.append(f'<line x1="{x}" x2="{x}" y1="{_n(base)}" y2="{_n(base + 4)}" stroke="#333"/>')
        label = _duration(k * tstep, tstep)
        out.append(f'<text x="{x}" y="{_n(base + 17)}" text-anchor="middle">{label}</text>')


def _panel(out: list[str], run: Run, panel: Panel, top: float, colour: Mapping[str, str]) -> None:
    intervals = [(p.start, p.end, p.bytes) for p in panel.parts]
    peak = peak_concurrent(intervals)
    ymax = max(panel.total or 0, panel.usable or 0, peak, 1) * HEADROOM
    base = top + PANEL_TITLE + PLOT_HEIGHT
    x_at = _x_scale(run)

    def y_at(n_bytes: float) -> float:
        return round(base - n_bytes / ymax * PLOT_HEIGHT, 2)

    name = panel.name if panel.name is not None else "(not in the plan)"
    usable = "unknown" if panel.usable is None else format_size(panel.usable)
    title = (
        f"GPU {panel.index} {name}: peak {format_size(peak)} of {usable} usable, {len(panel.parts)} lease(s)"
    )
    out.append(f'<g class="panel" data-uuid="{_esc(panel.uuid)}" data-gpu="{panel.index}">')
    out.append(f'<text x="{PLOT_LEFT}" y="{_n(top + 17)}" font-weight="bold">{_esc(title)}</text>')

    step = _size_step(ymax / HEADROOM)
    for k in range(int(ymax // step) + 1):
        y = _n(y_at(k * step))
        out.append(f'<line x1="{PLOT_LEFT}" x2="{PLOT_RIGHT}" y1="{y}" y2="{y}" stroke="#eee"/>')
        out.append(
            f'<text x="{PLOT_LEFT - 6}" y="{y}" dy="4" text-anchor="end">{format_size(k * step)}</text>'
        )
    _time_axis(out, run, x_at, base)

    outline = ' stroke="#fff" stroke-width="0.5"' if len(panel.parts) < SEPARATE_BANDS_BELOW else ""
    out.append(f'<g class="bands"{outline}>')
    for p, stretches in zip(panel.parts, _stack(panel.parts), strict=True):
        out.append(f'<g class="band" fill="{colour[p.worker]}"><title>{_esc(_tooltip(p))}</title>')
        for start, end, offset in stretches:
            x1, x2 = x_at(start), x_at(end)
            y1, y2 = y_at(offset + p.bytes), y_at(offset)
            out.append(f'<rect x="{_n(x1)}" y="{_n(y1)}" width="{_n(x2 - x1)}" height="{_n(y2 - y1)}"/>')
        out.append("</g>")
    out.append("</g>")
    if not panel.parts:
        mid = _n(top + PANEL_TITLE + PLOT_HEIGHT / 2)
        out.append(
            f'<text x="{(PLOT_LEFT + PLOT_RIGHT) // 2}" y="{mid}" text-anchor="middle" fill="#777">'
            "no leases on this GPU</text>"
        )

    left, right = _n(x_at(run.t0)), _n(x_at(run.t1))
    _limit_lines(out, panel, y_at, left, right)
    b = _n(base)
    out.append(f'<line class="baseline" x1="{left}" x2="{right}" y1="{b}" y2="{b}" stroke="#333"/>')
    out.append("</g>")


def _waiting(run: Run) -> list[WorkerWaits]:
    """The workers that really waited, one row each (as the terminal summary lists them)."""
    return [w for w in run.worker_waits if w.waited_s >= NOTABLE_WAIT_S]


def _waits_height(run: Run) -> int:
    """The waits panel's height: none in a run without leases, one row saying so without waits."""
    return PANEL_TITLE + max(1, len(_waiting(run))) * WAIT_ROW + PANEL_AXIS if run.leases else 0


def _waits_panel(out: list[str], run: Run, top: float, colour: Mapping[str, str]) -> None:
    """One row per worker that waited: its waits pale, their stretches with room solid."""
    rows = _waiting(run)
    x_at = _x_scale(run)
    waited = sum(w.waited_s for w in run.worker_waits)
    room = sum(w.waited_with_room_s for w in run.worker_waits)
    title = (
        f"waits for memory: {waited:.1f}s, {room:.1f}s of it with room for another pending test "
        "(pale: waiting, solid: with room)"
    )
    out.append('<g class="waits">')
    out.append(f'<text x="{PLOT_LEFT}" y="{_n(top + 17)}" font-weight="bold">{_esc(title)}</text>')
    if not rows:
        y = _n(top + PANEL_TITLE + 11)
        out.append(f'<text x="{PLOT_LEFT}" y="{y}" fill="#777">no test waited for memory</text>')
    by_worker: dict[str, list[Wait]] = {}
    for wait in run.waits:
        by_worker.setdefault(wait.worker, []).append(wait)
    for i, w in enumerate(rows):
        _wait_row(out, w, by_worker.get(w.worker, []), top + PANEL_TITLE + i * WAIT_ROW, colour, x_at)
    base = top + PANEL_TITLE + max(1, len(rows)) * WAIT_ROW
    left, right, b = _n(x_at(run.t0)), _n(x_at(run.t1)), _n(base)
    out.append(f'<line class="baseline" x1="{left}" x2="{right}" y1="{b}" y2="{b}" stroke="#333"/>')
    _time_axis(out, run, x_at, base)
    out.append("</g>")


def _wait_row(
    out: list[str],
    totals: WorkerWaits,
    waits: Sequence[Wait],
    top: float,
    colour: Mapping[str, str],
    x_at: Callable[[float], float],
) -> None:
    worker = totals.worker
    y, mid = _n(top + (WAIT_ROW - WAIT_BAR) / 2), _n(top + WAIT_ROW / 2 + 4)
    text = worker_wait_text(worker, totals.waited_s, totals.waited_with_room_s)
    fill = colour.get(worker, "#777")
    out.append(f'<g class="wait-row" data-worker="{_esc(worker)}"><title>{_esc(text)}</title>')
    out.append(f'<text x="{PLOT_LEFT - 6}" y="{mid}" text-anchor="end">{_esc(worker)}</text>')
    waiting = _pixel_runs([(w.start, w.end) for w in waits], x_at)
    with_room = _pixel_runs([stretch for w in waits for stretch in w.room], x_at)
    for cls, runs, opacity in (("wait", waiting, f' fill-opacity="{WAIT_PALE}"'), ("room", with_room, "")):
        out.append(f'<g class="{cls}" fill="{fill}"{opacity}>')
        out += [f'<rect x="{_n(a)}" y="{y}" width="{_n(b - a)}" height="{WAIT_BAR}"/>' for a, b in runs]
        out.append("</g>")
    figures = f"{totals.waited_s:.1f}s, {totals.waited_with_room_s:.1f}s room"
    out.append(f'<text x="{_n(PLOT_RIGHT + 6)}" y="{mid}">{figures}</text>')
    out.append("</g>")


def _pixel_runs(
    stretches: Sequence[tuple[float, float]], x_at: Callable[[float], float]
) -> list[tuple[float, float]]:
    """``stretches`` of time as x ranges, those less than half a pixel apart drawn as one: a
    long run's thousands of waits stay a few rects per row."""
    runs: list[tuple[float, float]] = []
    for a, b in sorted(stretches):
        x1, x2 = x_at(a), x_at(b)
        if runs and x1 - runs[-1][1] < 0.5:
            runs[-1] = (runs[-1][0], max(runs[-1][1], x2))
        else:
            runs.append((x1, x2))
    return runs


def _limit_lines(out: list[str], panel: Panel, y_at: Callable[[float], float], left: str, right: str) -> None:
    """The panel's "total" and "usable" lines, each labelled at the right, labels kept apart."""
    limits = [
        (cls, n_bytes, dash, y_at(n_bytes))
        for cls, n_bytes, dash in (
            ("total", panel.total, ""),
            ("usable", panel.usable, ' stroke-dasharray="6 4"'),
        )
        if n_bytes is not None
    ]
    label_ys = _apart([at for *_, at in limits])
    for (cls, n_bytes, dash, at), label_y in zip(limits, label_ys, strict=True):
        out.append(
            f'<line class="{cls}" x1="{left}" x2="{right}" y1="{_n(at)}" y2="{_n(at)}" stroke="#000"{dash}/>'
        )
        out.append(
            f'<text x="{_n(PLOT_RIGHT + 6)}" y="{_n(label_y)}" dy="4">{cls} {format_size(n_bytes)}</text>'
        )


def _apart(ys: Sequence[float]) -> list[float]:
    """Where to put labels meant for lines at ``ys``: two closer than :data:`LABEL_GAP` move
    apart, each half the shortfall away from the other (the "total" and "usable" labels of a GPU
    whose usable memory is nearly all of it)."""
    if len(ys) != 2 or abs(ys[0] - ys[1]) >= LABEL_GAP:
        return list(ys)
    mid, half = (ys[0] + ys[1]) / 2, LABEL_GAP / 2
    # Ties go the way the list is: the first (total) label above.
    return [mid - half, mid + half] if ys[0] <= ys[1] else [mid + half, mid - half]


def _header(out: list[str], run: Run, colour: Mapping[str, str]) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.started))
    title = f"gpushare timeline: run started {when}, lasted {run.t1 - run.started:.1f}s"
    if run.leases:
        title += f", {run.leases} lease(s) on {sum(1 for p in run.panels if p.parts)} GPU(s)"
    notes = [f"{run.not_run} GPU test(s) not run"] if run.not_run else []
    notes += [f"{run.lost} worker(s) lost"] if run.lost else []
    out.append(f'<text x="12" y="20" font-size="14" font-weight="bold">{_esc(title)}</text>')
    if not run.leases:
        notes.insert(0, "no leases: no GPU test held memory in this run")
    if notes:
        out.append(f'<text x="12" y="38" fill="#a00">{_esc("; ".join(notes))}</text>')
    x, y = 12, HEADER - 10
    for worker in run.workers:
        label = f"worker {worker}"
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour[worker]}"/>')
        out.append(f'<text x="{x + 14}" y="{y}">{_esc(label)}</text>')
        x += 24 + 7 * len(label)
        if x > WIDTH - 150:
            break  # more workers than a row holds: the tooltips still name every worker
    out.append(
        f'<line x1="{x}" x2="{x + 24}" y1="{y - 4}" y2="{y - 4}" stroke="#000" stroke-dasharray="6 4"/>'
    )
    out.append(f'<text x="{x + 28}" y="{y}">usable</text>')
    out.append(f'<line x1="{x + 80}" x2="{x + 104}" y1="{y - 4}" y2="{y - 4}" stroke="#000"/>')
    out.append(f'<text x="{x + 108}" y="{y}">total</text>')


def render_svg(report: dict[str, Any]) -> str:
    """The SVG picture of a ``--gpushare-report`` document.

    Raises ``ValueError`` with a one-line message when ``report`` is not a version-1 report or a
    field the picture needs is missing or of the wrong type.
    """
    run = read_run(report)
    colour = {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(run.workers)}
    panel_height = PANEL_TITLE + PLOT_HEIGHT + PANEL_AXIS
    panels_end = HEADER + max(1, len(run.panels)) * panel_height
    height = panels_end + _waits_height(run)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
    ]
    _header(out, run, colour)
    if not run.panels:
        out.append(f'<text x="12" y="{HEADER + 20}" fill="#777">no GPU in this report</text>')
    for i, panel in enumerate(run.panels):
        _panel(out, run, panel, HEADER + i * panel_height, colour)
    if run.leases:
        _waits_panel(out, run, panels_end, colour)
    out.append("</svg>")
    return "\n".join(out) + "\n"
