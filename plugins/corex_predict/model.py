"""A trained model with everything needed to use it, from a run directory or an exported file.

:func:`model_metadata` describes a run's final model (or one stage's) as plain data: the
encoder and heads with their factories and options in their real types, the class names, the
input size and the intensity pipeline of the data plugin. :func:`load_model` rebuilds the model
from that description through the registry and loads its weights, whether it reads them from
``RUN/checkpoints/STAGE/model.pt`` or from a file written by ``corex export``: the two are
interchangeable.

Every torch file is read with ``weights_only=True`` (:func:`read_torch_file`): a file that holds
pickled Python objects is refused before any of them is built, so loading a model cannot run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import corex
from corex import CorexModel, __version__, resolve_device, rundir
from corex.binding import Problems
from corex.checkpoints import load_file
from corex.errors import CorexError
from corex.plugins import Registry
from corex.recipe import Component, Recipe, bind_component, load_recipe
from corex_predict.formats import MODEL_FORMAT, check_format, file_kind, parse_format
from corex_predict.gate import GATE_FILE, InputGate, read_gate

FORMAT = MODEL_FORMAT
CHECKPOINT_FORMAT = "corex-checkpoint/1"  # what a run's checkpoints may name in a "format" entry (none do yet)
# Data sources that draw their images instead of reading patients' (a source may also say so itself
# with data.json's "provenance": {"synthetic": true}).
SYNTHETIC_SOURCES = {
    "phantom": "the corex phantom: synthetic chest radiographs drawn by corex_cxr, written in the SIIM-FISABIO-RSNA layout",
    "toy": "corex.testing's toy data: bright squares on noise",
}
# Recipe data options that say how to read the data, not what the data are.
MACHINERY_OPTIONS = ("name", "cache_dir", "workers", "num_workers", "batch_size", "root")
ENCODER_FORMAT = "corex-encoder/1"
INTENSITY = "float32 in [0, 1]: 0 = air (black), 1 = dense (white); MONOCHROME2 after modality and VOI LUTs"
# Options that point at initial weights: the weights come from the model file instead.
WEIGHT_OPTIONS = ("weights",)


def read_torch_file(path: Path, where: str = "model") -> Any:
    """``torch.load(path, weights_only=True)`` through :func:`corex.checkpoints.load_file`: every
    failure is a :class:`CorexError` naming the file, and a file carrying pickled objects (a class,
    a function) is refused before any of them is built."""
    return load_file(Path(path), where)


def plain(value: Any) -> Any:
    """Recipe values as plain str/int/float/bool/None/list/dict, which ``weights_only`` loading
    and JSON both accept (a ``Path`` becomes its string, a tuple a list)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return plain(value.item())
    return str(value)


# -- describing a run's model ----------------------------------------------------------------------


def model_stages(run_dir: Path, recipe: Mapping[str, Any]) -> list[str]:
    """The stages of the run that left a final model, in recipe order."""
    return [name for name in recipe.get("stages") or {} if (run_dir / "checkpoints" / name / "model.pt").is_file()]


def pick_stage(run_dir: Path, recipe: Mapping[str, Any], stage: str | None) -> str:
    """``stage`` if it left a model; by default the last stage that did."""
    done = model_stages(run_dir, recipe)
    if stage is None:
        if not done:
            raise CorexError(f"'{run_dir}' has no finished model yet (no checkpoints/STAGE/model.pt); finish the run first")
        return done[-1]
    if stage not in done:
        raise CorexError(f"stage '{stage}' of '{run_dir}' has no finished model; stages with one: {', '.join(done) or 'none'}")
    return stage


def read_run_recipe(run_dir: Path) -> dict[str, Any]:
    """The run's resolved recipe as plain data. Not bound to the registry: using a model needs
    its encoder and heads, not the plugin that read its training data."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise CorexError(f"'{run_dir}' is not a corex run directory (no recipe.yaml)")
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CorexError(f"'{path}' cannot be read ({type(exc).__name__}); is the run directory damaged?") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict) or not isinstance(recipe.get("data"), dict):
        raise CorexError(f"'{path}' is not a resolved corex recipe (no model or data section)")
    return recipe


def recipe_digest(run_dir: Path) -> str | None:
    """:meth:`corex.recipe.Recipe.digest` of the run's recipe; ``None`` when it cannot be loaded
    here (a plugin it names is not installed, a file it names is gone)."""
    try:
        return load_recipe(run_dir / "recipe.yaml").digest()
    except CorexError:
        return None


def class_names_of(run_dir: Path, recipe: Mapping[str, Any]) -> list[str]:
    """The run's class names, from ``data.json`` (written before training), else from the data source."""
    data = rundir.read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    if isinstance(data.get("class_names"), list):
        return [str(name) for name in data["class_names"]]
    for split in ("train", "val", "test"):
        classes = data.get(split, {}).get("classes") if isinstance(data.get(split), Mapping) else None
        if isinstance(classes, Mapping) and classes:
            return [str(name) for name in classes]  # describe() lists them in label order
    return [str(name) for name in corex.build_data(load_recipe(dict(recipe))).class_names]


