"""Which pixels to hide: random masks for the inpainting pretext task.

Every policy works the same way: it builds a per-sample *distance field* whose small values mark
the region shapes, then hides the ``coverage`` fraction of pixels with the smallest values. The
shapes therefore grow (or thin) together until they hide the target fraction, so coverage is
exact up to ties on rectangle edges, whatever the number of regions or their overlaps, and no
Python loop ever visits pixels (only the few regions).

Masks are ``(B, 1, H, W)`` float, 1 = hidden, drawn on the images' device from torch's global
RNG (so a seed repeats them), independently per sample.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Policy = Literal["rectangles", "strokes", "lungs"]
POLICIES: tuple[str, ...] = ("rectangles", "strokes", "lungs")

# Brush strokes: segments per stroke and the coarse grid the distance field is computed on.
STROKE_SEGMENTS = 4
STROKE_GRID = 64
# Lung-field prior: two vertical ellipses (centre x, centre y, semi-axis x, semi-axis y), in
# fractions of the width/height. They span ~15%-80% of the height and sit in the outer thirds,
# where the lungs of a PA/AP radiograph lie.
LUNG_ELLIPSES = ((0.29, 0.475, 0.17, 0.325), (0.71, 0.475, 0.17, 0.325))
# Within the ellipses, pixels darker than the mean (aerated lung, not heart or ribs) are this
# many times more likely to receive a region centre.
LUNG_DARK_BOOST = 4.0
LUNG_GRID = 64


def check_mask_options(policy: str, coverage: float, max_regions: int) -> None:
    """Refuse masking options that cannot work, with the option and value in the message."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must lie strictly between 0 and 1, got {coverage}.")
    if max_regions < 1:
        raise ValueError(f"max_regions must be at least 1, got {max_regions}.")


def random_masks(images: Tensor, policy: Policy, coverage: float, max_regions: int) -> Tensor:
    """Hide about ``coverage`` of each image's pixels with 1 to ``max_regions`` regions.

    ``rectangles``: axis-aligned rectangles at uniform random centres (the "random block" masks of
    Pathak et al., 2016). ``strokes``: free-form brush strokes, random walks of thick line
    segments (Yu et al., "Free-Form Image Inpainting with Gated Convolution", 2019).
    ``lungs``: rectangles whose centres are drawn preferentially inside the lung fields
    (:func:`lung_field_weights`), so the network must reconstruct lung texture, where the
    COVID-19 opacities are, rather than the easy background.
    """
    check_mask_options(policy, coverage, max_regions)
    batch, _, height, width = images.shape
    device = images.device
    if policy == "strokes":
        field = _stroke_field(batch, height, width, max_regions, device)
    else:
        weights = lung_field_weights(images) if policy == "lungs" else None
        field = _rectangle_field(batch, height, width, max_regions, device, weights)
    return _hide_smallest(field, coverage)


def _hide_smallest(field: Tensor, coverage: float) -> Tensor:
    """1 where ``field`` is among the ``coverage`` fraction of smallest values of its sample."""
    batch, height, width = field.shape
    k = min(max(round(coverage * height * width), 1), height * width)
    threshold = field.flatten(1).kthvalue(k, dim=1).values
    return (field <= threshold[:, None, None]).float().unsqueeze(1)


def _region_counts(batch: int, max_regions: int, device: torch.device) -> Tensor:
    """How many regions each sample uses, uniform in 1..max_regions, as a (B, max_regions) mask."""
    counts = torch.randint(1, max_regions + 1, (batch, 1), device=device)
    return torch.arange(max_regions, device=device) < counts


def _rectangle_field(
    batch: int,
    height: int,
    width: int,
    max_regions: int,
    device: torch.device,
    centre_weights: Tensor | None = None,
) -> Tensor:
    """The distance field of 1 to ``max_regions`` random rectangles per sample."""
    centres, half_sizes = _random_rectangles(batch, max_regions, device, centre_weights)
    used = _region_counts(batch, max_regions, device)
    return _field_of_rectangles(centres, half_sizes, used, height, width)


