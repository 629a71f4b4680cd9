"""Sphinx configuration of the pytest-gpushare docs (built with ``sphinx-build -W``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# Build from this checkout, also where the package is not installed.
sys.path.insert(0, str(HERE.parent))

from pytest_gpushare import __version__  # noqa: E402

project = "pytest-gpushare"
author = "the pytest-gpushare authors"
copyright = "the pytest-gpushare authors"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "gpushare_docs",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "alabaster"
html_title = f"pytest-gpushare {release}"
html_theme_options = {"description": "pytest -n auto on shared GPU boxes", "fixed_sidebar": True}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Annotations are strings (``from __future__ import annotations``) naming types that only exist
# under TYPE_CHECKING; show them as written rather than resolving them.
autodoc_type_aliases: dict[str, str] = {}
nitpicky = False
