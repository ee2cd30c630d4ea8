"""Recipes: YAML in, a validated :class:`Recipe` out, with every problem reported at once.

A recipe names components (``resnet18``, ``classification``, ``moco`` ...) and their options. The
schema here covers the core's own keys; each component's options are bound to the signature of
the factory that provides it (see :mod:`corex.binding`). Paths in messages use stage names:
``stages.finetune.heads.segmentation.weight: expected a number, got 'high'``.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from corex.binding import Problems, bind_options, check_value
from corex.errors import RecipeError, did_you_mean
from corex.kinds import KINDS, run_level
from corex.plugins import Registry
from corex.schema import (SAFE_LOADER, Component, Data, Head, Limits, Model, Optimizer, Recipe, Schedule, Select, Stage, StageKind)

# -- loading --------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror}"], source=str(path)) from exc
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError([f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"], source=str(path)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping, got {type(data).__name__}"], source=str(path))
    return data


def shipped_recipes() -> Path:
    """The folder of the recipes installed with corex (the package data ``corex.recipes``, the repository's recipes/)."""
    try:
        from importlib.resources import files

        return Path(str(files("corex.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str | Path) -> Path:
    """A path as given, or a shipped recipe by name (``quickstart``, ``phantom/moco_classification``)."""
    path = Path(name)
    if path.exists() or path.suffix in {".yaml", ".yml"}:
        return path
    shipped = shipped_recipes() / f"{name}.yaml"
    return shipped if shipped.exists() else path


def first_comment(path: Path) -> str:
    """The recipe's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Apply ``KEY=VALUE`` overrides in place; return problems (unknown paths, bad syntax).

    Keys are dotted paths (stages by name, list items by index); values are parsed as YAML, so
    ``3`` is a number, ``[a, b]`` a list and ``null`` none. A component written as a bare name
    becomes ``{name: ...}`` when one of its options is set.
    """
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {override!r}: expected KEY=VALUE, e.g. stages.train.epochs=3")
            continue
        try:
            value = yaml.load(raw, Loader=SAFE_LOADER) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = data
        trail: list[str] = []
        for i, part in enumerate(parts[:-1]):
            trail.append(part)
            child = _child(node, part)
            if child is _ABSENT:
                keys = list(node) if isinstance(node, dict) else []
                where = ".".join(trail[:-1]) or "the top level"
                problems.append(f"--set {key}: there is no '{part}' under {where}{did_you_mean(part, keys)}")
                break
            if isinstance(child, str) and i + 1 < len(parts):  # bare component name -> mapping
                child = {"name": child}
                _assign(node, part, child)
            elif child is None:
                child = {}
                _assign(node, part, child)
            node = child
        else:
            if not _assign(node, parts[-1], value):
                problems.append(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping or list")
    return problems


_ABSENT = object()


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part, _ABSENT)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return _ABSENT


def _assign(node: Any, part: str, value: Any) -> bool:
    if isinstance(node, dict):
        node[part] = value
        return True
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        node[int(part)] = value
        return True
    return False


def load_recipe(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    registry: Registry | None = None,
) -> Recipe:
    """Load, override and validate a recipe; raise :class:`RecipeError` listing every problem.

    ``source`` is a YAML file or an already-parsed mapping (a custom study can build one in
    Python). Component options are bound to the registered factories of ``registry`` (the
    process-wide plugins by default).
    """
    if isinstance(source, Mapping):
        data, where, default_name = copy.deepcopy(dict(source)), None, "recipe"
    else:
        path = Path(source)
        data, where, default_name = read_yaml(path), str(path), path.stem
    problems = Problems(apply_overrides(data, overrides))
    data.setdefault("name", default_name)
    recipe = _structure(Recipe, data, "", problems)
    problems = Problems(_label_overrides(problems, overrides))
    if recipe is not None:  # bind and cross-check what could be read, to report everything at once
        recipe.stages = {k: v for k, v in recipe.stages.items() if v is not None}
        for stage in recipe.stages.values():
            stage.heads = {k: v for k, v in stage.heads.items() if v is not None}
            stage.evaluators = [e for e in stage.evaluators if e is not None]
        _bind_components(recipe, registry or Registry(), problems)
    if recipe is not None and not problems:  # cross-checks compare values, so only well-typed ones
        _cross_check(recipe, problems)
    problems = Problems(_label_overrides(problems, overrides))
    if problems:
        raise RecipeError(problems, source=where)
    recipe.source = where
    return recipe


def _label_overrides(problems: list[str], overrides: Sequence[str]) -> list[str]:
    """Mark the problems that a ``--set`` value caused as ``--set``, not as if they were in the recipe file."""
    keys = [o.partition("=")[0].strip() for o in overrides]
    labelled = []
    for problem in problems:
        path = re.sub(r"\[(\d+)\]", r".\1", problem.split(": ", 1)[0])
        from_set = not problem.startswith("--set ") and any(path == k or path.startswith(k + ".") for k in keys if k)
        labelled.append(f"--set {problem}" if from_set else problem)
    return labelled


# -- structuring: plain data -> attrs classes ------------------------------------------------------

# Keys the core reads from a component mapping; the rest are the factory's options.
_COMPONENT_KEYS = {"name"}


def _structure(cls: type, data: Any, path: str, problems: Problems) -> Any:
    hints = typing.get_type_hints(cls)
    if cls is Component:
        return _component(data, path, problems)
    if not isinstance(data, Mapping):
        problems.add(path or "recipe", f"expected a mapping, got {data!r}")
        return None
    fields = {f.name: f for f in attrs.fields(cls) if f.name != "source"}
    data = dict(data)
    if cls in (Data, Optimizer, Schedule):  # the component's own options sit beside the core's keys
        core = {k for k in fields if k != "options"}
        options = {k: data.pop(k) for k in list(data) if k not in core}
        data["options"] = options
    if cls is Recipe:  # the top-level component lists each kind declares (corex.kinds)
        lists = {kind.name: data.pop(kind.name) for kind in run_level() if kind.name in data}
        data["components"] = {name: _field_value(list[Component], value, name, problems) for name, value in lists.items()}
    if cls is Recipe and isinstance(data.get("stages"), Mapping):
        data["stages"] = {
            name: ({**spec, "name": name} if isinstance(spec, Mapping) else spec)
            for name, spec in data["stages"].items()
        }
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if cls is Recipe and key == "components":  # read above, under each kind's own key
            kwargs[key] = value
            continue
        if key not in fields:
            known = [k for k in fields if k not in ("options", "components") and not (cls is Stage and k == "name")]
            known += [kind.name for kind in run_level()] if cls is Recipe else []
            problems.add(where, f"unknown key{did_you_mean(key, known) or '.'} Known keys: {', '.join(known)}")
            continue
        before = len(problems)
        kwargs[key] = _field_value(hints[key], value, where, problems)
        check = fields[key].metadata.get("check")
        if check is not None and len(problems) == before and kwargs[key] is not None:
            _check_value(check, kwargs[key], where, problems)
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in kwargs:
            problems.add(f"{path}.{name}" if path else name, "is required")
    if any(v is None and fields[k].default is attrs.NOTHING for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError:  # missing fields, already reported
        return None


def _field_value(annotation: Any, value: Any, path: str, problems: Problems) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, __import__("types").UnionType) and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _field_value(inner[0], value, path, problems)
    if annotation is Select and isinstance(value, str):  # `select: macro_f1` shorthand
        return Select(metric=value)
    if attrs.has(annotation) and annotation is not Head:
        return _structure(annotation, value, path, problems)
    if origin is dict and args and args[1] is Stage:
        if not isinstance(value, Mapping) or not value:
            problems.add(path, "expected a mapping of stage name to stage, e.g. {train: {kind: train, ...}}")
            return {}
        return {name: _structure(Stage, spec, f"{path}.{name}", problems) for name, spec in value.items()}
    if origin is dict and args and args[1] is Head:
        if not isinstance(value, Mapping):
            problems.add(path, "expected a mapping of head name to head, e.g. {classification: {weight: 1.0}}")
            return {}
        return {name: _head(name, spec, f"{path}.{name}", problems) for name, spec in value.items()}
    if origin is list and args and args[0] is Component:
        if isinstance(value, (str, Mapping)):
            value = [value]
        if not isinstance(value, list):
            problems.add(path, f"expected a list of components, got {value!r}")
            return []
        return [_component(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return check_value(value, annotation, path, problems)


def _check_value(check: Callable[[Any], str | None], value: Any, path: str, problems: Problems) -> None:
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_value(check, item, f"{path}[{i}]", problems)
        return
    problem = check(value)
    if problem:
        problems.add(path, problem)


def _component(value: Any, path: str, problems: Problems) -> Component | None:
    if isinstance(value, str):
        return Component(value)
    if isinstance(value, Mapping):
        if "name" not in value:
            problems.add(path, "a component needs a 'name' (e.g. {name: resnet18, width: 16})")
            return None
        name = value["name"]
        if not isinstance(name, str):
            problems.add(f"{path}.name", f"expected a string, got {name!r}")
            return None
        return Component(name, {k: v for k, v in value.items() if k not in _COMPONENT_KEYS})
    problems.add(path, f"expected a component name or a mapping with 'name', got {value!r}")
    return None


def _head(key: str, value: Any, path: str, problems: Problems) -> Head | None:
    if value is None or isinstance(value, str):
        return Head(Component(value or key))
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping of head options (or nothing), got {value!r}")
        return None
    options = dict(value)
    before = len(problems)
    weight = check_value(options.pop("weight", 1.0), float, f"{path}.weight", problems)
    if len(problems) == before:
        _check_value(attrs.fields(Head).weight.metadata["check"], weight, f"{path}.weight", problems)
    name = options.pop("name", key)
    return Head(Component(name, options), weight)


# -- binding components and cross-references -------------------------------------------------------


def iter_components(recipe: Recipe):
    """Yield ``(kind, recipe path, Component)`` for every component the recipe names, where each
    kind's declaration (:mod:`corex.kinds`) says it sits."""
    for kind in KINDS.values():
        for path, component in kind.locate(recipe):
            yield kind.name, path, component


def bind_component(registry: Registry, kind: str, component: Component, path: str, problems: Problems) -> bool:
    """Bind ``component``'s options to its registered factory in place (converted to the annotated
    types); every problem goes to ``problems`` with its path. False when the name is not registered."""
    try:
        registered = registry.get(kind, component.name)
    except KeyError as exc:
        problems.add(f"{path}.name" if KINDS[kind].block else path, exc.args[0])
        return False
    hint = ""
    if KINDS[kind].block:  # data, optimizer, schedule: a block of the recipe, often set from the command line
        hint = f": add it to the recipe's {path} block, or pass --set {path}.{{name}}=VALUE"
        hint += " (see docs/data.md)" if kind == "datasets" else ""
    bound = bind_options(registered.factory, component.options, path, problems, injected=KINDS[kind].injected,
                         label=registry.label(kind, component.name), required_hint=hint)
    component.options.clear()  # in place: a data block's Component shares its options dict
    component.options.update(bound)
    return True


def _bind_components(recipe: Recipe, registry: Registry, problems: Problems) -> None:
    for kind, path, component in iter_components(recipe):
        if isinstance(component.name, str):  # a name of the wrong type: already reported by the schema check
            bind_component(registry, kind, component, path, problems)


def _cross_check(recipe: Recipe, problems: Problems) -> None:
    seen: list[str] = []
    head_specs: dict[str, tuple[str, Component]] = {}
    for stage in recipe.stages.values():
        base = f"stages.{stage.name}"
        if stage.kind == "train" and not stage.heads:
            problems.add(f"{base}.heads", "a train stage needs at least one head, e.g. {classification: {}}")
        if stage.kind != "train" and stage.heads:
            problems.add(f"{base}.heads", f"only train stages have heads; this stage is '{stage.kind}'")
        if stage.kind == "pretrain" and stage.objective is None:
            problems.add(f"{base}.objective", "a pretrain stage needs an objective, e.g. moco")
        if stage.kind != "pretrain" and stage.objective is not None:
            problems.add(f"{base}.objective", f"only pretrain stages have an objective; this stage is '{stage.kind}'")
        if stage.kind == "evaluate" and not stage.evaluators:
            problems.add(f"{base}.evaluators", "an evaluate stage needs at least one evaluator, e.g. [classification]")
        for head_name, head in stage.heads.items():
            earlier = head_specs.get(head_name)
            if earlier and earlier[1] != head.component:
                problems.add(
                    f"{base}.heads.{head_name}",
                    f"stage '{earlier[0]}' already defines head '{head_name}' with other options; "
                    "a head is one module shared by the stages, so give this one another name",
                )
            head_specs.setdefault(head_name, (stage.name, head.component))
        for i, evaluator in enumerate(stage.evaluators):
            head = evaluator.options.get("head")
            if isinstance(head, str) and head not in head_specs:
                problems.add(
                    f"{base}.evaluators[{i}].head",
                    f"no stage up to this one defines a head '{head}'{did_you_mean(head, head_specs) or '.'}",
                )
        source = stage.encoder_from
        if source is not None and source not in seen and not Path(source).expanduser().exists():
            problems.add(
                f"{base}.encoder_from",
                f"'{source}' is neither an earlier stage ({', '.join(seen) or 'none'}) nor an existing file"
                f"{did_you_mean(source, seen)}",
            )
        if stage.kind == "train" and stage.select.metric != "loss" and not stage.evaluators:
            problems.add(f"{base}.select.metric", f"selecting on '{stage.select.metric}' needs evaluators in this stage (validation runs them)")
        if stage.ema is not None and stage.kind != "train":
            problems.add(f"{base}.ema", f"only train stages keep an EMA of the weights; this stage is '{stage.kind}'")
        if stage.checkpoint_every is not None and stage.kind == "evaluate":
            problems.add(f"{base}.checkpoint_every", "an evaluate stage trains nothing and writes no checkpoints")
        seen.append(stage.name)


__all__ = ["Component", "Data", "Head", "Limits", "Model", "Optimizer", "Recipe", "Schedule", "Select", "Stage", "StageKind",
           "apply_overrides", "bind_component", "find_recipe", "first_comment", "iter_components", "load_recipe", "read_yaml", "shipped_recipes"]
