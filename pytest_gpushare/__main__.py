"""``python -m pytest_gpushare``: the ``gpushare`` command."""

from __future__ import annotations

import sys

from pytest_gpushare.commands import entry

sys.exit(entry())
