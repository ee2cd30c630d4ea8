"""The kinds of component, each declared once.

A :class:`Kind` says everything corex knows about one kind of component: the registration hook that
names its factories (``corex_<name>``), the protocol the built object satisfies, where a recipe
names one, the arguments the core supplies to its factory, and whether it is an ``nn.Module``
the engine trains and checkpoints. Everything else is derived from :data:`KINDS`:

* the registration hooks in :mod:`corex.hookspecs` (name, docstring, return type);
* the registry's kinds and messages (:mod:`corex.plugins`);
* where :func:`corex.recipe.iter_components` finds components and which options are the core's;
* the members :mod:`corex.contract` checks on a built component (read off the protocol);
* the arguments :func:`corex.build.build_component` must be handed, no more and no fewer;
* the table in docs/hooks.md (:func:`hooks_table`, checked by a test).

Adding a kind is one entry here (and its protocol in :mod:`corex.interfaces`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from corex import interfaces


@attrs.frozen
class Kind:
    """One kind of component. ``name`` is its plural, recipe-facing name (``encoders``)."""

    name: str
    protocol: type
    recipe_keys: tuple[str, ...]  # where a recipe names one, as shown in messages and docs
    injected: Mapping[str, str]  # argument the core supplies -> what it is
    summary: str  # what a factory of this kind builds, for the hook's docstring and the docs
    module: bool = False  # an nn.Module that the engine moves to the device, trains and saves
    block: bool = False  # named by a `name:` key inside a block of the core's own keys (data, optimizer)
    run_level: bool = False  # a top-level list of the recipe named after the kind (loggers: [...])
    locate: Callable[[Any], Iterator[tuple[str, Any]]] = attrs.field(default=lambda recipe: iter(()), repr=False, eq=False)

    @property
    def hook(self) -> str:
        return f"corex_{self.name}"

    @property
    def singular(self) -> str:
        return self.name[:-1]

    @property
    def builds(self) -> str:
        return f"corex.interfaces.{self.protocol.__name__}"

    def members(self) -> dict[str, str]:
        """What the core reads of a built component: attribute -> ``method``, ``str``, ``int``, ``bool`` or ``sequence``."""
        return protocol_members(self.protocol, module=self.module)


def protocol_members(protocol: type, *, module: bool = False) -> dict[str, str]:
    """The members a protocol declares: annotated attributes by their type's shape, methods as ``method``.

    A module's ``__call__`` is its ``forward``; a module also needs ``state_dict`` and ``load_state_dict``.
    """
    members: dict[str, str] = {}
    for name, annotation in getattr(protocol, "__annotations__", {}).items():
        text = str(annotation)
        members[name] = next((shape for shape in ("str", "int", "bool") if text == shape), "sequence" if text.startswith(("Sequence", "list", "tuple")) else "any")
    for name, value in vars(protocol).items():
        if inspect.isfunction(value) and (not name.startswith("_") or name == "__call__"):
            members["forward" if module and name == "__call__" else name] = "method"
    if module:
        members.update(state_dict="method", load_state_dict="method")
    return members


def _stage_components(attribute: str) -> Callable[[Any], Iterator[tuple[str, Any]]]:
    """Components held by each stage under ``attribute`` (one, a list, or a mapping of heads)."""

    def locate(recipe: Any) -> Iterator[tuple[str, Any]]:
        for stage in recipe.stages.values():
            value = getattr(stage, attribute)
            base = f"stages.{stage.name}.{attribute}"
            if attribute == "heads":
                yield from ((f"{base}.{name}", head.component) for name, head in value.items())
            elif isinstance(value, list):
                yield from ((f"{base}[{i}]", item) for i, item in enumerate(value))
            elif value is not None:
                yield base, value

    return locate


def _blocks(attribute: str) -> Callable[[Any], Iterator[tuple[str, Any]]]:
    """A block of the recipe (``data``, ``optimizer``, ``schedule``) and each stage's own one."""

    def locate(recipe: Any) -> Iterator[tuple[str, Any]]:
        from corex.schema import Component

        top = getattr(recipe, attribute)
        yield attribute, Component(top.name, top.options)
        for stage in recipe.stages.values():
            own = getattr(stage, attribute)
            if own is not None:
                yield f"stages.{stage.name}.{attribute}", Component(own.name, own.options)

    return locate


def _run_list(name: str) -> Callable[[Any], Iterator[tuple[str, Any]]]:
    """A top-level list of the recipe named after its kind (``loggers: [tensorboard, mlflow]``)."""

    def locate(recipe: Any) -> Iterator[tuple[str, Any]]:
        yield from ((f"{name}[{i}]", component) for i, component in enumerate(recipe.components.get(name, [])))

    return locate


