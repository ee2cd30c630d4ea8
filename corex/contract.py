"""The contract between the core and its plugins, checked by code when a component is built.

:mod:`corex.interfaces` writes the contract as protocols and :mod:`corex.kinds` says which
protocol each kind satisfies; this module holds a built component against it and reports every
missing member at once, naming the component, the plugin that provides it and the recipe path, so
that a plugin author learns of a mistake at ``corex validate`` and not as a torch error in the
middle of a run.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from corex.binding import type_hints
from corex.kinds import KINDS


def built_problems(kind: str, built: Any, label: str, path: str) -> list[str]:
    """Every way ``built`` breaks its kind's protocol, as recipe problems."""
    import torch

    declared = KINDS[kind]
    problems = []
    missing, wrong = [], []
    for attribute, expected in declared.members().items():
        if not hasattr(built, attribute):
            missing.append(attribute + ("()" if expected == "method" else ""))
            continue
        value = getattr(built, attribute)
        if expected == "method" and not callable(value):
            wrong.append(f"{attribute} is not callable")
        elif expected == "method" and (extra := _required_beyond(declared, attribute, value, built)):
            wrong.append(extra)
        elif expected == "str" and not isinstance(value, str):
            wrong.append(f"{attribute} must be a string, got {value!r}")
        elif expected == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            wrong.append(f"{attribute} must be an integer, got {value!r}")
        elif expected == "bool" and not isinstance(value, bool):
            wrong.append(f"{attribute} must be true or false, got {value!r}")
        elif expected == "sequence" and (isinstance(value, str) or not isinstance(value, Iterable)):
            wrong.append(f"{attribute} must be a list, got {value!r}")
    where = declared.builds
    if declared.module and not isinstance(built, torch.nn.Module):
        problems.append(f"{path}: {label} returned a {type(built).__name__}, not a torch.nn.Module (see {where})")
    if missing:
        problems.append(f"{path}: {label} lacks {', '.join(missing)} (see {where})")
    problems.extend(f"{path}: {label}: {text} (see {where})" for text in wrong)
    return problems


def _required_beyond(declared: Any, attribute: str, method: Any, built: Any) -> str | None:
    """A method that requires more arguments than corex passes (a schedule whose step() needs a metric)."""
    spec = vars(declared.protocol).get("__call__" if attribute == "forward" else attribute)
    if spec is None:
        return None
    try:
        passed = [n for n in inspect.signature(spec).parameters if n != "self"]
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind in positional]
    if getattr(built, "needs_model", False):  # called with model= as well
        required = [name for name in required if name != "model"]
    if len(required) <= len(passed):
        return None
    called = f"({', '.join(passed)})" if passed else "with no argument"
    return f"{attribute}() requires {', '.join(required)}, but corex calls it {called}"


def objective_problems(objective: Any, encoder: Any, label: str, path: str) -> list[str]:
    """An objective trains the encoder it was given in place: it must hold that very module."""
    import torch

    if not isinstance(objective, torch.nn.Module):
        return []  # already reported by built_problems
    if not any(module is encoder for module in objective.modules()):
        return [f"{path}: {label} does not hold the encoder it was given as a sub-module, so pre-training would not "
                "train the shared encoder (assign it: self.encoder = encoder; see corex.interfaces.Objective)"]
    return []


def pyramid_problems(encoder: Any, label: str, path: str) -> list[str]:
    """One forward pass on a tiny input: the pyramid must have the declared channels and strides."""
    import torch

    try:
        channels, strides = [int(c) for c in encoder.channels], [int(s) for s in encoder.strides]
        in_channels = int(encoder.in_channels)
    except (TypeError, ValueError, AttributeError):
        return []  # already reported by built_problems
    if len(channels) != len(strides) or not channels:
        return [f"{path}: {label} declares {len(channels)} channels and {len(strides)} strides; they must pair up, one per pyramid level"]
    size = max(max(strides) * 2, 32)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            features = encoder(torch.zeros(1, in_channels, size, size))
    except Exception as exc:  # a plugin's bug: report it where the author will look
        return [f"{path}: {label} failed on a {in_channels}x{size}x{size} input: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    finally:
        encoder.train(was_training)
    if not isinstance(features, (list, tuple)) or not all(isinstance(f, torch.Tensor) for f in features):
        return [f"{path}: {label} must return a list of feature maps, got {type(features).__name__}"]
    if len(features) != len(channels):
        return [f"{path}: {label} returned {len(features)} feature maps but declares {len(channels)} (channels {channels})"]
    problems = []
    for level, (feature, c, s) in enumerate(zip(features, channels, strides)):
        expected = (c, size // s, size // s)
        if tuple(feature.shape[1:]) != expected:
            problems.append(f"{path}: {label} level {level}: declared {c} channels at stride {s}, i.e. (1, {c}, {size // s}, {size // s}) "
                            f"for a {size}x{size} input, but the forward pass gave {tuple(feature.shape)}")
    return problems


def factory_problems(factory: Callable[..., Any], injected: Iterable[str], label: str, path: str) -> list[str]:
    """A factory signature the core cannot bind safely: ``**kwargs``, options without annotations,
    or a required argument that looks like a misspelt core-supplied one."""
    injected = tuple(injected)
    supplied = f"corex supplies {', '.join(injected)}" if injected else "corex supplies no arguments to this kind"
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    problems = []
    hints = type_hints(factory)
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            problems.append(f"{path}: {label}'s factory takes **{name}, so corex cannot check recipe options against it; "
                            f"name each option ({supplied})")
            continue
        if parameter.kind is parameter.VAR_POSITIONAL or name in injected:
            continue
        close = difflib.get_close_matches(name, injected, n=1, cutoff=0.8)
        if close and parameter.default is inspect.Parameter.empty:
            problems.append(f"{path}: {label}'s factory requires '{name}'; did you mean '{close[0]}'? ({supplied})")
        elif name not in hints and parameter.annotation is inspect.Parameter.empty:
            problems.append(f"{path}: {label}'s factory option '{name}' has no type annotation, so recipe values cannot be checked")
    return problems


__all__ = ["built_problems", "factory_problems", "objective_problems", "pyramid_problems"]
