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
FAITHFULNESS = ("deletion_auc", "insertion_auc")


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

    Baselines. A pointing game means something only next to what a map that ignores the image
    scores. ``mask_area`` is the uniform map's; ``pointing_game/prior`` is that of a *fixed point*
    fitted on the training split's boxes (the engine streams the training split through
    :meth:`training_update` in an evaluate stage, ``LearnsFromTraining``): the one pixel inside the
    most training masks (of images scored by the same rule; the first such pixel in raster order on
    ties), which every test image then "points" at. ``pointing_game/vs_prior`` is the saliency's
    margin over it, paired image by image. Without training data there is no prior.

    Faithfulness (``faithfulness_steps`` > 0): the deletion and insertion curves of RISE (Petsiuk
    et al., BMVC 2018). Pixels are removed (set to 0, black) from the image, most salient first, in
    ``faithfulness_steps`` equal steps, and the probability of the true class is recorded after each;
    ``deletion_auc`` is the area under that curve over the share removed (low: the map found what the
    model uses). Insertion starts from a heavily blurred copy and puts the original pixels back, most
    salient first; ``insertion_auc`` is high when they restore the prediction fast. Both are also
    computed for a random order of the pixels (``deletion_auc/random``, ``insertion_auc/random``),
    the chance level, and ``.../vs_random`` is the map's margin over it (saliency minus random).
    Ties in a map are broken in a random (seeded) order, so a flat map scores as the random order.
    It costs ``4 * (faithfulness_steps + 1)`` forward passes of the scored images.

    :meth:`intervals` gives 95% percentile-bootstrap intervals of ``pointing_game`` and
    ``saliency_in_mask`` (and of the baselines and faithfulness figures above), ``bootstrap`` resamples with a fixed ``seed`` (0 disables them); a
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
        faithfulness_steps: int = 10,
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"class_names needs at least 2 classes, got {list(class_names)!r}.")
        if max_examples < 0:
            raise ValueError(f"max_examples must be 0 (no figure) or more, got {max_examples}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        if faithfulness_steps < 0 or faithfulness_steps == 1:
            raise ValueError(f"faithfulness_steps must be 0 (off) or at least 2, got {faithfulness_steps}.")
        self.faithfulness_steps = faithfulness_steps
        self.class_names = list(class_names)
        self.head = head
        self.level = level
        self.max_examples = max_examples
        self.bootstrap = bootstrap
        self.seed = seed
        self.split = split
        self.reset()
        self.reset_training()

    def reset_training(self) -> None:
        """Forget the training boxes (:meth:`reset` keeps them, as it keeps a fitted prior)."""
        self._box_counts: Tensor | None = None
        self._box_images = 0

    def training_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], *, model: Any = None) -> None:
        """Count, per pixel, the training images whose mask covers it (images scored by the same rule)."""
        labels, masks, scored = self._scored_masks(batch)
        if not scored.any():
            return
        counts = masks[scored].double().sum(0)[0]
        if self._box_counts is not None and self._box_counts.shape != counts.shape:
            counts = F.interpolate(counts[None, None], size=self._box_counts.shape, mode="nearest")[0, 0]
        self._box_counts = counts if self._box_counts is None else self._box_counts + counts
        self._box_images += int(scored.sum())

    @property
    def prior_point(self) -> tuple[int, int, tuple[int, int]] | None:
        """``(row, column, (height, width))`` of the pixel inside the most training masks (the first in
        raster order on ties), ``None`` without training boxes."""
        if self._box_counts is None:
            return None
        row, column = divmod(int(self._box_counts.flatten().argmax()), self._box_counts.shape[1])
        return row, column, tuple(self._box_counts.shape)

    def _scored_masks(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        labels = batch["label"].detach().long().cpu()
        if ((labels < -1) | (labels >= len(self.class_names))).any():
            raise ValueError(f"labels must lie in -1..{len(self.class_names) - 1}, got {labels.tolist()}.")
        masks = batch["mask"].detach().float().cpu() > 0.5
        scored = batch["has_mask"].detach().bool().cpu() & (labels > 0) & masks.flatten(1).any(1)
        return labels, masks, scored

    def reset(self) -> None:
        self._prior_hits: list[Tensor] = []
        self._faithfulness: dict[str, list[Tensor]] = {}
        self._hits: list[Tensor] = []
        self._energy: list[Tensor] = []
        self._area: list[Tensor] = []
        self._clusters: list[str] = []
        self._examples: list[dict[str, Any]] = []

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], *, model: Any) -> None:
        labels, masks, scored = self._scored_masks(batch)
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
        prior = self.prior_point
        if prior is not None:
            self._prior_hits.append(prior_hits(masks, prior).float())
        if self.faithfulness_steps:
            generator = torch.Generator().manual_seed(self.seed + sum(len(h) for h in self._hits))

            def score(x: Tensor) -> Tensor:
                with torch.no_grad():
                    return torch.softmax(model(x, [self.head])[self.head].float(), 1)

            curves = faithfulness_curves(score, images, saliency.to(images.device), labels.to(images.device),
                                         self.faithfulness_steps, generator)
            for name, values in curves.items():
                self._faithfulness.setdefault(name, []).append(area_under(values).cpu())
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
                    "prior": None if prior is None else prior_pixel(prior, masks.shape[-2:]),
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

    def _per_image(self) -> dict[str, Tensor]:
        """Every per-image score whose mean is a metric, ``(n,)`` each."""
        values = {"pointing_game": torch.cat(self._hits).double(), "saliency_in_mask": torch.cat(self._energy).double()}
        if self._prior_hits:
            values["pointing_game/prior"] = torch.cat(self._prior_hits).double()
            values["pointing_game/vs_prior"] = values["pointing_game"] - values["pointing_game/prior"]
        if self._faithfulness:
            curves = {name: torch.cat(parts).double() for name, parts in self._faithfulness.items()}
            for name in FAITHFULNESS:
                values[name], values[f"{name}/random"] = curves[name], curves[f"{name}/random"]
                values[f"{name}/vs_random"] = curves[name] - curves[f"{name}/random"]
        return values

    def compute(self) -> dict[str, float]:
        if not self._hits:
            empty = {name: math.nan for name in (*INTERVAL_METRICS, "mask_area")} | {"n_localized": 0.0}
            if self.prior_point is not None:
                empty |= {"pointing_game/prior": math.nan, "pointing_game/vs_prior": math.nan}
            if self.faithfulness_steps:
                empty |= {f"{name}{suffix}": math.nan for name in FAITHFULNESS for suffix in ("", "/random", "/vs_random")}
            return empty
        metrics = {name: float(values.mean()) for name, values in self._per_image().items()}
        return metrics | {"mask_area": float(torch.cat(self._area).mean()), "n_localized": float(len(torch.cat(self._hits)))}

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling patients with all their scored images."""
        if self.bootstrap == 0 or not self._hits:
            return {}
        values = self._per_image()
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
        if self._examples[0].get("prior") is not None:
            legend.append(Line2D([], [], color="cyan", marker="+", linestyle="none", markersize=9,
                                 label="fixed point fitted on the training boxes (the prior)"))
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
    if example.get("prior") is not None:
        axes.plot(example["prior"][1], example["prior"][0], marker="+", color="cyan", markersize=9, markeredgewidth=1.5)
    if not saliency.any():
        verdict = "empty map"
    else:
        row, column = divmod(int(saliency.argmax()), saliency.shape[1])
        axes.plot(column, row, marker="x", color="white", markeredgecolor="black", markersize=9, markeredgewidth=2.5)
        axes.plot(column, row, marker="x", color="white", markersize=8, markeredgewidth=1.2)
        verdict = "hit" if example["hit"] == 1 else "miss" if example["hit"] == 0 else "tied maxima"
    return f"{example['class']}: {verdict}, {example['energy']:.0%} in mask"


def prior_pixel(prior: tuple[int, int, tuple[int, int]], size: Sequence[int]) -> tuple[int, int]:
    """The prior's pixel on an image of ``size`` ``(H, W)`` (its centre mapped when the training masks had another size)."""
    row, column, (height, width) = prior
    if (height, width) == tuple(size):
        return row, column
    return min(size[0] - 1, int((row + 0.5) * size[0] / height)), min(size[1] - 1, int((column + 0.5) * size[1] / width))


