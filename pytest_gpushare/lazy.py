"""PEP 562 re-exports: a package's public names, each imported from its home module on first use.

Used by the package's ``__init__`` and the ledger's facade, so that importing a pure module
(``pytest_gpushare.units``) or the ledger's pure rules loads nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    namespace: dict[str, Any], homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the module whose globals are ``namespace``: ``homes``
    maps each public name to the module that defines it. A name, once imported, is stored in
    ``namespace``, so later lookups skip ``__getattr__``."""
    module = namespace["__name__"]

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *homes})

    return getattr_, dir_
