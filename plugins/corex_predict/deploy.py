"""The whole model as a graph other runtimes run: ONNX (onnxruntime) and TorchScript (``torch.jit``).

:class:`DeployModule` is what is exported: the encoder and the heads, ending in what a user wants
rather than in training's logits::

    image (B, in_channels, S, S) float32 in [0, 1]
      -> probabilities (B, K)       the classification head's softmax (sigmoid for a multi-label head)
      -> mask_logits  (B, 1, S, S)  the segmentation head's logits (sigmoid > 0.5, i.e. logit > 0, is opacity)
      -> ood_score    (B,)          the input gate's Mahalanobis distance, when the run fitted one

with the preprocessing contract (image size, intensity convention, class names, corex version,
format, the gate's threshold) embedded in the file: ONNX ``metadata_props`` (key ``corex``, JSON,
plus a few single keys), TorchScript extra file ``corex.json``; and beside it as ``OUT.json``.

:func:`load_graph` reads either back as a :class:`RuntimeModel`, which ``corex predict`` calls like
the torch model (``model(images, heads) -> {head: output}``), so TTA and the records are shared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corex import rundir
from corex.errors import CorexError
from corex_predict.formats import META_NAME, MODEL_FORMAT, TS_EXTRA, check_format
from corex_predict.gate import InputGate, mahalanobis, pooled

INPUT = "image"
PROBABILITIES, MASK_LOGITS, OOD_SCORE = "probabilities", "mask_logits", "ood_score"
EXPORT_TOLERANCE = 1e-4  # an export whose graph disagrees with the torch model by more is refused
ONNX_EXPORTERS = ("dynamo", "legacy")
INSTALL_ONNX = "pip install 'corex-cxr[onnx]' (onnx, onnxscript and onnxruntime)"


class DeployModule(nn.Module):
    """Encoder + heads (+ gate) with the outputs of the module docstring, as a tuple in that order."""

    def __init__(self, model: nn.Module, class_head: str | None, mask_head: str | None, gate: InputGate | None):
        super().__init__()
        self.encoder = model.encoder
        self.classifier = model.heads[class_head] if class_head else None
        self.segmenter = model.heads[mask_head] if mask_head else None
        self.multilabel = bool(getattr(self.classifier, "multilabel", False))
        self.has_gate = gate is not None and gate.mean is not None
        self.level = gate.level if gate is not None else -1
        if self.has_gate:
            self.register_buffer("gate_mean", gate.mean.float().clone())
            self.register_buffer("gate_precision", gate.precision.float().clone())

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        features = self.encoder(image)
        outputs = []
        if self.classifier is not None:
            logits = self.classifier(features).float()
            outputs.append(torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1))
        if self.segmenter is not None:
            outputs.append(self.segmenter(features).float())
        if self.has_gate:
            outputs.append(mahalanobis(pooled(features, self.level), self.gate_mean, self.gate_precision))
        return tuple(outputs)

    def output_spec(self, class_head: str | None, mask_head: str | None, num_classes: int) -> dict[str, dict[str, Any]]:
        spec: dict[str, dict[str, Any]] = {}
        if self.classifier is not None:
            spec[PROBABILITIES] = {"head": class_head, "task": "classification", "activation": "sigmoid" if self.multilabel else "softmax",
                                   "shape": ["batch", num_classes], "meaning": "class probabilities in class_names order"}
        if self.segmenter is not None:
            spec[MASK_LOGITS] = {"head": mask_head, "task": "segmentation", "activation": "none",
                                 "shape": ["batch", 1, "image_size", "image_size"],
                                 "meaning": "opacity logits; sigmoid gives the probability, > 0 (p > 0.5) is opacity"}
        if self.has_gate:
            spec[OOD_SCORE] = {"task": "input_gate", "shape": ["batch"],
                               "meaning": "Mahalanobis distance of the pooled encoder features; above input_gate.threshold is out of distribution"}
        return spec


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters warn about deprecations and optional packages (torchvision); none of it is the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def graph_metadata(meta: Mapping[str, Any], kind: str, outputs: Mapping[str, Any], exporter: str | None) -> dict[str, Any]:
    """``meta`` plus how to call the graph."""
    size, channels = int(meta["image_size"]), int(meta["in_channels"])
    graph = {
        "kind": kind,
        "input": {"name": INPUT, "shape": ["batch", channels, size, size], "dtype": "float32",
                  "contract": meta["intensity"] + "; resized (longer side) and zero-padded to a square as corex_cxr's cache does"},
        "outputs": dict(outputs),
        "output_order": list(outputs),
        "runtime": "onnxruntime" if kind == "onnx" else "torch.jit.load",
    }
    if exporter:
        graph["exporter"] = exporter
    return {**meta, "graph": graph}


def export_graph(loaded: Any, output: Path, kind: str, meta: dict[str, Any], *, onnx_exporter: str = "dynamo") -> dict[str, Any]:
    """Write ``loaded``'s model as an ONNX or TorchScript graph to ``output``; check it against the
    torch model on a random batch; return the metadata it carries."""
    model = loaded.require_torch("export")
    class_head, mask_head = loaded.head_for("classification"), loaded.head_for("segmentation")
    if class_head is None and mask_head is None:
        raise CorexError(f"export --format {kind}: the model of stage '{meta.get('stage')}' has neither a classification nor a "
                         "segmentation head, so a graph would have no output; export it as .pt (or --encoder-only)")
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    module = DeployModule(model, class_head, mask_head, loaded.gate).eval()
    meta = graph_metadata(meta, kind, module.output_spec(class_head, mask_head, len(loaded.class_names)),
                          f"torch.onnx ({onnx_exporter})" if kind == "onnx" else "torch.jit.trace")
    size, channels = loaded.image_size, int(meta["in_channels"])
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    if kind == "onnx":
        _write_onnx(module, example, output, meta, onnx_exporter)
    else:
        _write_torchscript(module, example, output, meta)
    _verify(module, output, kind, example)
    return meta


def _write_onnx(module: DeployModule, example: Tensor, output: Path, meta: Mapping[str, Any], exporter: str) -> None:
    try:
        import onnx
    except ImportError:
        raise CorexError(f"export --format onnx needs the onnx package: {INSTALL_ONNX}") from None
    if exporter not in ONNX_EXPORTERS:
        raise CorexError(f"--onnx-exporter must be one of {', '.join(ONNX_EXPORTERS)}, got {exporter!r}")
    names = list(meta["graph"]["outputs"])
    with rundir.atomic_path(output) as temporary, _quiet(), torch.no_grad():
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(module, (example,), None, input_names=[INPUT], output_names=names, dynamo=True,
                                            external_data=False, verbose=False, dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}})
                program.save(str(temporary), external_data=False)
            else:
                torch.onnx.export(module, (example,), str(temporary), input_names=[INPUT], output_names=names, dynamo=False,
                                  dynamic_axes={INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset_version=17)
        except ImportError as exc:
            raise CorexError(f"export --format onnx: {exc}; {INSTALL_ONNX}") from None
        except Exception as exc:  # noqa: BLE001 -- an exporter failure names the operator it cannot convert
            raise CorexError(f"export --format onnx: the model could not be converted ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); try --onnx-exporter "
                             f"{'legacy' if exporter == 'dynamo' else 'dynamo'}, or export .ts or .pt") from None
        proto = onnx.load(str(temporary))
        for key, value in _onnx_properties(meta).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "corex"
        proto.producer_version = str(meta["corex_version"])
        onnx.save(proto, str(temporary))


def _onnx_properties(meta: Mapping[str, Any]) -> dict[str, str]:
    """The whole metadata under ``corex`` (JSON) and the contract's items under their own keys, for
    runtimes that show metadata_props as a table."""
    gate = meta.get("input_gate") or {}
    return {
        META_NAME: json.dumps(meta),
        "format": str(meta["format"]),
        "corex_version": str(meta["corex_version"]),
        "class_names": json.dumps(meta["class_names"]),
        "image_size": str(meta["image_size"]),
        "in_channels": str(meta["in_channels"]),
        "intensity": str(meta["intensity"]),
        "outputs": json.dumps(meta["graph"]["output_order"]),
        **({"ood_threshold": repr(float(gate["threshold"]))} if gate else {}),
    }


def _write_torchscript(module: DeployModule, example: Tensor, output: Path, meta: Mapping[str, Any]) -> None:
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(module, (example,), check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise CorexError(f"export --format torchscript: the model could not be traced ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); export .onnx or .pt") from None
        with rundir.atomic_path(output) as temporary:
            torch.jit.save(traced, str(temporary), _extra_files={TS_EXTRA: json.dumps(meta)})


def _verify(module: DeployModule, output: Path, kind: str, example: Tensor) -> None:
    """The written graph against the torch module on a batch of another size than the example's."""
    runtime = load_graph(output, kind)
    images = torch.rand(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dict(zip(runtime.meta["graph"]["output_order"], module(images)))
    got = runtime.outputs(images)
    for name, value in expected.items():
        difference = float((got[name].float() - value.float()).abs().max())
        scale = 1.0 if name != OOD_SCORE else max(1.0, float(value.abs().max()))
        if not difference <= EXPORT_TOLERANCE * scale:
            output.unlink(missing_ok=True)
            raise CorexError(f"export --format {kind}: the written graph's '{name}' differs from the torch model's by "
                             f"{difference:.3g} on a test batch (tolerance {EXPORT_TOLERANCE * scale:.3g}); nothing was written")


# -- reading a graph back ----------------------------------------------------------------------------


class _Head:
    def __init__(self, task: str):
        self.task = task


class RuntimeModel:
    """An exported graph, called like the torch model: ``model(images, heads) -> {head: output}``
    where a classification head's output is ``log p`` (``softmax`` gives ``p`` back; ``logit p`` for
    a multi-label head) and a segmentation head's its logits. :meth:`outputs` gives the graph's
    named outputs (the last batch's are kept, so the gate's score costs no second run)."""

    def __init__(self, path: Path, kind: str, meta: dict[str, Any], run: Any):
        self.path, self.kind, self.meta, self._run = path, kind, meta, run
        graph = meta["graph"]
        self.order = list(graph["output_order"])
        self.heads = {spec["head"]: _Head(spec["task"]) for spec in graph["outputs"].values() if spec.get("head")}
        self._by_head = {spec["head"]: (name, spec) for name, spec in graph["outputs"].items() if spec.get("head")}
        self.device = torch.device("cpu")
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None

    def to(self, device: torch.device) -> RuntimeModel:
        self.device = torch.device(device)
        if self.kind == "torchscript":
            self._run.to(self.device)
        elif self.device.type == "cuda":
            _select_provider(self._run)
        self._last = None
        return self

    def eval(self) -> RuntimeModel:
        return self

    def outputs(self, images: Tensor) -> dict[str, Tensor]:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        if self.kind == "onnx":
            values = self._run.run(self.order, {INPUT: images.detach().float().cpu().contiguous().numpy()})
            result = {name: torch.from_numpy(value).to(self.device) for name, value in zip(self.order, values)}
        else:
            with torch.no_grad():
                values = self._run(images.float().contiguous())
            values = values if isinstance(values, (tuple, list)) else (values,)
            result = dict(zip(self.order, values))
        self._last = (images, result)
        return result

    def __call__(self, images: Tensor, heads: list[str] | None = None) -> dict[str, Tensor]:
        outputs = self.outputs(images)
        result = {}
        for head in heads if heads is not None else list(self.heads):
            if head not in self._by_head:
                raise CorexError(f"'{self.path}' has no output for head '{head}'; its outputs are {', '.join(self.order)}")
            name, spec = self._by_head[head]
            value = outputs[name].float()
            if spec.get("activation") == "softmax":
                value = value.clamp(min=torch.finfo(value.dtype).tiny).log()
            elif spec.get("activation") == "sigmoid":
                value = torch.logit(value, eps=1e-6)
            result[head] = value
        return result


def read_graph_metadata(path: Path, kind: str) -> tuple[dict[str, Any], Any]:
    """The metadata embedded in an ONNX or TorchScript file (format checked) and the runnable graph."""
    where = f"'{path}'"
    if kind == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise CorexError(f"model {where} is an ONNX file; running it needs onnxruntime: {INSTALL_ONNX}") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own kinds on a bad file
            raise CorexError(f"model {where} is not a readable ONNX file ({str(exc).strip().splitlines()[0][:200]})") from None
        text = session.get_modelmeta().custom_metadata_map.get(META_NAME)
        runnable: Any = session
    else:
        extra = {TS_EXTRA: ""}
        try:
            with _quiet():
                runnable = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:  # noqa: BLE001
            raise CorexError(f"model {where} is not a readable TorchScript file ({str(exc).strip().splitlines()[0][:200]})") from None
        runnable.eval()
        raw = extra[TS_EXTRA]
        text = raw.decode() if isinstance(raw, bytes) else raw
    if not text:
        raise CorexError(f"model {where} is an {kind} file without corex metadata (no '{META_NAME}' entry): not written by `corex export`")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise CorexError(f"model {where}: its corex metadata is not JSON; export it again") from None
    if not isinstance(meta, dict):
        raise CorexError(f"model {where}: its corex metadata is not a mapping; export it again")
    check_format(meta.get("format"), MODEL_FORMAT, where, meta.get("corex_version"))
    graph = meta.get("graph")
    if not isinstance(graph, Mapping) or not isinstance(graph.get("outputs"), Mapping) or not isinstance(graph.get("output_order"), list):
        raise CorexError(f"model {where}: its corex metadata does not describe the graph's outputs; export it again")
    return meta, runnable


def load_graph(path: Path, kind: str) -> RuntimeModel:
    """An ONNX or TorchScript export, ready to call."""
    meta, runnable = read_graph_metadata(Path(path), kind)
    return RuntimeModel(Path(path), kind, meta, runnable)


def _select_provider(session: Any) -> None:
    """CUDA when onnxruntime has it and torch sees a GPU (onnxruntime-gpu), else the CPU."""
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
            session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001, S110 -- the CPU always works
        pass


__all__ = ["DeployModule", "RuntimeModel", "export_graph", "graph_metadata", "load_graph", "read_graph_metadata"]