def _random_rectangles(
    batch: int, count: int, device: torch.device, centre_weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(B, count, 2)`` (y, x) centres in [0, 1) and ``(B, count, 2)`` relative half-sizes.

    Centres are uniform, or drawn by ``centre_weights``. Sizes vary by 2x between regions
    (the geometric mean of the half-sizes is 0.5-1) and aspect ratios between 1:2 and 2:1
    (relative to the image); only the ratios matter, since the threshold sets the area.
    """
    if centre_weights is None:
        centres = torch.rand(batch, count, 2, device=device)
    else:
        centres = _sample_centres(centre_weights, count)
    scale = torch.empty(batch, count, device=device).uniform_(0.5, 1.0)
    aspect = torch.empty(batch, count, device=device).uniform_(-math.log(2), math.log(2)).exp()
    return centres, torch.stack([scale * aspect.sqrt(), scale / aspect.sqrt()], dim=-1)


def _field_of_rectangles(centres: Tensor, half_sizes: Tensor, used: Tensor, height: int, width: int) -> Tensor:
    """min over the used regions of the Chebyshev distance to a centre, scaled by the half-sizes.

    Thresholding it at ``t`` gives the union of the rectangles of half-sizes ``t * half_sizes``
    around the centres, in units where the image is [0, 1] x [0, 1] and a pixel is its centre.
    """
    batch, count, _ = centres.shape
    device = centres.device
    y = (torch.arange(height, device=device) + 0.5) / height
    x = (torch.arange(width, device=device) + 0.5) / width
    field = torch.full((batch, height, width), math.inf, device=device)
    for r in range(count):  # a handful of regions, each vectorised over batch and pixels
        dy = (y[None, :] - centres[:, r, 0:1]).abs() / half_sizes[:, r, 0:1]
        dx = (x[None, :] - centres[:, r, 1:2]).abs() / half_sizes[:, r, 1:2]
        distance = torch.maximum(dy[:, :, None], dx[:, None, :])
        distance = distance.masked_fill(~used[:, r, None, None], math.inf)
        field = torch.minimum(field, distance)
    return field


def _stroke_field(batch: int, height: int, width: int, max_regions: int, device: torch.device) -> Tensor:
    """Distance to the nearest brush stroke, each divided by the stroke's relative thickness.

    The field is computed on a coarse grid and upsampled bilinearly, which keeps the cost
    independent of the image size.
    """
    side = max(height, width)
    extent = torch.tensor([height / side, width / side], device=device)  # isotropic (y, x) units
    path = _stroke_paths(batch * max_regions, extent).view(batch, max_regions, STROKE_SEGMENTS + 1, 2)

    grid_h, grid_w = min(height, STROKE_GRID), min(width, STROKE_GRID)
    gy = (torch.arange(grid_h, device=device) + 0.5) / grid_h * extent[0]
    gx = (torch.arange(grid_w, device=device) + 0.5) / grid_w * extent[1]
    points = torch.stack(torch.meshgrid(gy, gx, indexing="ij"), dim=-1).view(-1, 2)
    distance = _distance_to_paths(points, path)  # (B, R, points)

    thickness = torch.empty(batch, max_regions, 1, device=device).uniform_(0.5, 1.0)
    used = _region_counts(batch, max_regions, device)
    distance = (distance / thickness).masked_fill(~used[..., None], math.inf)
    field = distance.amin(dim=1).view(batch, 1, grid_h, grid_w)
    field = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
    return field.squeeze(1)


def _stroke_paths(strokes: int, extent: Tensor) -> Tensor:
    """``(strokes, STROKE_SEGMENTS + 1, 2)`` vertices of random walks inside ``[0, extent]``.

    Each walk starts at a uniform point; each segment turns by up to 90 degrees from the last
    and steps 10-30% of the longer side, bounced back into the image where it walks out.
    """
    device = extent.device
    steps = torch.empty(strokes, STROKE_SEGMENTS, device=device).uniform_(0.1, 0.3)
    turns = torch.empty(strokes, STROKE_SEGMENTS, device=device).uniform_(-math.pi / 2, math.pi / 2)
    angle = torch.rand(strokes, device=device) * 2 * math.pi
    vertices = [torch.rand(strokes, 2, device=device) * extent]
    for s in range(STROKE_SEGMENTS):  # not cumsum: it refuses deterministic mode on CUDA
        angle = angle + turns[:, s]
        direction = torch.stack([angle.sin(), angle.cos()], dim=1)
        step = vertices[-1] + steps[:, s : s + 1] * direction
        vertices.append(_bounce(step, extent))
    return torch.stack(vertices, dim=1)


def _distance_to_paths(points: Tensor, paths: Tensor) -> Tensor:
    """Euclidean distance from each of ``points`` (P, 2) to each path of ``paths`` (..., V, 2).

    Returns ``(..., P)``: per segment, the point is projected onto it and clamped to its ends.
    """
    start, end = paths[..., :-1, :], paths[..., 1:, :]  # (..., S, 2)
    seg = (end - start).unsqueeze(-2)  # (..., S, 1, 2)
    rel = points - start.unsqueeze(-2)  # (..., S, P, 2)
    t = ((rel * seg).sum(-1) / (seg * seg).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return (rel - t.unsqueeze(-1) * seg).norm(dim=-1).amin(dim=-2)


def _bounce(points: Tensor, extent: Tensor) -> Tensor:
    """Reflect points that walked out of [0, extent] back inside (a walk does not stick to edges)."""
    points = points.abs()
    return torch.where(points > extent, 2 * extent - points, points).clamp(min=0).minimum(extent)


def lung_field_weights(images: Tensor) -> Tensor:
    """Where region centres go under the ``lungs`` policy: ``(B, LUNG_GRID, LUNG_GRID)`` weights.

    No lung segmentation is available, so the lung fields are approximated from the image itself
    within an anatomical prior: inside two vertical ellipses (``LUNG_ELLIPSES``: the outer thirds
    of the width, ~15%-80% of the height), pixels darker than that image's mean inside the
    ellipses (aerated lung, rather than heart, diaphragm or ribs) weigh ``LUNG_DARK_BOOST`` times
    more. The mean, not the median: where the lungs fill most of the ellipses the median is lung
    itself and nothing would count as darker. Outside the ellipses the weight is zero, so the dark
    air around the body never attracts a region. A flat image falls back to the ellipses alone.
    """
    batch, _, height, width = images.shape
    grid_h, grid_w = min(height, LUNG_GRID), min(width, LUNG_GRID)
    coarse = F.adaptive_avg_pool2d(images.float().mean(dim=1, keepdim=True), (grid_h, grid_w))[:, 0]
    y = ((torch.arange(grid_h, device=images.device) + 0.5) / grid_h)[:, None]
    x = ((torch.arange(grid_w, device=images.device) + 0.5) / grid_w)[None, :]
    inside = torch.zeros(grid_h, grid_w, dtype=torch.bool, device=images.device)
    for cx, cy, ax, ay in LUNG_ELLIPSES:
        inside |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1
    dark = coarse < coarse[:, inside].mean(dim=1)[:, None, None]
    return inside * (1.0 + (LUNG_DARK_BOOST - 1.0) * dark)


def _sample_centres(weights: Tensor, count: int) -> Tensor:
    """Draw ``count`` (y, x) centres in [0, 1) per sample, cell by ``weights``, uniform within it."""
    batch, grid_h, grid_w = weights.shape
    cells = torch.multinomial(weights.flatten(1), count, replacement=True)
    row, col = cells // grid_w, cells % grid_w
    jitter = torch.rand(batch, count, 2, device=weights.device)
    return torch.stack([(row + jitter[..., 0]) / grid_h, (col + jitter[..., 1]) / grid_w], dim=-1)
