"""The model every stage of a recipe shares, and reading an encoder back from a file.

The core knows no architecture: :class:`CorexModel` is whatever encoder and heads the registry
built, wired encoder -> heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from corex import checkpoints, rundir
from corex.errors import CorexError


class CorexModel(nn.Module):
    """The shared encoder and every head the recipe defines."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, image: Tensor, heads: list[str] | None = None) -> dict[str, Tensor]:
        features = self.encoder(image)
        names = list(self.heads) if heads is None else heads
        return {name: self.heads[name](features) for name in names}


def encoder_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's own entries of a :class:`CorexModel` state dict, with clean keys."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def load_encoder_file(path: Path, encoder: nn.Module, where: str) -> None:
    """Load an exported encoder (with its ``.json`` metadata) or a corex checkpoint into ``encoder``."""
    payload = checkpoints.load_file(path, where)
    meta_path = path.with_suffix(".json")
    if not isinstance(payload, Mapping):
        raise CorexError(f"{where}: '{path}' holds a {type(payload).__name__}, not an encoder state dict or a corex checkpoint")
    if "model" in payload and isinstance(payload["model"], Mapping):
        arch = payload.get("arch")
        state = encoder_state(payload["model"])
    else:
        state = dict(payload)
        arch = rundir.read_json(meta_path).get("arch") if meta_path.exists() else None
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CorexError(f"{where}: '{path}' holds no encoder weights (expected a mapping of parameter name to tensor)")
    if arch is not None and arch != getattr(encoder, "arch", None):
        raise CorexError(f"{where}: '{path}' holds a {arch} encoder, but this recipe's encoder is {encoder.arch}")
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CorexError(
            f"{where}: '{path}' does not fit this recipe's {encoder.arch} encoder "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "was it made with other options such as width or in_channels?"
        )


__all__ = ["CorexModel", "encoder_state", "load_encoder_file"]
