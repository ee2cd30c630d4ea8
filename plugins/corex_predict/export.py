"""``corex export``: a run's model as one file, plus a readable ``.json`` and a model card.

Three formats (``--format``, else the suffix):

``pt`` (``.pt``)           a plain mapping that ``torch.load(path, weights_only=True)`` reads::

                               {"format": "corex-model/1",
                                "model": {"encoder.conv1.weight": tensor, ..., "heads.classification.fc.weight": ...},
                                "arch": "resnet18", "in_channels": 1,
                                "meta": {...},       # str/int/float/bool/list/dict only (corex_predict.model.model_metadata)
                                "gate": {...}}       # the input gate, when the run fitted one (tensors and plain values)

                           ``model`` and ``arch`` sit where a checkpoint has them, so ``encoder_from:`` in
                           a recipe takes an export as it takes a checkpoint.
``onnx`` (``.onnx``)       the graph of :class:`corex_predict.deploy.DeployModule` (probabilities, mask
                           logits, the gate's score) with the metadata in ``metadata_props``;
``torchscript`` (``.ts``)  the same graph traced, the metadata in the extra file ``corex.json``.

``--encoder-only`` (``pt`` only) writes the encoder's own state dict with clean keys (``conv1.weight`` ...)
for transfer to other projects, as earlier corex versions did. Every export gets ``OUT.json`` (``model.json`` for
``model.pt``, ``model.onnx.json`` and ``model.ts.json`` for the graphs: the metadata, readable, with
the file's SHA-256) and ``MODEL_CARD.md`` beside it (:mod:`corex_predict.card`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from corex import __version__, encoder_state, rundir
from corex.errors import CorexError
from corex_predict.card import recipe_sha256, write_export_card
from corex_predict.formats import file_kind, infer_kind
from corex_predict.model import (
    ENCODER_FORMAT,
    FORMAT,
    INTENSITY,
    LoadedModel,
    _from_file,
    _load_state,
    _run_gate,
    build_from_metadata,
    plain,
    run_model,
)


def export_model(
    run_dir: str | Path,
    output: str | Path,
    *,
    stage: str | None = None,
    encoder_only: bool = False,
    format: str | None = None,
    onnx_exporter: str = "dynamo",
) -> dict[str, Any]:
    """Write the model of ``stage`` (default: the run's last stage with a model) to ``output`` in
    ``format`` (default: from the suffix), its metadata to ``output`` with suffix ``.json`` and the
    model card beside it; return the metadata."""
    run_dir, output = Path(run_dir).expanduser(), Path(output).expanduser()
    if output.suffix == ".json":
        raise CorexError(f"export: the output '{output}' must not end in .json (the metadata goes there); use e.g. model.pt")
    if output.exists() and output.is_dir():
        raise CorexError(f"export: the output '{output}' is a directory; give a file name such as {output / 'model.pt'}")
    if encoder_only:
        kind = infer_kind(output, format) if format is not None or output.suffix.lower() in (".onnx", ".ts") else "pt"
        if kind != "pt":
            raise CorexError(f"export: --encoder-only writes a torch state dict; give a .pt output (not {kind})")
    else:
        kind = infer_kind(output, format)
    sidecar = metadata_path(output, kind)
    _check_sidecar(sidecar, output)
    if run_dir.is_dir():
        meta, state = run_model(run_dir, stage)
        gate = _run_gate(run_dir, meta)
        source: Path | None = run_dir
    elif run_dir.is_file() and file_kind(run_dir) == "pt":
        # an earlier .pt export (or a checkpoint in its run): into another format, with its format version checked
        meta, state, gate = _from_file(run_dir, stage)
        source = None
    else:
        raise CorexError(f"export: '{run_dir}' is not a run directory or a .pt file written by `corex export`")
    if encoder_only:
        summary = _export_encoder(meta, encoder_state(state), output, recipe_sha256(meta))
        write_export_card(output, meta, source, "encoder")
        return summary
    if kind == "pt":
        payload = {"format": FORMAT, "model": dict(state), "arch": meta["arch"], "in_channels": meta["in_channels"], "meta": meta}
        if gate is not None:
            payload["gate"] = gate.state()
        rundir.save_torch(output, payload)
    else:
        from corex_predict.deploy import export_graph

        where = f"run '{run_dir}'" if source is not None else f"model '{run_dir}'"
        model = build_from_metadata(meta, where)
        _load_state(model, state, where)
        loaded = LoadedModel(model.eval(), meta, run_dir, gate=gate)
        meta = export_graph(loaded, output, kind, meta, onnx_exporter=onnx_exporter)
    readable = {k: v for k, v in meta.items() if k != "recipe_yaml"}
    readable["recipe_resolved"] = yaml.safe_load(meta["recipe_yaml"])
    readable["file"] = output.name
    readable["file_format"] = kind
    readable["sha256"] = _sha256(output)
    readable["recipe_sha256"] = recipe_sha256(meta)
    rundir.write_json(sidecar, readable)
    write_export_card(output, meta, source, kind)
    return meta


def metadata_path(output: Path, kind: str) -> Path:
    """Where the readable metadata goes: ``model.pt`` -> ``model.json`` (as before graphs existed),
    ``model.onnx`` -> ``model.onnx.json``, ``model.ts`` -> ``model.ts.json``, so the three formats of
    one model sit in one folder."""
    return output.with_suffix(".json") if kind == "pt" else output.with_name(output.name + ".json")


def _check_sidecar(sidecar: Path, output: Path) -> None:
    """Refuse to overwrite the metadata of another export (``model.pt`` and ``model.onnx`` share ``model.json``)."""
    if not sidecar.is_file():
        return
    try:
        owner = rundir.read_json(sidecar).get("file")
    except Exception:  # noqa: BLE001 -- not ours: a JSON file of someone else's
        owner = None
    if owner is None:
        raise CorexError(f"export: '{sidecar}' exists and is not the metadata of a corex export; the metadata of '{output.name}' "
                         "would overwrite it; choose another output name")
    if owner != output.name and (sidecar.parent / owner).exists():
        raise CorexError(f"export: '{sidecar}' holds the metadata of '{owner}', which the metadata of '{output.name}' would "
                         f"overwrite; give this export another name (e.g. {output.stem}-{output.suffix.lstrip('.') or 'model'}{output.suffix})")


def _export_encoder(meta: dict[str, Any], state: dict[str, Any], output: Path, recipe_text_sha256: str) -> dict[str, Any]:
    summary = {
        "format": ENCODER_FORMAT,
        "corex_version": __version__,
        "arch": meta["arch"],
        "encoder": {"name": meta["encoder"]["name"], **plain(meta["encoder"]["options"])},
        "in_channels": meta["in_channels"],
        "input_size": meta["image_size"],
        "intensity": INTENSITY,
        "data_normalization": meta["normalization"],
        "stage": meta["stage"],
        "recipe": meta["recipe"],
        "recipe_hash": meta["recipe_digest"],
        "parameters": sum(t.numel() for k, t in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))),
        "plugins": meta["plugins"],
    }
    rundir.save_torch(output, state)
    rundir.write_json(output.with_suffix(".json"), {**summary, "file": output.name, "file_format": "encoder", "sha256": _sha256(output),
                                                    "recipe_sha256": recipe_text_sha256})
    return summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["export_model"]