def _component(spec: Any) -> tuple[str, dict[str, Any]]:
    """A resolved recipe's component (``{name: x, option: ...}``) as name and options."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    return str(spec.pop("name")), plain(spec)


def model_metadata(run_dir: Path, recipe: Mapping[str, Any], stage: str, state: Mapping[str, torch.Tensor], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild and use the model of ``stage``, as plain data."""
    run_dir = Path(run_dir)
    heads: dict[str, dict[str, Any]] = {}
    for spec_stage in (recipe.get("stages") or {}).values():  # as build_model: the first definition of each head ...
        for name, spec in ((spec_stage or {}).get("heads") or {}).items():
            spec = dict(spec or {})
            weight = float(spec.pop("weight", 1.0))
            factory, options = _component({"name": name, **spec})
            heads.setdefault(name, {"factory": factory, "options": options})
            heads[name]["weight"] = weight  # ... and the loss weight it was last trained with
    encoder, encoder_options = _component(recipe["model"]["encoder"])
    data_info = rundir.read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    if not isinstance(data_info, Mapping):
        data_info = {}
    plugins = rundir.read_json(run_dir / "plugins.json") if (run_dir / "plugins.json").is_file() else []
    counted = [t for k, t in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return {
        "format": FORMAT,
        "corex_version": __version__,
        "stage": stage,
        "recipe": recipe.get("name"),
        "recipe_digest": recipe_digest(run_dir),
        "recipe_yaml": (run_dir / "recipe.yaml").read_text(),
        "arch": checkpoint.get("arch"),
        "encoder": {"name": encoder, "options": encoder_options},
        "heads": heads,
        "class_names": class_names_of(run_dir, recipe),
        "in_channels": int(checkpoint.get("in_channels") or 1),
        "image_size": int(recipe["data"].get("image_size", 256)),
        "channels_last": bool(recipe["model"].get("channels_last", True)),
        "data": recipe["data"].get("name"),
        "intensity": INTENSITY,
        "normalization": plain(data_info.get("normalization")),
        "parameters": int(sum(t.numel() for t in counted)),
        "plugins": {str(row["name"]): row.get("version") for row in plugins if isinstance(row, Mapping) and "name" in row},
        "training_data": training_data(recipe, data_info),
    }


def training_data(recipe: Mapping[str, Any], data_info: Mapping[str, Any]) -> dict[str, Any]:
    """Where the training data came from: the data source's name and options, whether it is
    synthetic, its provenance and normalization (``data.json``) and its counts per split."""
    data = dict(recipe.get("data") or {})
    name = str(data.get("name"))
    provenance = data_info.get("provenance")
    normalization = data_info.get("normalization")
    if isinstance(provenance, Mapping) and isinstance(provenance.get("synthetic"), bool):
        synthetic = provenance["synthetic"]
    else:
        synthetic = name in SYNTHETIC_SOURCES or "synthetic" in yaml.safe_dump(plain(normalization)).lower()
    splits = {}
    for split in ("train", "val", "test"):
        info = data_info.get(split)
        if isinstance(info, Mapping):
            splits[split] = {k: plain(info[k]) for k in ("studies", "images", "patients", "classes") if k in info}
    out: dict[str, Any] = {
        "source": name,
        "options": plain({k: v for k, v in data.items() if k not in MACHINERY_OPTIONS}),
        "location": plain(data.get("root")) if data.get("root") is not None else None,
        "synthetic": bool(synthetic),
        "splits": splits,
    }
    if synthetic:
        out["synthetic_note"] = SYNTHETIC_SOURCES.get(name, "the data source describes its images as synthetic")
    if provenance is not None:
        out["provenance"] = plain(provenance)
    if normalization is not None:
        out["normalization"] = plain(normalization)
    return out


def find_gate(run_dir: Path, recipe: Mapping[str, Any], stage: str) -> Path | None:
    """The input gate fitted for the model of ``stage``: ``RUN/<evaluate stage>/input_gate.pt`` of an
    evaluate stage after ``stage`` and before the next stage that trains the model (the first found)."""
    names = list(recipe.get("stages") or {})
    if stage not in names:
        return None
    for name in names[names.index(stage) + 1:]:
        spec = (recipe["stages"] or {}).get(name) or {}
        if spec.get("kind", "train") != "evaluate":
            break
        path = Path(run_dir) / name / GATE_FILE
        if path.is_file():
            return path
    return None


# -- the loaded model ------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to predict: the :class:`~corex.engine.CorexModel` (eval mode) and its metadata."""

    model: CorexModel | None
    meta: dict[str, Any]
    source: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gate: InputGate | None = None
    runtime: Any = None  # an exported graph (corex_predict.deploy.RuntimeModel) instead of the torch model

    @property
    def kind(self) -> str:
        """``torch`` (a run directory or a ``.pt`` export), ``onnx`` or ``torchscript``."""
        return "torch" if self.runtime is None else self.runtime.kind

    @property
    def network(self) -> Any:
        """What to call as ``network(images, heads) -> {head: output}``: the torch model or the graph's adapter."""
        return self.model if self.runtime is None else self.runtime

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def channels_last(self) -> bool:
        return bool(self.meta.get("channels_last", False))

    def head_for(self, task: str) -> str | None:
        """The head doing ``task`` (``classification``, ``segmentation``): the one named so, else the first."""
        tasks = {name: getattr(head, "task", None) for name, head in self.network.heads.items()}
        if tasks.get(task) == task:
            return task
        return next((name for name, kind in tasks.items() if kind == task), None)

    def recipe(self, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """The resolved recipe the model was trained with (its data section says where the data is)."""
        if self.source.is_dir():  # a run directory: messages then name its recipe.yaml
            return load_recipe(self.source / "recipe.yaml", overrides=overrides)
        return load_recipe(yaml.safe_load(self.meta["recipe_yaml"]), overrides=overrides)

    def to(self, device: str | torch.device) -> LoadedModel:
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if self.runtime is not None:
            self.runtime.to(self.device)
            return self
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def require_torch(self, what: str) -> CorexModel:
        """The torch model, or a message saying that ``what`` needs it."""
        if self.model is None:
            raise CorexError(f"{what} needs the torch model, and '{self.source}' is an exported {self.kind} graph; "
                             "give the run directory or its .pt export (`corex export RUN model.pt`)")
        return self.model

    def score(self, images: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """The input gate's out-of-distribution scores of ``images`` (``None`` without a gate)."""
        if self.gate is None:
            return None
        if self.runtime is not None:
            return self.runtime.outputs(images).get("ood_score")
        if features is None:
            with torch.no_grad():
                features = self.model.encoder(images)
        return self.gate.score(features)


def build_from_metadata(meta: Mapping[str, Any], where: str, registry: Registry | None = None) -> CorexModel:
    """A freshly initialised model with the architecture ``meta`` describes, built as a recipe's is."""
    registry = registry or Registry()
    problems = Problems()

    def component(kind: str, name: str, options: Mapping[str, Any], path: str) -> Component:
        spec = Component(name, {k: v for k, v in options.items() if k not in WEIGHT_OPTIONS})
        if not bind_component(registry, kind, spec, path, problems):
            raise CorexError(f"{where}: the model needs {problems[-1].split(': ', 1)[1]}")
        return spec

    encoder = component("encoders", meta["encoder"]["name"], meta["encoder"].get("options", {}), "encoder")
    heads = {name: (component("heads", h["factory"], h.get("options", {}), f"heads.{name}"), f"heads.{name}") for name, h in meta["heads"].items()}
    if problems:
        raise CorexError(f"{where}: its options do not fit the installed plugins: " + "; ".join(problems))
    try:
        return corex.assemble_model(encoder, heads, len(meta["class_names"]), registry, encoder_path="encoder")
    except CorexError as exc:
        raise CorexError(f"{where}: cannot rebuild the model: {exc}") from None


def _load_state(model: CorexModel, state: Mapping[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise CorexError(f"{where}: the weights do not fit the model its metadata describes ({' '.join(detail[1:3])[:300]})") from None


def _complete(meta: Mapping[str, Any]) -> bool:
    """Whether export metadata has what :func:`build_from_metadata` reads, in the right shapes."""
    encoder, heads = meta.get("encoder"), meta.get("heads")
    return (
        isinstance(encoder, Mapping) and isinstance(encoder.get("name"), str) and isinstance(encoder.get("options", {}), Mapping)
        and isinstance(heads, Mapping)
        and all(isinstance(h, Mapping) and isinstance(h.get("factory"), str) and isinstance(h.get("options", {}), Mapping) for h in heads.values())
        and isinstance(meta.get("class_names"), list) and isinstance(meta.get("image_size"), int)
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def load_model(
    path: str | Path,
    *,
    stage: str | None = None,
    device: str | torch.device = "cpu",
    registry: Registry | None = None,
) -> LoadedModel:
    """The model of a run directory (its last stage with a model, or ``stage``), of a checkpoint
    inside one, or of a file written by ``corex export``; in eval mode on ``device``.

    Raises :class:`~corex.errors.CorexError` naming the file for anything unusable, including a
    file that holds pickled objects (refused unread) or an encoder-only export.
    """
    path = Path(path).expanduser()
    gate = None
    if path.is_dir():
        meta, state = run_model(path, stage)
        gate = _run_gate(path, meta)
    elif not path.exists():
        raise CorexError(f"model '{path}' does not exist (give a run directory or a file written by `corex export`)")
    elif path.is_file() and file_kind(path) in ("onnx", "torchscript"):
        from corex_predict.deploy import load_graph

        runtime = load_graph(path, file_kind(path))
        if stage is not None and stage != runtime.meta.get("stage"):
            raise CorexError(f"'{path}' holds the model of stage '{runtime.meta.get('stage')}', not '{stage}'")
        gate = InputGate.from_state(runtime.meta["input_gate"], f"'{path}'") if runtime.meta.get("input_gate") else None
        return LoadedModel(None, runtime.meta, path, gate=gate, runtime=runtime).to(device)
    else:
        meta, state, gate = _from_file(path, stage)
    model = build_from_metadata(meta, f"model '{path}'", registry)
    _load_state(model, state, f"model '{path}'")
    model.eval()
    return LoadedModel(model, meta, path, gate=gate).to(device)


def _run_gate(run_dir: Path, meta: dict[str, Any]) -> InputGate | None:
    """The run's gate for the loaded stage (and its summary into ``meta``)."""
    found = find_gate(run_dir, read_run_recipe(run_dir), meta["stage"])
    if found is None:
        return None
    gate = read_gate(found)
    meta["input_gate"] = {**gate.summary(), "file": str(found.relative_to(run_dir))}
    return gate


def run_model(run_dir: Path, stage: str | None, checkpoint_path: Path | None = None) -> tuple[dict[str, Any], Mapping[str, torch.Tensor]]:
    """The metadata and state dict of a run's model (``stage``'s, by default the last's)."""
    recipe = read_run_recipe(run_dir)
    if checkpoint_path is None:
        stage = pick_stage(run_dir, recipe, stage)
        checkpoint_path = run_dir / "checkpoints" / stage / "model.pt"
    checkpoint = read_torch_file(checkpoint_path)
    if isinstance(checkpoint, Mapping) and "format" in checkpoint:
        check_format(checkpoint["format"], CHECKPOINT_FORMAT, f"'{checkpoint_path}'", checkpoint.get("corex_version"))
    if not isinstance(checkpoint, Mapping) or not _is_state_dict(checkpoint.get("model")):
        raise CorexError(f"'{checkpoint_path}' is not a corex checkpoint (no 'model' state dict)")
    state = checkpoint["model"]
    return model_metadata(run_dir, recipe, stage, state, checkpoint), state


def _from_file(path: Path, stage: str | None) -> tuple[dict[str, Any], Mapping[str, torch.Tensor], InputGate | None]:
    payload = read_torch_file(path)
    if isinstance(payload, Mapping) and isinstance(payload.get("meta"), Mapping) and isinstance(payload.get("model"), Mapping):
        meta = dict(payload["meta"])
        check_format(meta.get("format"), FORMAT, f"'{path}'", meta.get("corex_version"))
        if payload.get("format") != meta.get("format"):
            check_format(payload.get("format"), FORMAT, f"'{path}'", meta.get("corex_version"))
        if not _is_state_dict(payload["model"]) or not _complete(meta):
            raise CorexError(f"'{path}' is an incomplete or damaged corex model file; export it again with `corex export`")
        if stage is not None and stage != meta.get("stage"):
            raise CorexError(f"'{path}' holds the model of stage '{meta.get('stage')}', not '{stage}'")
        gate = InputGate.from_state(payload["gate"], f"'{path}'") if payload.get("gate") is not None else None
        return meta, payload["model"], gate
    if isinstance(payload, Mapping) and "format" in payload and "meta" not in payload and parse_format(payload.get("format")) is not None:
        check_format(payload["format"], FORMAT, f"'{path}'")
    # A checkpoint inside a run directory: RUN/checkpoints/STAGE/{model,best,last}.pt
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        run_dir = path.resolve().parents[2] if len(path.resolve().parents) > 2 else None
        if run_dir is not None and (run_dir / "recipe.yaml").is_file():
            meta, state = run_model(run_dir, path.parent.name, checkpoint_path=path)
            return meta, state, _run_gate(run_dir, meta)
        raise CorexError(f"'{path}' is a corex checkpoint outside its run directory; load the run directory, or export it with `corex export`")
    if isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CorexError(
            f"'{path}' holds an encoder only (an `--encoder-only` export, or a plain state dict); "
            "predicting needs the whole model: `corex export RUN_DIR OUT.pt`"
        )
    raise CorexError(f"'{path}' is not a corex model file (expected a file written by `corex export`)")
