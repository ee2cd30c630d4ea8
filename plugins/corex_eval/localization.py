"""Localization evaluator: does the classifier's evidence lie on the radiologists' opacity boxes?

A classifier can score well for the wrong reasons (text markers, devices, the patient's position),
which a deployment must rule out. This evaluator takes Grad-CAM saliency maps of the classification
head (Selvaraju et al., "Grad-CAM: visual explanations from deep networks via gradient-based
localization", ICCV 2017) and scores them against the opacity masks drawn from the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from matplotlib.lines import Line2D

from corex_eval.artefacts import save_gallery
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_blocks

INTERVAL_METRICS = ("pointing_game", "saliency_in_mask")


class LocalizationEvaluator:
    """Grad-CAM of one classification head, scored against the opacity masks.

    Saliency. For each image, the Grad-CAM map of the logit of its *true* class (the question is
    whether the evidence for the correct finding lies on the opacity), taken at pyramid level
    ``level`` (``-1``, the default, is the deepest map, the one Grad-CAM's authors use; ``-2``
    gives a map twice as fine, which helps at small image sizes): with ``A`` the feature maps
    ``(C, h, w)`` and ``y`` the logit, ``cam = relu(sum_c mean_xy(dy/dA_c) * A_c)``, upsampled
    bilinearly to the image and divided by its maximum (an all-zero map stays zero).

    Scored images: annotated (``has_mask``), of a positive class (label neither ``-1`` nor 0,
    the negative class), with a non-empty mask, so that there is something to point at.

    Metrics (:meth:`compute`):

    * ``pointing_game``: the fraction of scored images whose saliency maximum falls inside the
      mask (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016; here
      without their 15-pixel tolerance, as the masks are the boxes themselves).
    * ``saliency_in_mask``: the mean share of the saliency that lies inside the mask, the
      energy-based pointing game (Wang et al., "Score-CAM", CVPR workshops 2020).
    * ``mask_area``: the mean share of the image covered by the mask. This is what a uniform map
      scores on both metrics, the chance level to compare them with.
    * ``n_localized``: the number of scored images.

    Ties: where several pixels share the maximum, an image counts as the share of them inside the
    mask (a random pick among them); an all-zero map is treated as uniform, so it scores
    ``mask_area``: no evidence is no better and no worse than chance.

    :meth:`intervals` gives 95% percentile-bootstrap intervals of ``pointing_game`` and
    ``saliency_in_mask``, ``bootstrap`` resamples with a fixed ``seed`` (0 disables them); a
    resample draws patients (``patient_id``; else studies; else images) with all their scored
    images. :meth:`save` draws the first ``max_examples`` scored images with their maps, the
    maps' maxima and mask outlines; only those, and three numbers per image, are kept in memory.
    ``split`` (supplied by the core) only labels the figure.

    The model is in eval mode and is not changed: gradients are taken with respect to the
    feature maps only (``torch.autograd.grad``), so no parameter's ``.grad`` is touched.
    """

    needs_model = True

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        head: str = "classification",
        level: int = -1,
        max_examples: int = 8,
        bootstrap: int = 1000,
        seed: int = 0,
        split: str = "test",
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"class_names needs at least 2 classes, got {list(class_names)!r}.")
        if max_examples < 0:
            raise ValueError(f"max_examples must be 0 (no figure) or more, got {max_examples}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        self.class_names = list(class_names)
        self.head = head
        self.level = level
        self.max_examples = max_examples
        self.bootstrap = bootstrap
        self.seed = seed
        self.split = split
        self.reset()

    def reset(self) -> None:
        self._hits: list[Tensor] = []
        self._energy: list[Tensor] = []
        self._area: list[Tensor] = []
        self._clusters: list[str] = []
        self._examples: list[dict[str, Any]] = []

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], *, model: Any) -> None:
        labels = batch["label"].detach().long().cpu()
        if ((labels < -1) | (labels >= len(self.class_names))).any():
            raise ValueError(f"labels must lie in -1..{len(self.class_names) - 1}, got {labels.tolist()}.")
        masks = batch["mask"].detach().float().cpu() > 0.5
        scored = batch["has_mask"].detach().bool().cpu() & (labels > 0) & masks.flatten(1).any(1)
        if not scored.any():
            return
        image = batch["image"]
        images = image[scored.to(image.device)].detach().float()
        labels, masks = labels[scored], masks[scored]
        saliency = self.grad_cam(model, images, labels.to(image.device)).cpu()
        hits, energy = localization_scores(saliency, masks)
        self._hits.append(hits)
        self._energy.append(energy)
        self._area.append(masks.flatten(1).float().mean(1))
        key = next((k for k in ("patient_id", "study_id") if batch.get(k) is not None), "image_id")
        self._clusters += [str(c) for c, s in zip(batch[key], scored.tolist(), strict=True) if s]

        ids = [i for i, s in zip(batch["image_id"], scored.tolist(), strict=True) if s]
        for i in range(min(self.max_examples - len(self._examples), len(ids))):
            self._examples.append(
                {
                    "image_id": ids[i],
                    "class": self.class_names[int(labels[i])],
                    "image": images[i, 0].cpu().numpy().copy(),
                    "saliency": saliency[i, 0].numpy().copy(),
                    "mask": masks[i, 0].numpy().copy(),
                    "hit": float(hits[i]),
                    "energy": float(energy[i]),
                }
            )

    def grad_cam(self, model: Any, images: Tensor, labels: Tensor) -> Tensor:
        """Grad-CAM maps ``(B, 1, H, W)`` in ``[0, 1]`` of the logits of ``labels``."""
        if self.head not in model.heads:
            raise ValueError(f"head {self.head!r} is not among the model's heads {list(model.heads)}.")
        with torch.enable_grad():
            # An input that needs a gradient puts the features on the graph even when the
            # encoder is frozen; only the features' gradient is computed, never the parameters'.
            features = model.encoder(images.detach().requires_grad_())
            if not -len(features) <= self.level < len(features):
                raise ValueError(f"level {self.level} is outside the encoder's {len(features)} pyramid levels.")
            logits = model.heads[self.head](features)
            if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
                shape, expected = tuple(logits.shape), f"(B, {len(self.class_names)})"
                raise ValueError(f"head {self.head!r} gave shape {shape}; expected {expected} logits.")
            # Images are independent in eval mode, so one backward pass gives every image's map.
            true_logits = logits.float().gather(1, labels[:, None]).sum()
            activations = features[self.level]
            (gradients,) = torch.autograd.grad(true_logits, activations, allow_unused=True)
        if gradients is None:
            raise ValueError(f"head {self.head!r} does not depend on pyramid level {self.level}.")
        activations, gradients = activations.detach().float(), gradients.float()
        channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((channel_weights * activations).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        peak = cam.flatten(1).amax(1).clamp(min=torch.finfo(cam.dtype).tiny)
        return cam / peak[:, None, None, None]

    def compute(self) -> dict[str, float]:
        if not self._hits:
            return {name: math.nan for name in (*INTERVAL_METRICS, "mask_area")} | {"n_localized": 0.0}
        hits, energy, area = torch.cat(self._hits), torch.cat(self._energy), torch.cat(self._area)
        return {
            "pointing_game": float(hits.mean()),
            "saliency_in_mask": float(energy.mean()),
            "mask_area": float(area.mean()),
            "n_localized": float(len(hits)),
        }

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling patients with all their scored images."""
        if self.bootstrap == 0 or not self._hits:
            return {}
        values = {"pointing_game": torch.cat(self._hits).double(), "saliency_in_mask": torch.cat(self._energy).double()}
        means: dict[str, list[Tensor]] = {name: [] for name in values}
        for counts in resample_blocks(cluster_index(self._clusters), self.bootstrap, self.seed):
            for name, value in values.items():
                means[name].append(counts @ value / counts.sum(1))
        return percentile_intervals(means)

    def save(self, out_dir: Path) -> None:
        """Write ``saliency_examples.png`` (nothing when no image was scored)."""
        if not self._examples:
            return
        legend = [
            Line2D([], [], color="lime", label="opacity mask (radiologists' boxes)"),
            Line2D([], [], color="white", marker="x", linestyle="none", markeredgecolor="black",
                   markersize=8, label="saliency maximum: a hit when inside the mask"),
        ]
        note = ("Pointing game: the share of images whose saliency maximum lies inside the mask; "
                "'in mask': the share of the map's total saliency inside it. A uniform map scores the "
                "mask's area on both.")
        save_gallery(Path(out_dir) / "saliency_examples.png", self._examples, _draw_saliency,
                     f"Where the classifier looks, {self.split} split: Grad-CAM of the true class",
                     legend=legend, note=note, colorbar=(SALIENCY_COLOURS, "Grad-CAM saliency (1 = the map's maximum)"))


