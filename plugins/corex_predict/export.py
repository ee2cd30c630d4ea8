"""``corex export``: a run's model as one file that loads without pickle, plus a readable ``.json``.

The ``.pt`` file is a plain mapping that ``torch.load(path, weights_only=True)`` reads::

    {"format": "corex-model/1",
     "model": {"encoder.conv1.weight": tensor, ..., "heads.classification.fc.weight": tensor, ...},
     "arch": "resnet18", "in_channels": 1,
     "meta": {...}}          # str/int/float/bool/list/dict only, see corex_predict.model.model_metadata

``model`` and ``arch`` sit where a checkpoint has them, so ``encoder_from:`` in a recipe takes an
export as it takes a checkpoint. ``--encoder-only`` writes the encoder's own state dict with clean
keys (``conv1.weight`` ...) for transfer to other projects, as earlier corex versions did.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from corex import __version__, encoder_state, rundir
from corex.errors import CorexError
from corex_predict.model import ENCODER_FORMAT, FORMAT, INTENSITY, plain, run_model


def export_model(run_dir: str | Path, output: str | Path, *, stage: str | None = None, encoder_only: bool = False) -> dict[str, Any]:
    """Write the model of ``stage`` (default: the run's last stage with a model) to ``output`` and
    its metadata to ``output`` with suffix ``.json``; return the metadata."""
    run_dir, output = Path(run_dir).expanduser(), Path(output).expanduser()
    if output.suffix == ".json":
        raise CorexError(f"export: the output '{output}' must not end in .json (the metadata goes there); use e.g. model.pt")
    if output.exists() and output.is_dir():
        raise CorexError(f"export: the output '{output}' is a directory; give a file name such as {output / 'model.pt'}")
    if not run_dir.is_dir():
        raise CorexError(f"export: '{run_dir}' is not a run directory")
    meta, state = run_model(run_dir, stage)
    if encoder_only:
        return _export_encoder(meta, encoder_state(state), output)
    rundir.save_torch(output, {"format": FORMAT, "model": dict(state), "arch": meta["arch"], "in_channels": meta["in_channels"], "meta": meta})
    readable = {k: v for k, v in meta.items() if k != "recipe_yaml"}
    readable["recipe_resolved"] = yaml.safe_load(meta["recipe_yaml"])
    readable["file"] = output.name
    readable["sha256"] = _sha256(output)
    rundir.write_json(output.with_suffix(".json"), readable)
    return meta


def _export_encoder(meta: dict[str, Any], state: dict[str, Any], output: Path) -> dict[str, Any]:
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
    rundir.write_json(output.with_suffix(".json"), {**summary, "file": output.name, "sha256": _sha256(output)})
    return summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
