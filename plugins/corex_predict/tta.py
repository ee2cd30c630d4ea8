"""Test-time augmentation: the model sees each image several ways, and the probabilities are averaged.

Views (``--tta hflip,scale``; the original image is always one of the views):

``hflip``        the image mirrored left-right. Chest anatomy is lateralised (the heart on the
                 patient's left), so this helps only a model trained with flips (``cxr_light``
                 with ``hflip: true``, the MoCo pipelines); check it with ``corex evaluate``.
``scale``        the content shrunk to 90% and centred on an air (zero) border, the padding
                 ``resize_pad`` already adds: within ``cxr_light``'s zoom range 0.9-1.1.
                 ``scale=0.8`` picks another factor in (0, 1).

A view's segmentation logits are mapped back onto the original image (flipped back; cropped and
resized back) before averaging. Classification heads average softmax probabilities, segmentation
heads sigmoid probabilities; other heads average their raw output. :class:`TTAModel` returns the
averages as logits again (``log p`` and ``logit p``), so evaluators, losses and ``softmax`` see the
averaged probabilities without knowing about TTA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex.errors import CorexError

DEFAULT_SCALE = 0.9


class View:
    """One deterministic transform of a batch and its inverse on image-sized outputs."""

    name = "identity"

    def apply(self, image: Tensor) -> Tensor:
        return image

    def invert(self, output: Tensor) -> Tensor:
        return output


class HorizontalFlip(View):
    name = "hflip"

    def apply(self, image: Tensor) -> Tensor:
        return image.flip(-1)

    def invert(self, output: Tensor) -> Tensor:
        return output.flip(-1)


class Shrink(View):
    """The image resized by ``factor`` < 1 (antialiased) and zero-padded back to its size."""

    def __init__(self, factor: float = DEFAULT_SCALE):
        self.factor = factor
        self.name = "scale" if factor == DEFAULT_SCALE else f"scale={factor:g}"

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        inner_h, inner_w = max(1, round(height * self.factor)), max(1, round(width * self.factor))
        return (height - inner_h) // 2, (width - inner_w) // 2, inner_h, inner_w

    def apply(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        top, left, inner_h, inner_w = self._box(height, width)
        small = F.interpolate(image, size=(inner_h, inner_w), mode="bilinear", align_corners=False, antialias=True)
        return F.pad(small, (left, width - inner_w - left, top, height - inner_h - top))

    def invert(self, output: Tensor) -> Tensor:
        height, width = output.shape[-2:]
        top, left, inner_h, inner_w = self._box(height, width)
        inner = output[..., top:top + inner_h, left:left + inner_w]
        return F.interpolate(inner, size=(height, width), mode="bilinear", align_corners=False)


def parse_tta(spec: str | Sequence[str] | None) -> list[View]:
    """``"hflip,scale"`` (or a list of names) to views; the identity is implicit. A
    :class:`CorexError` names an unknown view and the known ones."""
    if spec is None:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    views: list[View] = []
    for name in names:
        key, _, value = name.partition("=")
        if key == "hflip" and not value:
            views.append(HorizontalFlip())
        elif key == "scale":
            try:
                factor = float(value) if value else DEFAULT_SCALE
            except ValueError:
                factor = -1.0
            if not 0.0 < factor < 1.0:
                raise CorexError(f"--tta: '{name}': the scale factor must be a number in (0, 1), e.g. scale=0.85")
            views.append(Shrink(factor))
        else:
            raise CorexError(f"--tta: unknown view '{name}'; views: hflip, scale (or scale=FACTOR), comma-separated")
    seen = [v.name for v in views]
    if len(set(seen)) != len(seen):
        raise CorexError(f"--tta: a view is named twice in {', '.join(seen)}")
    return views


class TTAModel(nn.Module):
    """``model`` averaged over the identity and ``views``; same call and outputs as the model.

    ``encoder`` and ``heads`` are the wrapped model's (for evaluators that look inside the model,
    which then see the plain model).
    """

    def __init__(self, model: nn.Module, views: Sequence[View]):
        super().__init__()
        self.model = model
        self.views = [View(), *views]

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def heads(self) -> nn.ModuleDict:
        return self.model.heads

    def forward(self, image: Tensor, heads: list[str] | None = None) -> dict[str, Tensor]:
        if len(self.views) == 1:
            return self.model(image, heads)
        names = list(self.model.heads) if heads is None else heads
        sums: dict[str, Tensor] = {}
        for view in self.views:
            outputs = self.model(view.apply(image), names)
            for name, output in outputs.items():
                value = self._to_average(name, output.float(), view, image)
                sums[name] = value if name not in sums else sums[name] + value
        return {name: self._from_average(name, total / len(self.views)) for name, total in sums.items()}

    def _task(self, name: str) -> str | None:
        return getattr(self.model.heads[name], "task", None)

    def _to_average(self, name: str, output: Tensor, view: View, image: Tensor) -> Tensor:
        spatial = output.dim() == 4 and output.shape[-2:] == image.shape[-2:]
        if self._task(name) == "classification":
            return torch.softmax(output, dim=1)
        if self._task(name) == "segmentation":
            return torch.sigmoid(view.invert(output) if spatial else output)
        return view.invert(output) if spatial else output

    def _from_average(self, name: str, mean: Tensor) -> Tensor:
        tiny = torch.finfo(mean.dtype).tiny
        if self._task(name) == "classification":
            return mean.clamp(min=tiny).log()
        if self._task(name) == "segmentation":
            return torch.logit(mean, eps=1e-6)
        return mean
