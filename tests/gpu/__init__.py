"""The real-GPU check kit (issue 17): ``bash tests/gpu/run.sh OUT`` or ``python -m pytest tests/gpu``.

A package, so that its ``conftest.py`` is imported as ``gpu.conftest`` and never takes the name
``conftest`` from ``tests/conftest.py`` (whose ``wait_until`` the other test files import).
"""
