"""The ``kornia`` pipeline: any sequence of kornia.augmentation ops, spelled out in the recipe.

.. code-block:: yaml

    augment:
      kornia:
        ops:
          - RandomAffine: {degrees: 5, translate: [0.05, 0.05]}
          - RandomHorizontalFlip          # a bare name takes the op's defaults
          - ColorJitter: {brightness: 0.2, contrast: 0.2, p: 0.8}
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import kornia.augmentation as K

from corex_kornia.augmentation import BatchAugmentation

# Every 2D augmentation class (3D ops, containers and mix ops such as RandomMixUpV2 need other
# inputs than one image batch); the *Base2D classes are abstract.
AUGMENTATIONS_2D: dict[str, type[K.AugmentationBase2D]] = {
    name: cls
    for name, cls in sorted(vars(K).items())
    if isinstance(cls, type)
    and issubclass(cls, K.AugmentationBase2D)
    and not name.endswith("Base2D")
}
# The batch contract keeps images in [0, 1]; normalising belongs to the model, and the clamp after
# augmentation would silently destroy a normalised image.
OUT_OF_RANGE = {"Normalize", "Denormalize"}


def kornia_pipeline(*, ops: list[str | dict]) -> BatchAugmentation:
    """A pipeline spelled out in the recipe, one kornia.augmentation op per item, in order.

    Each item is a one-key mapping ``{ClassName: {param: value, ...}}`` or a bare class name for
    an op's defaults. Names are 2D classes of ``kornia.augmentation``; YAML lists become tuples.
    Every op is built here, so a misspelled name or a bad parameter fails when the recipe is
    validated, not an hour into training. Ops that kornia cannot apply to masks (e.g.
    RandomThinPlateSpline) are refused: the mask would no longer match the image.
    """
    built = [_build(index, item) for index, item in enumerate(ops)]
    names = ", ".join(type(op).__name__ for op in built)
    return BatchAugmentation(lambda height, width: built, f"kornia: {names}")


def _build(index: int, item: str | Mapping[str, Any]) -> K.AugmentationBase2D:
    name, params = _parse(index, item)
    where = f"ops[{index}]"
    if name not in AUGMENTATIONS_2D:
        what = "a 2D image augmentation" if hasattr(K, name) else "a kornia.augmentation class"
        close = difflib.get_close_matches(name, AUGMENTATIONS_2D, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: {name!r} is not {what}{hint}")
    if name in OUT_OF_RANGE:
        raise ValueError(
            f"{where}: {name} takes images out of [0, 1]; normalising is the model's job"
        )
    cls = AUGMENTATIONS_2D[name]
    if cls.apply_transform_mask is K.AugmentationBase2D.apply_transform_mask:
        raise ValueError(
            f"{where} {name}: kornia cannot apply it to masks, so image and mask would drift apart"
        )
    try:
        return cls(**{key: _tuples(value) for key, value in params.items()})
    except Exception as err:  # kornia raises TypeError, ValueError or its own BaseError
        raise ValueError(f"{where} {name}: {err}") from err


def _parse(index: int, item: object) -> tuple[str, dict[str, Any]]:
    """``'Name'``, ``{'Name': None}`` or ``{'Name': {param: value}}`` -> (name, params)."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping) and len(item) == 1:
        ((name, params),) = item.items()
        if isinstance(name, str) and (params is None or isinstance(params, Mapping)):
            return name, dict(params or {})
    raise ValueError(
        f"ops[{index}]: expected a kornia.augmentation class name or a one-key mapping "
        f"{{ClassName: {{param: value}}}}, got {item!r}"
    )


def _tuples(value: Any) -> Any:
    """YAML has no tuples; kornia's signatures ask for them (ranges, sizes, kernel sizes)."""
    if isinstance(value, list):
        return tuple(_tuples(element) for element in value)
    return value
