"""Check plain YAML values against type annotations, and bind options to factory signatures.

One checker serves both the recipe's own schema and every plugin factory's keyword arguments, so
a problem reads the same wherever it is: ``<recipe path>: expected <type>, got <value>``.
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from corex.errors import did_you_mean

_MISSING = object()


class Problems(list):
    """Recipe problems collected while checking, each ``'<path>: <message>'``."""

    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}" if path else message)


def describe_type(annotation: Any) -> str:
    """A reader's name for a type: 'a number', 'one of 'sgd', 'adamw''..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is Path:
        return "a path"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, cabc.Sequence) or annotation in (list, tuple):
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin in (dict, cabc.Mapping) or annotation is dict:
        return f"a mapping of {describe_type(args[1])}" if len(args) == 2 else "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(value: Any, annotation: Any, path: str, problems: Problems) -> Any:
    """Return ``value`` converted to ``annotation`` (e.g. '1e-3' to 0.001), or record a problem.

    Annotations the checker does not understand (a class from a plugin, a Protocol) accept any
    value: the factory remains the judge of those.
    """
    if annotation is Any or annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin is typing.Annotated:
        return check_value(value, args[0], path, problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial = Problems()
            converted = check_value(value, option, path, trial)
            if not trial:
                return converted
        if len(options) == 1:  # X | None: report X's own, more specific message
            return check_value(value, options[0], path, problems)
        problems.add(path, f"expected {describe_type(annotation)}, got {_shown(value)}")
        return value
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        problems.add(path, f"expected {describe_type(annotation)}, got {_shown(value)}{did_you_mean(value, map(str, args))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        problems.add(path, f"expected true or false, got {_shown(value)}")
        return value
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.add(path, f"expected an integer, got {_shown(value)}")
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.add(path, f"expected a number, got {_shown(value)}")
        return value
    if annotation is str:
        if isinstance(value, str):
            return value
        problems.add(path, f"expected a string, got {_shown(value)}")
        return value
    if annotation is Path or (inspect.isclass(annotation) and issubclass(annotation, Path)):
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        problems.add(path, f"expected a path, got {_shown(value)}")
        return value
    if origin in (list, tuple, set, cabc.Sequence, cabc.Iterable) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.add(path, f"expected {describe_type(annotation)}, got {_shown(value)}")
            return value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                problems.add(path, f"expected {len(args)} items, got {len(value)}")
                return value
            return tuple(check_value(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [check_value(v, item_type, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, cabc.Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            problems.add(path, f"expected {describe_type(annotation)}, got {_shown(value)}")
            return value
        value_type = args[1] if len(args) == 2 else Any
        return {k: check_value(v, value_type, f"{path}.{k}", problems) for k, v in value.items()}
    return value


def type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations of a factory (a class's ``__init__`` or a function); {} if unresolvable."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # one annotation names something imported only under TYPE_CHECKING (torch.optim.Optimizer)
        pass
    # Resolve the others one by one, as get_type_hints would: a light factory's options stay checked without torch.
    namespace = getattr(target, "__globals__", {})
    hints = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, dict(namespace)) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            continue
    return hints


def bind_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    path: str,
    problems: Problems,
    *,
    injected: Iterable[str] = (),
    label: str | None = None,
    required_hint: str = "",
) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s signature; return them converted.

    ``injected`` names the arguments the core supplies itself: they may not come from the recipe
    and do not count as missing; a required argument whose name is close to one of them is the
    factory's mistake, and the message names the component (``label``). ``required_hint`` is added
    to a missing required option's message (how to set it; ``{name}`` is the option).
    """
    injected = set(injected)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return dict(options)
    hints = type_hints(factory)
    params = {
        name: p for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    settable = [n for n in params if n not in injected]
    bound: dict[str, Any] = {}
    for key, value in options.items():
        where = f"{path}.{key}"
        if key in injected:
            problems.add(where, "is supplied by corex and cannot be set in a recipe")
        elif key in params:
            annotation = hints.get(key, params[key].annotation)
            bound[key] = check_value(value, annotation, where, problems)
        elif takes_any:
            bound[key] = value
        else:
            accepted = ", ".join(settable) or "none"
            problems.add(where, f"unknown option{did_you_mean(key, settable) or '.'} Options: {accepted}")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in options and name not in injected:
            # torch's own names for what corex supplies (params for param_groups) share a stem
            close = difflib.get_close_matches(name, sorted(injected), n=1, cutoff=0.75) or \
                sorted(i for i in injected if len(os.path.commonprefix([name, i])) >= min(5, len(name), len(i)) >= 4)[:1]
            if close:
                owner = f"{label}'s factory" if label else "the factory"
                problems.add(f"{path}.{name}", f"is required by {owner}, but no recipe should set it: did you mean '{close[0]}', which "
                                               f"corex supplies? Rename the factory's argument '{name}' to '{close[0]}'")
            else:
                problems.add(f"{path}.{name}", f"is required by {label or 'the factory'}" + required_hint.format(name=name))
    return bound


def accepted_injections(factory: Callable[..., Any], available: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``available`` core-supplied arguments that ``factory``'s signature names."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    # Only arguments named in the signature: **kwargs often forwards to code that would choke.
    return {k: v for k, v in available.items() if k in signature.parameters}


__all__ = ["Problems", "accepted_injections", "bind_options", "check_value", "describe_type", "type_hints"]
