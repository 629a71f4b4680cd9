"""Ollama on this box: where to ask it, what it holds on the GPU, and on which GPU.

- :mod:`~pytest_gpushare.ollama.address`: ``--gpushare-ollama`` and ``OLLAMA_HOST`` made one URL;
- :mod:`~pytest_gpushare.ollama.query`: one bounded ``GET /api/ps``, its answer distrusted
  (:class:`~pytest_gpushare.ollama.model.OllamaStatus`); ``requests`` is imported only here,
  and only when Ollama is asked;
- :mod:`~pytest_gpushare.ollama.attribution`: which GPU holds how much of what Ollama reports.
"""

from __future__ import annotations

from pytest_gpushare.ollama.address import DEFAULT_ADDRESS, resolve_address
from pytest_gpushare.ollama.attribution import HeldAttribution, attribute_held, find_ollama_pids
from pytest_gpushare.ollama.model import OllamaModel, OllamaStatus
from pytest_gpushare.ollama.query import DEFAULT_TIMEOUT, query_ollama

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "HeldAttribution",
    "OllamaModel",
    "OllamaStatus",
    "attribute_held",
    "find_ollama_pids",
    "query_ollama",
    "resolve_address",
]