def prior_hits(masks: Tensor, prior: tuple[int, int, tuple[int, int]]) -> Tensor:
    """Whether each mask ``(B, 1, H, W)`` holds the prior's pixel: ``(B,)`` bool."""
    row, column = prior_pixel(prior, masks.shape[-2:])
    return masks[:, 0, row, column].bool()


def blurred(images: Tensor) -> Tensor:
    """A heavily blurred copy (averaged over 16 x 16 blocks, then upsampled bilinearly): insertion's canvas."""
    height, width = images.shape[-2:]
    small = F.adaptive_avg_pool2d(images, (max(1, height // 16), max(1, width // 16)))
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def faithfulness_curves(score: Any, images: Tensor, saliency: Tensor, labels: Tensor, steps: int, generator: torch.Generator,
                        canvas: Tensor | None = None, chunk: int = 256) -> dict[str, Tensor]:
    """Deletion and insertion curves (RISE), for the saliency's order and a random one.

    ``score(images)`` returns class probabilities ``(B, K)``; ``saliency`` ``(B, 1, H, W)`` orders the
    pixels (ties broken at random); ``steps`` + 1 points from nothing changed to everything. Deletion
    sets removed pixels to 0; insertion starts from ``canvas`` (default :func:`blurred`) and puts the
    image's pixels back. Returns ``{"deletion_auc", "insertion_auc", "deletion_auc/random",
    "insertion_auc/random"}``: ``(B, steps + 1)`` probabilities of ``labels``, the shares changed in
    :func:`curve_shares`.
    """
    batch, _, height, width = images.shape
    pixels = height * width
    canvas = blurred(images) if canvas is None else canvas
    tie_break = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(batch)]).to(images.device)
    ranked = saliency.flatten(1).gather(1, tie_break).argsort(dim=1, descending=True, stable=True)
    orders = {"": tie_break.gather(1, ranked),
              "/random": torch.stack([torch.randperm(pixels, generator=generator) for _ in range(batch)]).to(images.device)}
    counts = curve_counts(pixels, steps).to(images.device)
    curves = {}
    for suffix, order in orders.items():
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=images.device).expand(batch, pixels))
        changed = (rank[None] < counts[:, None, None]).view(steps + 1, batch, 1, height, width)  # (S+1, B, 1, H, W)
        deleted = torch.where(changed, torch.zeros((), device=images.device), images[None])
        inserted = torch.where(changed, images[None], canvas[None])
        for name, stack in (("deletion_auc", deleted), ("insertion_auc", inserted)):
            flat = stack.reshape(-1, *images.shape[1:])
            probabilities = torch.cat([score(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])
            true = probabilities.view(steps + 1, batch, -1).gather(2, labels.view(1, batch, 1).expand(steps + 1, batch, 1))
            curves[f"{name}{suffix}"] = true[..., 0].T.float()
    return curves


def curve_counts(pixels: int, steps: int) -> Tensor:
    """How many pixels are changed at each of the ``steps + 1`` points: ``round(j * pixels / steps)``."""
    return torch.tensor([round(j * pixels / steps) for j in range(steps + 1)], dtype=torch.long)


def area_under(curves: Tensor) -> Tensor:
    """Trapezoidal area under curves ``(B, S + 1)`` sampled at equal steps of the share changed, from 0 to 1."""
    steps = curves.shape[1] - 1
    return (curves.sum(1) - (curves[:, 0] + curves[:, -1]) / 2) / steps


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
