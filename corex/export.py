"""``corex export``: a stage's encoder as a clean state dict plus a metadata file.

The ``.pt`` file is a plain ``{key: tensor}`` state dict with the encoder's own keys (``conv1.weight``,
``layer1.0.bn1.running_mean`` ...), so ``encoder.load_state_dict(torch.load(path))`` works with no
key surgery. The ``.json`` beside it says what the weights expect: architecture and its options,
input size and channels, intensity normalisation, the recipe's hash and the plugin versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from corex import rundir
from corex.engine import encoder_state
from corex.errors import CorexError
from corex.recipe import load_recipe

INTENSITY = "float32 in [0, 1]: 0 = air (black), 1 = dense (white); MONOCHROME2 after modality and VOI LUTs"


def export_encoder(run_dir: Path, stage: str, output: Path) -> dict[str, Any]:
    run_dir, output = Path(run_dir), Path(output)
    model_path = run_dir / "checkpoints" / stage / "model.pt"
    if not (run_dir / "recipe.yaml").exists():
        raise CorexError(f"export: '{run_dir}' is not a corex run directory (no recipe.yaml)")
    if not model_path.exists():
        done = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/model.pt"))
        raise CorexError(f"export: stage '{stage}' of '{run_dir}' has no finished model; finished stages: {', '.join(done) or 'none'}")
    recipe = load_recipe(run_dir / "recipe.yaml")
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    state = encoder_state(payload["model"])
    plugins = rundir.read_json(run_dir / "plugins.json") if (run_dir / "plugins.json").exists() else []
    data_info = rundir.read_json(run_dir / "data.json") if (run_dir / "data.json").exists() else {}
    meta = {
        "format": "corex-encoder/1",
        "arch": payload.get("arch"),
        "encoder": {"name": recipe.model.encoder.name, **{k: str(v) for k, v in recipe.model.encoder.options.items()}},
        "in_channels": payload.get("in_channels"),
        "input_size": recipe.data.image_size,
        "intensity": INTENSITY,
        "data_normalization": data_info.get("normalization"),
        "stage": stage,
        "recipe": recipe.name,
        "recipe_hash": recipe.digest(),
        "parameters": sum(t.numel() for k, t in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))),
        "plugins": {row["name"]: row.get("version") for row in plugins},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    rundir.save_torch(output, state)
    rundir.write_json(output.with_suffix(".json"), meta)
    return meta
