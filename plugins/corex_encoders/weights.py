"""Load a local state-dict file into an encoder: torchvision's ImageNet files or corex exports."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's DenseNet files predate the ban on dots in module names: they spell
# "denselayer1.norm.1.weight" where the module is now "denselayer1.norm1".
_LEGACY_DENSE_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def load_weights(model: nn.Module, path: Path | str, *, first_conv: str, drop_prefix: str) -> None:
    """Load ``path`` into ``model`` in place, or raise a ValueError saying what does not fit.

    The file is a state dict with the encoder's clean keys, or a mapping holding one under
    ``"state_dict"`` (a corex export, whose ``"arch"`` must then match). The classifier
    (``drop_prefix``: ``fc.`` or ``classifier.``) is dropped. A 3-channel first convolution
    (``first_conv``) is folded into a 1-channel model by summing its RGB filters. Any other
    missing or unexpected key, or a shape mismatch, is an error.
    """
    path = Path(path).expanduser()
    arch = getattr(model, "arch", type(model).__name__)
    if not path.is_file():
        raise ValueError(f"weights file {path} for {arch} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a state dict"
        raise ValueError(f"weights file {path} for {arch} is not a readable torch state dict: {error}") from error
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        if "arch" in obj and obj["arch"] != arch:
            raise ValueError(f"weights file {path} holds a {obj['arch']!r} encoder, not {arch!r}.")
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} for {arch} does not hold a state dict of tensors.")

    state = {
        _LEGACY_DENSE_KEY.sub(r"\1\2.", key): value
        for key, value in obj.items()
        if not key.startswith(drop_prefix)
    }
    stem = state.get(first_conv)
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3 and model.in_channels == 1:
        # A grey image enters an RGB network as (x, x, x); convolution is linear, so the summed
        # filters give the 1-channel model exactly the response the RGB model has to that image.
        state[first_conv] = stem.sum(dim=1, keepdim=True)

    own = model.state_dict()
    # Files saved before PyTorch 0.4 lack BN's num_batches_tracked; it is a counter, not a weight.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{label} {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"weights file {path} does not fit {arch}: " + "; ".join(problems) + ".")
    model.load_state_dict(state, strict=False)


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (and {len(keys) - n} more)" if len(keys) > n else shown