def _encoder(recipe: Any) -> Iterator[tuple[str, Any]]:
    if recipe.model.encoder is not None:
        yield "model.encoder", recipe.model.encoder


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("encoders", interfaces.Encoder, ("model.encoder",), {},
         "an nn.Module mapping (B, C, H, W) images to a feature pyramid", module=True, locate=_encoder),
    Kind("objectives", interfaces.Objective, ("stages.S.objective",),
         {"encoder": "the shared encoder (what transfers)", "channels": "the encoder's channels per level",
          "strides": "the encoder's strides per level", "batch_size": "the global batch size",
          "dataset_size": "images in the stage's training split", "total_steps": "optimisation steps the stage will take"},
         "a self-supervised objective of a pretrain stage", module=True, locate=_stage_components("objective")),
    Kind("heads", interfaces.Head, ("stages.S.heads.H",),
         {"channels": "the encoder's channels per level", "strides": "the encoder's strides per level",
          "num_classes": "the data's number of classes"},
         "a task head on the pyramid, with its loss", module=True, locate=_stage_components("heads")),
    Kind("evaluators", interfaces.Evaluator, ("stages.S.evaluators[i]",),
         {"class_names": "the data's class names", "split": "the split it will score"},
         "a streaming evaluator (update, compute)", locate=_stage_components("evaluators")),
    Kind("augmentations", interfaces.Augmentation, ("stages.S.augment",), {},
         "a batch augmentation on the device, image and mask together", locate=_stage_components("augment")),
    Kind("datasets", interfaces.DataSource, ("data", "stages.S.data"),
         {"image_size": "data.image_size", "seed": "data.seed, else the recipe's seed", "cache_dir": "data.cache_dir or the default cache"},
         "a data source with its splits", block=True, locate=_blocks("data")),
    Kind("optimizers", interfaces.Optimizer, ("optimizer", "stages.S.optimizer"),
         {"param_groups": "weights with weight decay, biases and norms without", "lr": "optimizer.lr",
          "weight_decay": "optimizer.weight_decay", "momentum": "optimizer.momentum", "betas": "optimizer.betas"},
         "a torch.optim.Optimizer", block=True, locate=_blocks("optimizer")),
    Kind("schedules", interfaces.Schedule, ("schedule", "stages.S.schedule"),
         {"optimizer": "the stage's optimizer", "total_steps": "optimisation steps the stage will take",
          "warmup_steps": "schedule.warmup_steps, else warmup_epochs x steps_per_epoch", "steps_per_epoch": "optimisation steps of a full epoch",
          "epochs": "the stage's epochs", "min_lr_ratio": "schedule.min_lr_ratio"},
         "a learning-rate schedule stepped after every optimisation step", block=True, locate=_blocks("schedule")),
    Kind("loggers", interfaces.Logger, ("loggers[i]",), {"run_dir": "the run directory"},
         "an experiment tracker fed on rank 0", run_level=True, locate=_run_list("loggers")),
)}


def run_level() -> list[Kind]:
    """The kinds a recipe lists at its top level, each under its own name."""
    return [kind for kind in KINDS.values() if kind.run_level]


def get(name: str) -> Kind:
    if name not in KINDS:
        raise KeyError(f"unknown component kind '{name}'; kinds are {', '.join(KINDS)}")
    return KINDS[name]


def hook_doc(kind: Kind) -> str:
    """The registration hook's docstring."""
    supplied = ", ".join(f"``{name}`` ({what})" for name, what in kind.injected.items())
    return (f"Name {kind.singular} factories: return ``{{name: factory}}``.\n\n"
            f"Each factory builds {kind.summary}, a :class:`~{kind.builds}`"
            + (" (an ``nn.Module``)" if kind.module else "") + ". "
            + (f"The core passes {supplied} where the factory's signature names them. " if supplied else "The core passes no arguments. ")
            + f"Recipe key: {', '.join(f'``{key}``' for key in kind.recipe_keys)}.")


def hooks_table() -> str:
    """The registration table of docs/hooks.md, derived from :data:`KINDS`."""
    rows = ["| hook | kind in `corex plugins --json` | recipe key | the factory builds | the core passes (if the signature names them) |",
            "|---|---|---|---|---|"]
    for kind in KINDS.values():
        keys = ", ".join(f"`{key}`" for key in kind.recipe_keys)
        supplied = ", ".join(f"`{name}`" for name in kind.injected)
        rows.append(f"| `{kind.hook}` | `{kind.name}` | {keys} | `{kind.protocol.__name__}`: {kind.summary} | {supplied} |")
    return "\n".join(rows)


__all__ = ["KINDS", "Kind", "get", "hook_doc", "hooks_table", "protocol_members", "run_level"]
