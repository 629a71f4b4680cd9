"""Calling pytest-gpushare's own hooks one plugin at a time, so a failing plugin can be named.

Every call goes through pluggy (:meth:`pluggy.PluginManager.subset_hook_caller`): wrappers,
``--debug`` tracing and hook-call monitoring see it. Each call is restricted to one plugin's
implementations: a plugin's wrapper wraps its own implementation's call, and a plugin that only
wraps the hook sees one call per implementing plugin.

- Planning hooks (:func:`planning_results`): an implementation that raises is a usage error
  that names the plugin and the hook; a silent zero reservation could push another application
  off the GPU.
- Observer hooks (:func:`notify`): an implementation that raises is reported and ignored, and
  the other observers still hear the event; an observer must not fail a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from pluggy import HookCaller

__all__ = ["notify", "planning_results"]


def _each_plugin(pm: pytest.PytestPluginManager, name: str) -> Iterator[tuple[str, HookCaller]]:
    """Per plugin that implements hook ``name`` (wrappers aside), in pluggy's call order: its
    name and the hook's caller without the other implementing plugins."""
    impls = [i for i in getattr(pm.hook, name).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
    plugins = [i.plugin for i in impls]
    seen: list[object] = []
    for impl in reversed(impls):  # pluggy calls the last registered (and tryfirst) first
        if any(p is impl.plugin for p in seen):
            continue
        seen.append(impl.plugin)
        others = [p for p in plugins if p is not impl.plugin]
        yield impl.plugin_name, pm.subset_hook_caller(name, others)


def planning_results(
    pm: pytest.PytestPluginManager, name: str, **kwargs: object
) -> Iterator[tuple[str, object]]:
    """Call planning hook ``name`` plugin by plugin, yielding ``(plugin name, what it returned)``:
    one value for a ``firstresult`` hook, else the list of its implementations' results.

    Lazy: a ``firstresult`` caller stops iterating at the first answer it takes.
    """
    for plugin_name, caller in _each_plugin(pm, name):
        try:
            result = caller(**kwargs)
        except pytest.UsageError:
            raise
        except Exception as exc:
            raise pytest.UsageError(
                f"gpushare: {name} in {plugin_name} raised {type(exc).__name__}: {exc}"
            ) from None
        yield plugin_name, result


def notify(pm: pytest.PytestPluginManager, name: str, log: Callable[[str], None], **kwargs: object) -> None:
    """Call observer hook ``name``; an implementation that raises goes to ``log`` and is ignored."""
    if not getattr(pm.hook, name).get_hookimpls():
        return  # nobody listens (the usual case: this runs twice for every GPU test)
    for plugin_name, caller in _each_plugin(pm, name):
        try:
            caller(**kwargs)
        except Exception as exc:
            log(f"{name} in {plugin_name} raised {type(exc).__name__}: {exc} (ignored)")
