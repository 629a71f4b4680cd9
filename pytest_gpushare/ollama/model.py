"""What Ollama answered: its loaded models, and the status of one question to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["OllamaModel", "OllamaStatus"]


@dataclass(frozen=True)
class OllamaModel:
    """One model Ollama has loaded: its whole size and the part of it in GPU memory."""

    name: str
    size_bytes: int
    vram_bytes: int

    @property
    def cpu_bytes(self) -> int:
        """What does not fit on the GPU and runs from system memory (slowly)."""
        return max(0, self.size_bytes - self.vram_bytes)


@dataclass(frozen=True)
class OllamaStatus:
    """What asking Ollama gave: where we asked, whether a usable answer came, what it said.

    ``address`` is the URL asked (``"off"`` when not asked). ``answered`` is True only for a
    complete, valid ``/api/ps`` answer; then ``models`` lists the loaded models (empty when
    none is loaded). Otherwise ``problem`` says in one line why nothing was used. ``pids`` are
    the local PIDs of Ollama processes seen in ``/proc`` when models were loaded (for
    :func:`~pytest_gpushare.ollama.attribution.attribute_held`). The status travels to xdist
    workers as :meth:`to_dict`.
    """

    address: str
    asked: bool
    answered: bool
    models: tuple[OllamaModel, ...]
    problem: str | None
    pids: tuple[int, ...] = ()

    def held_bytes(self) -> int:
        """VRAM that Ollama's models hold, all GPUs together (0 without a valid answer)."""
        if not self.answered:
            return 0
        return sum(m.vram_bytes for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "asked": self.asked,
            "answered": self.answered,
            "models": [[m.name, m.size_bytes, m.vram_bytes] for m in self.models],
            "problem": self.problem,
            "pids": list(self.pids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OllamaStatus:
        problem = data.get("problem")
        return cls(
            address=str(data["address"]),
            asked=bool(data["asked"]),
            answered=bool(data["answered"]),
            models=tuple(OllamaModel(str(n), int(s), int(v)) for n, s, v in data["models"]),
            problem=None if problem is None else str(problem),
            pids=tuple(int(p) for p in data.get("pids", ())),
        )
