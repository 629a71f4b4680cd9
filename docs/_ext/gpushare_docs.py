"""Sphinx directives that generate reference tables from the code, so the docs cannot drift.

``.. gpushare-settings::``
    Every setting of :data:`pytest_gpushare.settings.OPTION_NAMES`: a summary table, then one
    ``confval`` entry per setting (link to one with ``:confval:`gpushare_safety```). The
    directive's body may add notes to settings, as a definition list keyed by ini name::

        .. gpushare-settings::

           gpushare_reserve
              Text added to the entry of ``gpushare_reserve``.

    A note for a name that is not a setting fails the build.

``.. gpushare-config-keys::``
    The keys of the ``gpu_resource_management`` config file
    (:data:`pytest_gpushare.settings.CONFIG_FILE_KEYS`) and the setting each one feeds. Each key
    needs a line in :data:`CONFIG_KEY_UNITS` below; a key missing there fails the build.
"""

from __future__ import annotations

import textwrap
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

from pytest_gpushare.settings import CONFIG_FILE_KEYS, OPTION_NAMES, Option, option_for

#: How each config file key's value is read; must name every key of CONFIG_FILE_KEYS.
CONFIG_KEY_UNITS = {
    "ollama_vram_reservation_mb": "a number of MiB",
    "safety_buffer_mb": "a number of MiB",
    "min_vram_per_worker_gb": "a number of GiB, larger than 0",
    "max_workers_per_gb": "a number, larger than 0",
    "enable_ollama_detection": "``false`` sets it to ``off``; ``true`` leaves it as it is",
    "fallback_to_cpu_when_constrained": "``true`` sets it to ``cpu``; ``false`` leaves it as it is",
}


__all__ = ["setup"]


def _flag(option: Option) -> str:
    return f"``{option.flag}``" if option.is_flag else f"``{option.flag} {option.metavar}``"


def _default(option: Option) -> str:
    # A value where there is one (``1GiB``), else the words for it (``the worker mem``).
    return f"``{option.default}``" if option.default is not None else option.default_text


def _notes(content: StringList, where: str) -> dict[str, list[str]]:
    """A definition list (a setting's ini name, then indented rst) as lines per name."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in content:
        if line.strip() and not line[0].isspace():
            name = line.strip()
            try:
                option_for(name)
            except KeyError:
                raise ExtensionError(
                    f"{where}: gpushare-settings has a note for {name!r}, not a setting"
                ) from None
            current = blocks.setdefault(name, [])
        elif current is not None:
            current.append(line)
        elif line.strip():
            raise ExtensionError(f"{where}: gpushare-settings notes must start with a setting's ini name")
    return {name: textwrap.dedent("\n".join(body)).splitlines() for name, body in blocks.items()}


class SettingsDirective(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        where = f"{self.env.docname}:{self.lineno}"
        notes = _notes(self.content, where)
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 30 26 14",
            "",
            "   * - ini / ``pyproject.toml``",
            "     - command line",
            "     - environment",
            "     - default",
        ]
        for o in OPTION_NAMES:
            lines += [
                f"   * - :confval:`{o.name}`",
                f"     - {_flag(o)}",
                f"     - ``{o.env}``",
                f"     - {_default(o)}",
            ]
        lines.append("")
        for o in OPTION_NAMES:
            value = "flag" if o.is_flag else o.metavar
            lines += [
                f".. confval:: {o.name}",
                f"   :type: ``{value}``",
                f"   :default: {_default(o)}",
                "",
                f"   {o.help[0].upper()}{o.help[1:]}.",
                "",
                f"   Command line {_flag(o)} (the ``gpushare`` command also takes ``{o.short_flag}``);"
                f" environment ``{o.env}``; ini ``{o.name}``.",
                "",
            ]
            lines += ["   " + x if x else "" for x in notes.get(o.name, [])]
            lines.append("")
        return self._parse(lines)

    def _parse(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.env.docname), self.content_offset, container)
        return list(container.children)


class ConfigKeysDirective(SettingsDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        missing = sorted(set(CONFIG_FILE_KEYS) - set(CONFIG_KEY_UNITS))
        stale = sorted(set(CONFIG_KEY_UNITS) - set(CONFIG_FILE_KEYS))
        if missing or stale:
            raise ExtensionError(
                "docs/_ext/gpushare_docs.py: CONFIG_KEY_UNITS is out of date: "
                f"missing {missing}, stale {stale}"
            )
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 30 25 45",
            "",
            "   * - key in ``gpu_resource_management``",
            "     - setting",
            "     - value",
        ]
        for key, (name, _convert) in CONFIG_FILE_KEYS.items():
            lines += [f"   * - ``{key}``", f"     - :confval:`{name}`", f"     - {CONFIG_KEY_UNITS[key]}"]
        return self._parse(lines)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("gpushare-settings", SettingsDirective)
    app.add_directive("gpushare-config-keys", ConfigKeysDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