SALIENCY_COLOURS = "jet"


def _draw_saliency(axes: Any, example: dict[str, Any]) -> str:
    saliency = example["saliency"]
    axes.imshow(saliency, cmap=SALIENCY_COLOURS, vmin=0, vmax=1, alpha=0.45)
    axes.contour(example["mask"], levels=[0.5], colors="lime", linewidths=1.2)
    if not saliency.any():
        verdict = "empty map"
    else:
        row, column = divmod(int(saliency.argmax()), saliency.shape[1])
        axes.plot(column, row, marker="x", color="white", markeredgecolor="black", markersize=9, markeredgewidth=2.5)
        axes.plot(column, row, marker="x", color="white", markersize=8, markeredgewidth=1.2)
        verdict = "hit" if example["hit"] == 1 else "miss" if example["hit"] == 0 else "tied maxima"
    return f"{example['class']}: {verdict}, {example['energy']:.0%} in mask"


def localization_scores(saliency: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image pointing-game hit and share of saliency inside the mask, each ``(B,)``.

    ``saliency`` ``(B, 1, H, W)`` is non-negative; ``masks`` ``(B, 1, H, W)`` is boolean (or 0/1).
    The hit is the share of the pixels at the map's maximum that lie inside the mask (1 or 0 for
    a single maximum). An all-zero map counts as uniform: both scores are the mask's area.
    """
    saliency, masks = saliency.flatten(1).double(), masks.flatten(1).bool()
    if (saliency < 0).any():
        raise ValueError("saliency maps must be non-negative.")
    # Every pixel of an all-zero map is "at the maximum", which gives the uniform map's scores.
    at_peak = saliency == saliency.amax(1, keepdim=True)
    hits = (at_peak & masks).sum(1) / at_peak.sum(1)
    total = saliency.sum(1)
    inside = torch.where(masks, saliency, 0.0).sum(1)
    area = masks.double().mean(1)
    energy = torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny), area)
    return hits.float(), energy.float()
