"""What observations of GPU tests mean: pure functions over what :mod:`observe` measured.

- :class:`GpuObservation` is what one test used on one GPU, and where the figure came from;
  :func:`observation_record` makes one report line of a test's observations.
- :func:`suggest_mem`, :func:`classify` and :func:`observed_table` turn declared against
  observed into advice: over-users, generous declarations, a ``mem=`` to write instead.
- :func:`merge_history` and :func:`budget_from_history` keep the measured peaks across runs
  (the caller reads and writes pytest's ``config.cache``) and size workers from them.

No I/O, no pytest, no torch: values in, values out.

Sources: every figure says where it came from: ``"nvml"`` (the driver's per-process figure,
which sees every allocator: torch, JAX, CuPy, raw CUDA), ``"torch"`` (the caching allocator's
``max_memory_reserved``, exact for torch but blind to the rest), or ``"not measurable"`` (the
driver gives no per-process figure here: WSL2, ``usedGpuMemory`` unavailable, or a process
list of another PID namespace). "Not measurable" is never reported as zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pytest_gpushare.errors import SettingError
from pytest_gpushare.units import GiB, MiB, format_size

__all__ = [
    "BUDGET_MODES",
    "GENEROUS_FACTOR",
    "GENEROUS_WASTE_BYTES",
    "HISTORY_KEY",
    "NOT_MEASURABLE",
    "SIMULATED_NOTE",
    "GpuObservation",
    "HistoryBudget",
    "budget_from_history",
    "classify",
    "merge_history",
    "observation_record",
    "observed_table",
    "on_simulated",
    "parse_budget_mode",
    "run_observations",
    "suggest_mem",
]

NOT_MEASURABLE: Final = "not measurable"
"""The ``source`` (and verdict) of a figure the driver does not give; never read as zero."""


@dataclass(frozen=True)
class GpuObservation:
    """What one test used on one GPU, and where the figure came from.

    ``peak_bytes`` is the test's own peak (above what the process held when it started,
    context excluded), the larger of ``nvml_peak_bytes`` and ``torch_peak_bytes``;
    ``source`` names the one it came from, or is ``"not measurable"`` with ``note`` saying
    why (``peak_bytes`` is then None, never 0). ``context_bytes`` is the process's CUDA
    context on this GPU as first seen: what it held before its first test there, or what
    stayed after the test that created it (``context_from_test``).
    """

    uuid: str
    device: str
    declared_bytes: int
    peak_bytes: int | None
    source: str
    nvml_peak_bytes: int | None = None
    torch_peak_bytes: int | None = None
    baseline_bytes: int | None = None
    context_bytes: int | None = None
    context_from_test: bool = False
    samples: int = 0
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Every field is a plain value, so a shallow dict is what ``dataclasses.asdict`` gives,
        # without its deep copy (this runs for every GPU test, and again in the controller).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuObservation:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


SIMULATED_NOTE: Final = "simulated GPU: nothing to measure"


def on_simulated(uuid: str, device: str, declared_bytes: int) -> GpuObservation:
    """What a test used on a simulated GPU: nothing to measure (no CUDA device behind it). A test
    that holds simulated GPUs only is not watched at all (``Grant.observable``): the controller
    writes this for each of its GPUs."""
    return GpuObservation(uuid, device, declared_bytes, None, NOT_MEASURABLE, note=SIMULATED_NOTE)


# --- advice: suggested markers, over-users, generous declarations --------------------------

GENEROUS_FACTOR: Final = 4.0
GENEROUS_WASTE_BYTES: Final = GiB


def suggest_mem(peak_bytes: int, margin: float = 0.2) -> int:
    """A ``mem=`` for a test that peaked at ``peak_bytes``: peak plus ``margin``, rounded up.

    Steps: 256MiB up to 1GiB, 512MiB up to 4GiB, whole GiB above, so each suggestion
    prints exactly with one decimal (``768.0MiB``, ``1.5GiB``, ``6.0GiB``). At least 256MiB.
    """
    if peak_bytes < 0 or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"suggest_mem: peak {peak_bytes!r} and margin {margin!r} must be >= 0")
    want = peak_bytes + math.ceil(peak_bytes * margin)
    step = 256 * MiB if want <= GiB else 512 * MiB if want <= 4 * GiB else GiB
    return max(step, -(-want // step) * step)


def classify(declared: int, observed: int) -> str:
    """``"over"`` (used more than declared), ``"generous"`` (declared more than 4x the peak and
    wasted more than 1GiB), or ``"ok"``."""
    if observed > declared:
        return "over"
    if declared > GENEROUS_FACTOR * observed and declared - observed > GENEROUS_WASTE_BYTES:
        return "generous"
    return "ok"


def observation_record(
    test_id: str, observations: Iterable[GpuObservation | Mapping[str, Any]]
) -> dict[str, Any]:
    """One test's line for the report from its per-GPU observations (objects or their dicts).

    A multi-GPU test is represented by its worst GPU (the highest observed/declared ratio);
    ``observed_bytes`` is None when no GPU of the test was measurable.
    """
    obs = [o if isinstance(o, GpuObservation) else GpuObservation.from_dict(o) for o in observations]
    measured = [o for o in obs if o.peak_bytes is not None]
    worst: GpuObservation | None = None
    if measured:
        worst = max(measured, key=lambda o: (o.peak_bytes or 0) / max(o.declared_bytes, 1))
    elif obs:
        worst = max(obs, key=lambda o: o.declared_bytes)
    contexts = [o.context_bytes for o in obs if o.context_bytes is not None]
    notes = sorted({o.note for o in obs if o.note})
    return {
        "test_id": test_id,
        "declared_bytes": worst.declared_bytes if worst else 0,
        "observed_bytes": worst.peak_bytes if worst else None,
        "source": worst.source if worst else NOT_MEASURABLE,
        "context_bytes": max(contexts) if contexts else None,
        "note": "; ".join(notes) or None,
        "gpus": [o.to_dict() for o in obs],
    }


def observed_table(records: Iterable[Mapping[str, Any]], margin: float = 0.2) -> list[dict[str, Any]]:
    """Declared against observed, one row per test, worst first.

    Each row: ``test_id``, ``declared_bytes``, ``observed_bytes``, ``source``, ``verdict``
    (``over``/``generous``/``ok``/``not measurable``), ``factor`` (observed / declared),
    ``suggested_bytes`` (:func:`suggest_mem`; None when not measurable). Order: over-users
    by factor (largest first), then generous declarations by the memory they waste, then
    the rest by test id, unmeasurable last.
    """
    rows = []
    for rec in records:
        declared = int(rec.get("declared_bytes") or 0)
        observed = rec.get("observed_bytes")
        row: dict[str, Any] = {
            "test_id": rec["test_id"],
            "declared_bytes": declared,
            "observed_bytes": observed,
            "source": rec.get("source", NOT_MEASURABLE) if observed is not None else NOT_MEASURABLE,
            "verdict": NOT_MEASURABLE,
            "factor": None,
            "suggested_bytes": None,
        }
        if observed is not None:
            row["verdict"] = classify(declared, int(observed))
            row["factor"] = round(observed / declared, 2) if declared else None
            row["suggested_bytes"] = suggest_mem(int(observed), margin)
        rows.append(row)
    order = {"over": 0, "generous": 1, "ok": 2, NOT_MEASURABLE: 3}

    def key(row: dict[str, Any]) -> tuple[int, float, str]:
        if row["verdict"] == "over":
            weight = -(row["factor"] or math.inf)
        elif row["verdict"] == "generous":
            weight = -(row["declared_bytes"] - row["observed_bytes"])
        else:
            weight = 0.0
        return order[row["verdict"]], weight, row["test_id"]

    return sorted(rows, key=key)


# --- memory across runs (pytest's cache) ---------------------------------------------------

HISTORY_KEY: Final = "gpushare/observed"
"""Key of the history in ``config.cache``."""
BUDGET_MODES: Final = ("off", "p95", "max")
HISTORY_PEAKS_KEPT: Final = 5
HISTORY_MAX_AGE_S: Final = 30 * 86400
_HISTORY_VERSION: Final = 1
_BUDGET_STEP: Final = 256 * MiB


def _size_list(value: object) -> list[int]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _load_history(history: object) -> dict[str, Any]:
    """The stored history, cleaned; anything unreadable (another version, a hand edit) is dropped."""
    clean: dict[str, Any] = {"version": _HISTORY_VERSION, "tests": {}, "contexts": []}
    if not isinstance(history, dict) or history.get("version") != _HISTORY_VERSION:
        return clean
    tests = history.get("tests")
    if isinstance(tests, dict):
        for test_id, entry in tests.items():
            if not isinstance(test_id, str) or not isinstance(entry, dict):
                continue
            peaks = _size_list(entry.get("peaks"))
            seen = entry.get("seen")
            if peaks and isinstance(seen, (int, float)) and not isinstance(seen, bool):
                clean["tests"][test_id] = {"peaks": peaks[-HISTORY_PEAKS_KEPT:], "seen": float(seen)}
    clean["contexts"] = _size_list(history.get("contexts"))[-HISTORY_PEAKS_KEPT:]
    return clean


def run_observations(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], int | None]:
    """This run's measured test peaks (by test id) and the largest context seen, from
    :func:`observation_record` lines; unmeasurable tests are left out."""
    peaks: dict[str, int] = {}
    context: int | None = None
    for rec in records:
        observed = rec.get("observed_bytes")
        if observed is not None:
            peaks[rec["test_id"]] = max(int(observed), peaks.get(rec["test_id"], 0))
        ctx = rec.get("context_bytes")
        if ctx is not None:
            context = max(int(ctx), context or 0)
    return peaks, context


def merge_history(
    history: object, peaks: Mapping[str, int], context_bytes: int | None, now: float
) -> dict[str, Any]:
    """The history to store after this run (pure: the caller reads and writes ``config.cache``).

    Per test, its last 5 measured peaks and when it last ran; tests not run for 30 days
    are dropped (renamed or deleted tests must not size workers forever). The largest CUDA
    context of each of the last 5 runs that measured one.
    """
    merged = _load_history(history)
    tests: dict[str, Any] = merged["tests"]
    for test_id, peak in peaks.items():
        entry = tests.setdefault(test_id, {"peaks": [], "seen": now})
        entry["peaks"] = [*entry["peaks"], int(peak)][-HISTORY_PEAKS_KEPT:]
        entry["seen"] = now
    merged["tests"] = {t: e for t, e in tests.items() if now - e["seen"] <= HISTORY_MAX_AGE_S}
    if context_bytes is not None:
        merged["contexts"] = [*merged["contexts"], int(context_bytes)][-HISTORY_PEAKS_KEPT:]
    return merged


def parse_budget_mode(value: object, source: str) -> str:
    """Validate a budget-from-history mode (``off``, ``p95``, ``max``); the error names ``source``."""
    text = str(value).strip().lower()
    if text not in BUDGET_MODES:
        raise SettingError(f"{source}: expected one of {', '.join(BUDGET_MODES)}: {value!r}")
    return text


@dataclass(frozen=True)
class HistoryBudget:
    """A per-worker VRAM budget derived from the peaks earlier runs observed."""

    bytes: int
    mode: str
    tests: int
    statistic_bytes: int
    context_bytes: int
    context_observed: bool
    margin: float

    def describe(self) -> str:
        what = "95th percentile" if self.mode == "p95" else "largest"
        ctx = "observed" if self.context_observed else "assumed"
        return (
            f"{what} of {self.tests} tests' observed peaks {format_size(self.statistic_bytes)} "
            f"+{self.margin:.0%} + context {format_size(self.context_bytes)} ({ctx}) "
            f"-> {format_size(self.bytes)} per worker"
        )


def budget_from_history(
    history: object, mode: str, *, context_fallback: int, margin: float = 0.2
) -> HistoryBudget | None:
    """A per-worker budget from past runs, or None (mode ``off``, or nothing measured yet).

    Each test counts with the largest of its kept peaks. ``p95`` takes the 95th percentile
    (nearest rank) of those: a worker is sized for nearly every test, and the rare larger
    one waits for its lease, which still protects it; ``max`` sizes every worker for the
    largest test (fewer workers, no waiting). To that go ``margin`` and the CUDA context
    (the largest observed in recent runs, else ``context_fallback``, the context setting),
    rounded up to 256MiB.
    """
    mode = parse_budget_mode(mode, "budget mode")
    if mode == "off":
        return None
    data = _load_history(history)
    values = sorted(max(e["peaks"]) for e in data["tests"].values())
    if not values:
        return None
    # Nearest rank, in integers: ceil(0.95 * n) without float rounding.
    stat = values[-1] if mode == "max" else values[-(-95 * len(values) // 100) - 1]
    contexts = data["contexts"]
    context = max(contexts) if contexts else context_fallback
    want = stat + math.ceil(stat * margin) + context
    total = max(_BUDGET_STEP, -(-want // _BUDGET_STEP) * _BUDGET_STEP)
    return HistoryBudget(total, mode, len(values), stat, context, bool(contexts), margin)
