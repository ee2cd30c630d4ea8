"""The plugin manager and the component registry.

Plugins arrive three ways, all through pluggy:

* installed distributions that declare an entry point in the ``corex`` group (the built-in plugins
  under ``plugins/`` come in exactly this way);
* ``COREX_PLUGINS=module,other.module`` for local modules;
* ``get_plugin_manager().register(obj)`` from Python.

``COREX_DISABLE_PLUGINS=name,...`` blocks plugins (by entry-point name or module name) and
``COREX_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points at all.

A plugin that cannot be imported (whatever it raises, a SyntaxError included) and a registration
hook that raises become a :class:`~corex.errors.PluginError` naming the plugin, the error and where
in the plugin's code it arose: the command line prints it as a message, not a traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

import attrs
import pluggy

from corex import hookspecs
from corex.errors import CorexError, PluginError, did_you_mean
from corex.kinds import KINDS


@attrs.frozen
class Registered:
    """A registered factory and the plugin that provides it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def create_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A new manager with the entry-point plugins and ``COREX_PLUGINS`` loaded and checked."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(_env_list("COREX_DISABLE_PLUGINS"))
    if autoload is None:
        autoload = not _truthy("COREX_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        from importlib.metadata import entry_points

        for ep in entry_points(group=hookspecs.PROJECT):
            if ep.name in blocked or ep.value in blocked:
                pm.set_blocked(ep.name)
        _load_entry_points(pm)
    for module_name in _env_list("COREX_PLUGINS"):
        if module_name in blocked:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists; something it imports does not
                raise PluginError(f"plugin '{module_name}' (from COREX_PLUGINS) failed to import: {_describe(exc)}") from exc
            raise PluginError(
                f"COREX_PLUGINS names '{module_name}', which cannot be imported: {exc}. "
                "Put its folder on PYTHONPATH (the corex command does not look in the current directory; python -m corex.cli does)."
            ) from exc
        except Exception as exc:  # a plugin may raise anything at import; the message must name it
            raise PluginError(f"plugin '{module_name}' (from COREX_PLUGINS) failed to import: {_describe(exc)}") from exc
        register(pm, module, name=module_name)
    check(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load the ``corex`` entry points; a plugin that fails to import becomes a PluginError naming it."""
    try:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        return
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"an installed corex plugin is invalid: {exc}") from exc
    except Exception as first:
        failure = first
    # Rare path: load the rest one by one to learn which entry point failed (pluggy does not say).
    from importlib.metadata import distributions

    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT or pm.get_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=ep.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"an installed corex plugin is invalid: {exc}") from exc
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.name}' (entry point {ep.value} of {dist.metadata['Name']} {dist.version}) "
                    f"failed to import: {_describe(exc)}. Block it with COREX_DISABLE_PLUGINS={ep.name}"
                ) from exc
    raise PluginError(f"an installed corex plugin failed to import: {_describe(failure)}") from failure


def _describe(exc: BaseException) -> str:
    """``Type: message (at file, line N)``: where in the plugin's own code the error arose."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} (at {exc.filename}, line {exc.lineno})"
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    outside = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<frozen")]
    if outside:
        text += f" (at {outside[-1].filename}, line {outside[-1].lineno})"
    return text


def register(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> None:
    """Register one plugin, turning pluggy's validation errors into :class:`PluginError`."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name or plugin}' is invalid: {exc}") from exc
    except ValueError as exc:  # pluggy: already registered under this name
        raise PluginError(str(exc)) from exc


def check(pm: pluggy.PluginManager) -> None:
    """Reject hook implementations that match no hook (usually a misspelled hook name)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        match = re.search(r"unknown hook '([^']+)'", str(exc))
        known = [name for name in dir(hookspecs) if name.startswith("corex_")]
        hint = did_you_mean(match.group(1), known) if match else ""
        raise PluginError(f"{exc}{hint}") from exc


def call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Any]:
    """Call every implementation of a hook as pluggy would (last registered first), turning an
    exception into a :class:`PluginError` naming the plugin (for hooks that set corex up, such as
    ``corex_cli``; a CorexError a plugin raises on purpose passes through)."""
    return [result for _, result in call_named(pm, hook_name, order="pluggy", **kwargs)]


def call_named(pm: pluggy.PluginManager, hook_name: str, *, order: str = "registration", **kwargs: Any) -> list[tuple[str, Any]]:
    """``(plugin name, result)`` of every implementation that returned something, in registration
    order (``order="pluggy"``: last registered first); a plugin's exception becomes a PluginError naming it."""
    results = []
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    for impl in impls if order == "registration" else reversed(impls):
        try:
            result = impl.function(**{name: kwargs[name] for name in impl.argnames})
        except CorexError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin '{plugin_name(pm, impl.plugin)}': {hook_name}() raised {_describe(exc)}") from exc
        if result is not None:
            results.append((plugin_name(pm, impl.plugin), result))
    return results


@cache
def _own_distribution() -> str:
    """The name of the distribution corex itself was installed from."""
    from importlib.metadata import packages_distributions

    return (packages_distributions().get("corex") or ["corex"])[0]


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use."""
    return create_plugin_manager()


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests, or after changing ``COREX_PLUGINS``)."""
    get_plugin_manager.cache_clear()


def plugin_name(pm: pluggy.PluginManager, plugin: object) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


class Registry:
    """Named components of every kind, collected from a plugin manager.

    The core owns the lookup so that every plugin gets the same errors: unknown names with a
    suggestion and the list of what is available, and duplicate names naming both plugins.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None):
        self.pm = pm or get_plugin_manager()
        self._components: dict[str, dict[str, Registered]] = {}

    def components(self, kind: str) -> dict[str, Registered]:
        if kind not in KINDS:
            raise KeyError(f"unknown component kind '{kind}'; kinds are {', '.join(KINDS)}")
        if kind not in self._components:
            self._components[kind] = self._collect(kind)
        return self._components[kind]

    def _collect(self, kind: str) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        declared = KINDS[kind]
        hook = getattr(self.pm.hook, declared.hook)
        # Call implementations one by one so that every name is attributed to its plugin.
        for impl in reversed(hook.get_hookimpls()):
            owner = plugin_name(self.pm, impl.plugin)
            try:
                provided = impl.function() or {}
            except CorexError:
                raise
            except Exception as exc:  # a broken plugin must not pass for an unknown name
                raise PluginError(f"plugin '{owner}': {declared.hook}() raised {_describe(exc)}") from exc
            if not isinstance(provided, dict):
                raise PluginError(f"plugin '{owner}': {declared.hook}() must return a dict of name to factory, got {type(provided).__name__}")
            for name, factory in provided.items():
                if not callable(factory):
                    raise PluginError(f"plugin '{owner}': {declared.singular} '{name}' is not callable")
                if name in found:
                    raise PluginError(
                        f"{declared.singular} '{name}' is registered twice: by plugin '{found[name].plugin}' "
                        f"and by plugin '{owner}'. Block one with COREX_DISABLE_PLUGINS or rename it."
                    )
                found[name] = Registered(kind, name, factory, owner)
        return found

    def get(self, kind: str, name: str) -> Registered:
        available = self.components(kind)
        if name in available:
            return available[name]
        raise KeyError(self.unknown_message(kind, name))

    def label(self, kind: str, name: str) -> str:
        """``head 'x' (plugin 'p', dist 1.0)``: a component as messages name it, with where it comes from."""
        plugin = self.get(kind, name).plugin
        origin = self.origin(plugin)
        return f"{KINDS[kind].singular} '{name}' (plugin '{plugin}'{', ' + origin if origin else ''})"

    def origin(self, plugin: str) -> str:
        """The distribution and version a plugin was installed with (``corex-cxr 0.2.0``), or its version."""
        loaded = self.pm.get_plugin(plugin)
        for candidate, dist in self.pm.list_plugin_distinfo():
            if candidate is loaded:
                return f"{dist.project_name} {dist.version}"
        version = getattr(loaded, "__version__", None)
        return f"version {version}" if version else ""

    def is_builtin(self, plugin: str) -> bool:
        """Whether a plugin came with corex itself (its entry point is corex's own distribution)."""
        loaded = self.pm.get_plugin(plugin)
        return any(candidate is loaded and dist.project_name == _own_distribution() for candidate, dist in self.pm.list_plugin_distinfo())

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.components(kind)
        listing = ", ".join(f"{n} ({c.plugin})" for n, c in sorted(available.items())) or "none"
        hint = did_you_mean(name, available) or "."
        return f"{KINDS[kind].singular} '{name}' is not registered{hint} Available: {listing}"


def describe_plugins(pm: pluggy.PluginManager | None = None) -> list[dict[str, Any]]:
    """One entry per plugin: name, module, version, origin, hooks and components by kind."""
    pm = pm or get_plugin_manager()
    registry = Registry(pm)
    distinfo = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    env_plugins = set(_env_list("COREX_PLUGINS"))
    rows = []
    for plugin in pm.get_plugins():
        name = plugin_name(pm, plugin)
        dist = distinfo.get(id(plugin))
        if dist is not None:
            origin, version = f"entry point of {dist.project_name}", dist.version
        elif name in env_plugins:
            origin, version = "COREX_PLUGINS", getattr(plugin, "__version__", None)
        else:
            origin, version = "registered from Python", getattr(plugin, "__version__", None)
        hooks = sorted(impl_name for impl_name in dir(plugin) if impl_name.startswith("corex_") and pm.parse_hookimpl_opts(plugin, impl_name))
        components = {
            kind: sorted(c.name for c in registry.components(kind).values() if c.plugin == name)
            for kind in KINDS
        }
        rows.append({
            "name": name,
            "module": getattr(plugin, "__name__", type(plugin).__name__),
            "version": version,
            "origin": origin,
            "hooks": hooks,
            "components": {k: v for k, v in components.items() if v},
        })
    return sorted(rows, key=lambda row: row["name"])


__all__ = ["Registered", "Registry", "call_each", "call_named", "check", "create_plugin_manager", "describe_plugins", "get_plugin_manager",
           "plugin_name", "register", "reset_plugin_manager"]
