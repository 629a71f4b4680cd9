"""What `pip install` gets: the sdist and the wheel carry the licence and build without warnings.

The distributions are built from a copy of this checkout with the build tools of this environment
(``python -m build --no-isolation``: offline, a few seconds); .ci/run also builds them in isolation,
checks them with ``twine check`` and installs the wheel into a fresh environment.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from process_support import run_command

ROOT = Path(__file__).resolve().parent.parent
#: What a source distribution is not built from: environments, caches, build outputs.
NOT_SOURCES = (".venv", ".git", "*.egg-info", "_build", "build", "dist", "__pycache__", ".*_cache")
#: setuptools reads an SPDX ``license`` string and ``license-files`` (PEP 639) from 77.0 on.
PEP_639_SETUPTOOLS = Version("77")


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads TOML")
    with (ROOT / "pyproject.toml").open("rb") as f:
        document: dict[str, Any] = tomllib.load(f)
    return document


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(sdist, wheel, build output): the sdist built from a copy of the checkout, the wheel from
    the sdist, as ``python -m build`` does."""
    pytest.importorskip("build", reason="the test extras install build (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("dist")
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    proc = run_command(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(folder / "out"), str(source)],
        # PYTHONDONTWRITEBYTECODE makes setuptools warn that it does not byte-compile.
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    (sdist,) = (folder / "out").glob("*.tar.gz")
    (wheel,) = (folder / "out").glob("*.whl")
    return sdist, wheel, proc.stdout


def _metadata(text: str) -> Message:
    return email.message_from_string(text)


def test_license_file_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the pytest-gpushare authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_license_is_an_spdx_expression_with_its_file() -> None:
    """PEP 639: ``license`` is an SPDX string, the file is named, and the build backend reads both."""
    pyproject = _pyproject()
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    # A licence classifier next to an SPDX expression is an error under PEP 639.
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    requires = pyproject["build-system"]["requires"]
    (setuptools,) = [Requirement(r) for r in requires if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.99"), setuptools
    assert setuptools.specifier.contains(str(PEP_639_SETUPTOOLS)), setuptools


def test_the_build_warns_about_nothing(built: tuple[Path, Path, str]) -> None:
    _, _, output = built
    assert "deprecat" not in output.lower(), output
    assert "warning" not in output.lower(), output


def test_wheel_carries_the_license(built: tuple[Path, Path, str]) -> None:
    _, wheel, _ = built
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert archive.read(f"{dist_info}/licenses/LICENSE").decode() == license_text
        metadata = _metadata(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None  # the deprecated free-text field
    assert "pytest_gpushare/py.typed" in names
    assert "gpushare = pytest_gpushare.plugin" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/"))]


def test_sdist_carries_the_license(built: tuple[Path, Path, str]) -> None:
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = set(archive.getnames())
        license_file = archive.extractfile(f"{top}/LICENSE")
        assert license_file is not None
        assert license_file.read().decode() == (ROOT / "LICENSE").read_text(encoding="utf-8")
        pkg_info = archive.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        metadata = _metadata(pkg_info.read().decode())
    assert metadata["License-Expression"] == "MIT"
    assert f"{top}/README.md" in names and f"{top}/pyproject.toml" in names


def test_ci_builds_checks_and_tries_the_distributions() -> None:
    """.ci/run stops at the first failure, builds both distributions, checks them, and runs a suite
    against the wheel installed alone in a fresh environment."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in script
    assert re.search(r"^python -m build --outdir \S+ \.", script, re.M)
    assert re.search(r"^twine check --strict ", script, re.M)
    assert re.search(r'^python3 -m venv "\$scratch/venv"$', script, re.M)
    assert re.search(r'"\$scratch/venv/bin/python" -m pip install -q "\$scratch"/dist/\*\.whl', script)
    assert re.search(r'"\$scratch/venv/bin/python" -m pytest -n 2 .*--gpushare-simulate=', script)
    assert re.search(r"^python -m pytest -q\b", script, re.M)  # the README's test command
