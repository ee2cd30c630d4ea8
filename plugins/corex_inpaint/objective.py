"""The inpainting-CXR objective: hide regions of the radiograph, reconstruct them.

Context encoders (Pathak et al., "Context Encoders: Feature Learning by Inpainting", CVPR 2016)
learn features by filling in missing image regions: to paint a plausible lung, rib or heart
border back in, the encoder has to understand the anatomy around it. Ridzuan et al. (MIUA 2022,
the study corex reproduces) use this inpainting of chest X-rays as a self-supervised pretext task
before fine-tuning the shared encoder on the four-class COVID-19 classification.

Here the shared encoder reads the masked image and a U-Net decoder over its pyramid
(:class:`corex_heads.unet.UNetDecoder`) paints the whole image back; the loss is measured on the
hidden pixels (and, optionally, with a smaller weight on the visible ones).

Depends on the ``corex_heads`` plugin (shipped with corex) for that decoder, through its public API
(``from corex_heads import UNetDecoder``), never its internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from corex.interfaces import Batch
from corex.rundir import atomic_path
from corex_heads import UNetDecoder  # the heads plugin's public API (corex_heads.__all__); see the module docstring
from corex_inpaint.masks import Policy, check_mask_options, random_masks

FILLS: tuple[str, ...] = ("zero", "mean", "noise")
LOSSES: tuple[str, ...] = ("l1", "l2")
PREVIEW_SEED = 0  # fixed masks for the epoch grids, so grids of different epochs are comparable
PREVIEW_SAMPLES = 4


def masked_reconstruction_loss(
    reconstruction: Tensor,
    target: Tensor,
    hidden: Tensor,
    kind: Literal["l1", "l2"] = "l1",
    visible_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, loss_hidden, loss_visible)``: the mean error over hidden pixels, over visible
    pixels, and ``loss = loss_hidden + visible_weight * loss_visible``.

    Means are over all hidden (visible) pixels of the batch, so a sample that hides more pixels
    counts for more, as every hidden pixel is one prediction. ``hidden`` is 1 where hidden.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}.")
    # float32 whatever autocast produced: the sums run over every pixel of the batch.
    difference = reconstruction.float() - target.float()
    error = difference.abs() if kind == "l1" else difference**2
    hidden = hidden.float().expand_as(error)
    visible = 1.0 - hidden
    loss_hidden = (error * hidden).sum() / hidden.sum().clamp_min(1.0)
    loss_visible = (error * visible).sum() / visible.sum().clamp_min(1.0)
    return loss_hidden + visible_weight * loss_visible, loss_hidden, loss_visible


class Inpainting(nn.Module):
    """Inpainting-CXR pretext task (Pathak et al. 2016; Ridzuan et al., MIUA 2022).

    Options (recipe keys):

    * ``policy``: which pixels to hide (:func:`corex_inpaint.masks.random_masks`):
      ``"rectangles"`` (default; Pathak's random blocks), ``"strokes"`` (free-form brush strokes,
      Yu et al. 2019) or ``"lungs"`` (rectangles centred preferentially in the lung fields).
    * ``coverage``: fraction of pixels hidden per image, default 0.25, the share Pathak's
      central-region masks hide (a quarter of the image): large enough that the hidden content
      cannot be copied from its immediate neighbours.
    * ``max_regions``: each image hides 1 to ``max_regions`` regions (default 4).
    * ``fill``: what the encoder sees in the hidden region: ``"zero"`` (default), ``"mean"`` (the
      image's mean over its visible pixels, so nothing of the hidden content leaks) or
      ``"noise"`` (uniform in [0, 1], so the hole is not marked by a constant value).
    * ``loss``: ``"l1"`` (default; its reconstructions are less blurry) or ``"l2"`` (Pathak's
      reconstruction loss).
    * ``visible_weight``: weight of the loss on visible pixels; 0 (default) trains on the hidden
      pixels only, as Pathak's context encoder does, so the task cannot be solved by copying.
    * ``decoder_width``: base width of the U-Net decoder (default: half the encoder's first level).

    The core injects ``encoder`` (trained in place; what transfers after pre-training),
    ``channels`` and ``strides`` (its pyramid).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        channels: Sequence[int],
        strides: Sequence[int],
        policy: Literal["rectangles", "strokes", "lungs"] = "rectangles",
        coverage: float = 0.25,
        max_regions: int = 4,
        fill: Literal["zero", "mean", "noise"] = "zero",
        loss: Literal["l1", "l2"] = "l1",
        visible_weight: float = 0.0,
        decoder_width: int | None = None,
    ):
        super().__init__()
        check_mask_options(policy, coverage, max_regions)
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if visible_weight < 0:
            raise ValueError(f"visible_weight must be non-negative, got {visible_weight}.")
        if decoder_width is not None and decoder_width < 1:
            raise ValueError(f"decoder_width must be at least 1, got {decoder_width}.")
        self.encoder = encoder
        self.decoder = UNetDecoder(channels, strides, out_channels=1, width=decoder_width)
        self.policy: Policy = policy
        self.coverage = coverage
        self.max_regions = max_regions
        self.fill = fill
        self.loss_kind = loss
        self.visible_weight = visible_weight

    def hide(self, image: Tensor, hidden: Tensor) -> Tensor:
        """``image`` with its hidden pixels replaced by the fill value."""
        if self.fill == "zero":
            filler = torch.zeros_like(image)
        elif self.fill == "mean":
            visible = 1.0 - hidden
            total = visible.sum((1, 2, 3), keepdim=True).clamp_min(1.0)
            filler = ((image * visible).sum((1, 2, 3), keepdim=True) / total).expand_as(image)
        else:
            filler = torch.rand_like(image)
        return torch.where(hidden.bool(), filler, image)

    def reconstruct(self, masked: Tensor) -> Tensor:
        """The whole image painted back from the masked one, in [0, 1] like the input."""
        return torch.sigmoid(self.decoder(self.encoder(masked)))

    def forward(self, batch: Batch, augment: Callable[[Batch], Batch]) -> dict[str, Tensor]:
        image = augment(batch)["image"]
        with torch.no_grad():
            hidden = random_masks(image, self.policy, self.coverage, self.max_regions)
            masked = self.hide(image, hidden)
        reconstruction = self.reconstruct(masked)
        loss, loss_hidden, loss_visible = masked_reconstruction_loss(
            reconstruction, image, hidden, self.loss_kind, self.visible_weight
        )
        return {
            "loss": loss,
            "loss_hidden": loss_hidden.detach(),
            "loss_visible": loss_visible.detach(),
            "coverage": hidden.mean(),
        }

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, batch: Batch, out_dir: Path) -> Path:
        """Save ``inpaint_epoch{epoch:03d}.png``: up to 4 samples of the fixed ``batch``, columns
        input / masked / reconstruction / reconstruction pasted into the hidden region only.

        The masks come from a fixed seed, so the grids of successive epochs show the same holes;
        the global RNG state is restored afterwards, so training randomness is unaffected. The
        model runs in eval mode, so the preview does not update batch-norm statistics.
        """
        image = batch["image"][:PREVIEW_SAMPLES].to(next(self.decoder.parameters()).device)
        devices = [image.device] if image.device.type == "cuda" else []
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(PREVIEW_SEED)
                hidden = random_masks(image, self.policy, self.coverage, self.max_regions)
                masked = self.hide(image, hidden)
            reconstruction = self.reconstruct(masked)
        finally:
            self.train(was_training)
        pasted = torch.where(hidden.bool(), reconstruction, image)
        columns = {"input": image, "masked": masked, "reconstruction": reconstruction, "pasted": pasted}
        return _save_grid(columns, Path(out_dir) / f"inpaint_epoch{epoch:03d}.png")


def _save_grid(columns: Mapping[str, Tensor], path: Path) -> Path:
    """One row per sample, one column per entry of ``columns``; written atomically."""
    # A bare Figure on the Agg canvas: no pyplot, so no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = next(iter(columns.values())).shape[0]
    fig = Figure(figsize=(2 * len(columns), 2 * rows), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        axes[0, col].set_title(title)
        for row in range(rows):
            axes[row, col].imshow(images[row, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
    fig.tight_layout()
    with atomic_path(path) as temporary:  # a reader never sees a half-written PNG
        fig.savefig(temporary, format="png")
    return path
