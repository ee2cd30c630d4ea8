"""corex_inpaint.masks: the promises of each piece of the masking policies, one by one.

`test_inpaint.py` checks the masks as a whole (coverage, seeding, the lungs' preference); these
tests pin what the module's docstrings promise about their parts: the options refused at their
edges, the exact number of hidden pixels, the region counts, the rectangles' sizes and aspect
ratios, the strokes' walks and distances, the lung-field weights and the centres drawn from them.
"""

from __future__ import annotations

import math

import pytest
import torch

from corex_inpaint.masks import (
    LUNG_DARK_BOOST,
    LUNG_ELLIPSES,
    LUNG_GRID,
    STROKE_GRID,
    STROKE_SEGMENTS,
    _bounce,
    _distance_to_paths,
    _field_of_rectangles,
    _hide_smallest,
    _random_rectangles,
    _region_counts,
    _sample_centres,
    _stroke_field,
    _stroke_paths,
    check_mask_options,
    lung_field_weights,
    random_masks,
)

CPU = torch.device("cpu")


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("coverage", [1e-6, 0.5, 1 - 1e-6])
def test_coverage_strictly_inside_zero_and_one_and_one_region_are_accepted(coverage):
    check_mask_options("rectangles", coverage, 1)


@pytest.mark.parametrize(
    ("policy", "coverage", "max_regions", "named"),
    [
        ("rectangles", 0.0, 4, "coverage"),
        ("rectangles", 1.0, 4, "coverage"),
        ("rectangles", -0.5, 4, "coverage"),
        ("rectangles", math.nan, 4, "coverage"),
        ("strokes", 0.25, 0, "max_regions"),
        ("blocks", 0.25, 4, "policy"),
    ],
)
def test_options_outside_their_range_are_refused_by_name(policy, coverage, max_regions, named):
    with pytest.raises(ValueError, match=named):
        check_mask_options(policy, coverage, max_regions)
    with pytest.raises(ValueError, match=named):
        random_masks(torch.zeros(1, 1, 8, 8), policy, coverage, max_regions)


# -- the threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize(("coverage", "hidden"), [(0.3, 19), (0.01, 1), (1e-6, 1), (0.999, 64)])
def test_exactly_the_rounded_share_of_smallest_values_is_hidden_at_least_one_at_most_all(coverage, hidden):
    field = torch.randperm(3 * 64).float().view(3, 8, 8)  # distinct values: no ties
    mask = _hide_smallest(field, coverage)
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.float32
    for sample, values in zip(mask[:, 0], field):
        assert sample.sum().item() == hidden
        assert values[sample.bool()].max() < values[~sample.bool()].min() if hidden < 64 else sample.all()


# -- region counts --------------------------------------------------------------------------------


def test_each_sample_uses_its_first_1_to_max_regions_regions_uniformly():
    torch.manual_seed(0)
    used = _region_counts(6000, 4, CPU)
    counts = used.sum(dim=1)
    assert used.dtype == torch.bool and used.shape == (6000, 4)
    assert torch.equal(used, torch.arange(4) < counts[:, None])  # a prefix of the regions
    frequency = torch.bincount(counts, minlength=6)[1:5].float() / 6000
    assert counts.min() == 1 and counts.max() == 4
    assert torch.allclose(frequency, torch.full((4,), 0.25), atol=0.03)


def test_one_region_means_exactly_one_rectangle():
    torch.manual_seed(1)
    masks = random_masks(torch.rand(20, 1, 24, 24), "rectangles", 0.1, 1)[:, 0].bool()
    for mask in masks:
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # the hidden pixels fill their bounding box: one rectangle


# -- rectangles -----------------------------------------------------------------------------------


def test_rectangle_centres_are_uniform_and_sizes_vary_by_2x_at_aspect_ratios_within_1_to_2():
    torch.manual_seed(2)
    centres, half = _random_rectangles(4000, 3, CPU, None)
    assert centres.shape == half.shape == (4000, 3, 2)
    assert centres.min() >= 0 and centres.max() < 1
    assert centres.mean().item() == pytest.approx(0.5, abs=0.01)
    assert centres.var().item() == pytest.approx(1 / 12, abs=0.003)
    scale = (half[..., 0] * half[..., 1]).sqrt()
    aspect = half[..., 0] / half[..., 1]
    assert scale.min() >= 0.5 - 1e-6 and scale.max() <= 1 + 1e-6
    assert scale.min() < 0.51 and scale.max() > 0.99  # the whole 2x range is used
    assert aspect.min() >= 0.5 - 1e-6 and aspect.max() <= 2 + 1e-6
    assert aspect.min() < 0.52 and aspect.max() > 1.95
    # log-uniform aspect: as many tall rectangles as wide ones, half of them within 1:sqrt2
    assert (aspect > 1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert ((aspect.log().abs() < math.log(2) / 2).float().mean().item()) == pytest.approx(0.5, abs=0.02)


def test_rectangle_centres_follow_the_weights_when_given():
    weights = torch.zeros(1, 4, 4)
    weights[0, 3, 1] = 1.0
    centres, _ = _random_rectangles(1, 200, CPU, weights)
    assert (centres[..., 0] >= 0.75).all() and (centres[..., 1] < 0.5).all() and (centres[..., 1] >= 0.25).all()


def test_the_field_thresholded_at_t_is_the_union_of_the_used_rectangles_scaled_by_t():
    """Brute force, pixel by pixel: a pixel (centre ((i + .5) / H, (j + .5) / W)) is within
    level t of a used region iff it lies in that region's rectangle of half-sizes t * half."""
    torch.manual_seed(3)
    height, width = 9, 13
    centres, half = _random_rectangles(2, 3, CPU, None)
    used = torch.tensor([[True, True, False], [True, False, False]])
    field = _field_of_rectangles(centres, half, used, height, width)
    assert field.shape == (2, height, width)
    for t in (0.05, 0.2, 0.6):
        for b in range(2):
            for i in range(height):
                for j in range(width):
                    y, x = (i + 0.5) / height, (j + 0.5) / width
                    inside = any(
                        abs(y - centres[b, r, 0]) <= t * half[b, r, 0] and abs(x - centres[b, r, 1]) <= t * half[b, r, 1]
                        for r in range(3)
                        if used[b, r]
                    )
                    assert bool(field[b, i, j] <= t) == inside, (t, b, i, j)


def test_unused_regions_hide_nothing():
    centres = torch.tensor([[[0.5, 0.5], [0.1, 0.1]]])
    half = torch.ones(1, 2, 2)
    only_first = _field_of_rectangles(centres, half, torch.tensor([[True, False]]), 8, 8)
    alone = _field_of_rectangles(centres[:, :1], half[:, :1], torch.tensor([[True]]), 8, 8)
    assert torch.equal(only_first, alone)
    assert torch.isinf(_field_of_rectangles(centres, half, torch.tensor([[False, False]]), 8, 8)).all()


# -- strokes --------------------------------------------------------------------------------------


def test_bounce_reflects_points_that_walked_out_and_leaves_the_others():
    extent = torch.tensor([1.0, 0.5])
    points = torch.tensor([[0.3, 0.2], [-0.1, 0.6], [1.2, -0.05], [1.0, 0.5], [0.0, 0.0]])
    expected = torch.tensor([[0.3, 0.2], [0.1, 0.4], [0.8, 0.05], [1.0, 0.5], [0.0, 0.0]])
    torch.testing.assert_close(_bounce(points, extent), expected)
    far = _bounce(torch.tensor([[5.0, -3.0]]), extent)  # further than one reflection: clamped inside
    assert (far >= 0).all() and (far <= extent).all()


def test_strokes_stay_inside_the_image_and_start_anywhere_in_it():
    torch.manual_seed(4)
    extent = torch.tensor([0.5, 1.0])  # an image twice as wide as tall
    paths = _stroke_paths(3000, extent)
    assert paths.shape == (3000, STROKE_SEGMENTS + 1, 2)
    assert (paths >= 0).all() and (paths <= extent).all()
    start = paths[:, 0]
    assert start[:, 0].max() > 0.49 and start[:, 1].max() > 0.99 and start.min() < 0.01


def test_strokes_are_walks_of_steps_of_10_to_30_percent_turning_at_most_90_degrees():
    """On a large extent, a segment whose end is further than a step (0.3) from every edge was not
    bounced: those are the walk as drawn."""
    torch.manual_seed(5)
    extent = torch.tensor([10.0, 10.0])
    paths = _stroke_paths(3000, extent)
    steps = paths[:, 1:] - paths[:, :-1]
    length = steps.norm(dim=-1)
    ends = paths[:, 1:]
    drawn = ((ends > 0.3) & (ends < extent - 0.3)).all(-1)
    assert drawn.float().mean() > 0.8
    assert length.max() <= 0.3 + 1e-5
    assert length[drawn].min() >= 0.1 - 1e-5 and length[drawn].min() < 0.101 and length[drawn].max() > 0.299
    assert length[drawn].mean().item() == pytest.approx(0.2, abs=0.005)  # uniform in 0.1-0.3
    both = drawn[:, 1:] & drawn[:, :-1]
    cos = (steps[:, 1:] * steps[:, :-1]).sum(-1) / (length[:, 1:] * length[:, :-1])
    assert cos[both].min() >= -1e-4 and cos[both].min() < 0.01  # up to 90 degrees, and all of it
    assert (cos[both] > 0.999).any()  # and nearly straight on
    # Turns are symmetric: as many to the left as to the right, by as much.
    cross = steps[:, 1:, 0] * steps[:, :-1, 1] - steps[:, 1:, 1] * steps[:, :-1, 0]
    signed = torch.atan2(cross, (steps[:, 1:] * steps[:, :-1]).sum(-1))[both]
    assert signed.mean().abs().item() < 0.03
    assert signed.max().item() > 1.5 and signed.min().item() < -1.5
    first = steps[:, 0][drawn[:, 0]]
    angles = torch.atan2(first[:, 0], first[:, 1])  # the first direction is uniform on the circle
    counts = torch.histc(angles, bins=8, min=-math.pi, max=math.pi)
    assert counts.min() > 0.1 * len(angles) and counts.max() < 0.15 * len(angles)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (16, 32), (40, 20)])
def test_each_stroke_is_as_thick_as_its_own_draw_from_half_to_one(height, width):
    """The field is each stroke's distance divided by its thickness: where one stroke is much the
    nearest, field = distance / thickness with one thickness per stroke, 0.5 to 1. Distances are
    isotropic: in units of the longer side, at the pixel centres."""
    batch, regions = 150, 2
    torch.manual_seed(6)
    field = _stroke_field(batch, height, width, regions, CPU)
    torch.manual_seed(6)  # the walks are the field's first draws
    side = max(height, width)
    extent = torch.tensor([height / side, width / side])
    paths = _stroke_paths(batch * regions, extent).view(batch, regions, -1, 2)
    assert (paths <= extent).all()
    y = (torch.arange(height) + 0.5) / side
    x = (torch.arange(width) + 0.5) / side
    points = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).view(-1, 2)
    distance = _distance_to_paths(points, paths)  # (B, R, points)
    flat = field.view(batch, -1)
    thicknesses = []
    for b in range(batch):
        for r in range(regions):
            other = distance[b, 1 - r]
            nearest = distance[b, r] * 4 < other  # nearest whatever the two thicknesses
            if torch.isinf(flat[b]).any() or nearest.sum() < 20:
                continue
            ratio = distance[b, r][nearest] / flat[b][nearest]
            ratio = ratio[distance[b, r][nearest] > 1e-3]
            if len(ratio) == 0 or not torch.isclose(ratio, ratio.median(), rtol=1e-4).all():
                continue  # the other stroke is unused here, so this one is alone: checked below
            thicknesses.append(ratio.median().item())
    thicknesses = torch.tensor(thicknesses)
    assert len(thicknesses) > 80
    assert thicknesses.min() >= 0.5 - 1e-4 and thicknesses.max() <= 1 + 1e-4
    assert thicknesses.min() < 0.52 and thicknesses.max() > 0.98


def test_distance_to_a_path_is_the_distance_to_its_nearest_segment_point():
    generator = torch.Generator().manual_seed(5)
    paths = torch.rand(2, 3, 4, 2, generator=generator)  # 2 x 3 paths of 3 segments
    paths[1, 2, 2] = paths[1, 2, 1]  # a segment of length zero is its point
    points = torch.rand(50, 2, generator=generator)
    distance = _distance_to_paths(points, paths)
    assert distance.shape == (2, 3, 50)
    along = torch.linspace(0, 1, 2001)[:, None]
    for b in range(2):
        for r in range(3):
            path = paths[b, r]
            dense = torch.cat([path[s] + along * (path[s + 1] - path[s]) for s in range(3)])
            brute = (points.double()[:, None] - dense.double()[None]).norm(dim=-1).min(dim=1).values.float()
            torch.testing.assert_close(distance[b, r], brute, atol=1e-3, rtol=0)
            assert (distance[b, r] <= brute + 1e-5).all()  # exact: never further than a sample


def test_the_stroke_field_is_zero_on_the_stroke_and_grows_away_from_it():
    torch.manual_seed(6)
    field = _stroke_field(4, 40, 40, 1, CPU)
    assert field.shape == (4, 40, 40) and torch.isfinite(field).all() and (field >= 0).all()
    for sample in field:  # a thin stroke on a 40-pixel grid: some pixel centre lies within a pixel of it
        assert sample.min() < 1 / 40 and sample.max() > 0.2


def test_the_stroke_field_of_a_large_image_is_the_coarse_grid_s_upsampled_bilinearly():
    """Same draws, same strokes: a 4x larger image gets the 64-grid field, upsampled (pixel
    centres aligned, not corners), so the cost does not grow with the image."""
    torch.manual_seed(7)
    small = _stroke_field(2, STROKE_GRID, STROKE_GRID, 2, CPU)
    torch.manual_seed(7)
    large = _stroke_field(2, 4 * STROKE_GRID, 4 * STROKE_GRID, 2, CPU)
    upsampled = torch.nn.functional.interpolate(small[:, None], scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(large, upsampled[:, 0])


# -- the lungs ------------------------------------------------------------------------------------


def test_the_lung_prior_is_two_mirrored_ellipses_inside_the_image_in_its_outer_thirds():
    (left_x, left_y, left_ax, left_ay), (right_x, right_y, right_ax, right_ay) = LUNG_ELLIPSES
    assert (left_y, left_ax, left_ay) == (right_y, right_ax, right_ay)
    assert left_x == pytest.approx(1 - right_x)
    for cx, cy, ax, ay in LUNG_ELLIPSES:
        assert 0 < cx - ax and cx + ax < 1 and 0 < cy - ay and cy + ay < 1  # inside the image
        assert cy - ay == pytest.approx(0.15, abs=0.01) and cy + ay == pytest.approx(0.80, abs=0.01)
    assert left_x + left_ax < 0.5 < right_x - right_ax  # apart: the mediastinum between them
    assert left_x < 1 / 3 < 2 / 3 < right_x  # centred in the outer thirds
    assert _ellipses(64).float().mean().item() == pytest.approx(0.35, abs=0.02)  # the share the lungs test uses


def _ellipses(grid: int) -> torch.Tensor:
    centre = (torch.arange(grid) + 0.5) / grid
    y, x = centre[:, None], centre[None, :]
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    for cx, cy, ax, ay in LUNG_ELLIPSES:
        inside |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1
    return inside


def test_lung_weights_are_zero_outside_one_on_bright_lung_and_the_boost_on_dark_lung():
    """Dark means darker than the image's mean INSIDE the ellipses, not over the whole image."""
    size = 32
    inside = _ellipses(size)
    image = torch.full((size, size), 0.05)  # dark air outside pulls the whole-image mean down
    left = torch.zeros(size, size, dtype=torch.bool)
    left[:, : size // 2] = True
    image[inside & left] = 0.4  # darker than the ellipses' mean (0.55)...
    image[inside & ~left] = 0.7  # ...but brighter than the whole image's
    weights = lung_field_weights(image.expand(2, 1, size, size))
    assert weights.shape == (2, size, size)
    assert (weights[:, ~inside] == 0).all()
    assert (weights[:, inside & left] == LUNG_DARK_BOOST).all()
    assert (weights[:, inside & ~left] == 1.0).all()


def test_a_flat_image_falls_back_to_the_ellipses_alone():
    weights = lung_field_weights(torch.full((1, 1, 16, 16), 0.25))  # the mean is exactly 0.25: not darker
    assert torch.equal(weights[0], _ellipses(16).float())


def test_large_images_are_weighed_on_the_coarse_grid_and_channels_are_averaged():
    size = 2 * LUNG_GRID
    image = torch.rand(1, 3, size, size)
    weights = lung_field_weights(image)
    assert weights.shape == (1, LUNG_GRID, LUNG_GRID)
    grey = torch.nn.functional.avg_pool2d(image.mean(dim=1, keepdim=True), 2)
    torch.testing.assert_close(weights, lung_field_weights(grey))


def test_centres_land_in_weighted_cells_in_proportion_and_uniformly_within_them():
    weights = torch.zeros(2, 4, 5)
    weights[:, 1, 2] = 1.0
    weights[:, 3, 4] = 3.0
    torch.manual_seed(9)
    centres = _sample_centres(weights, 4000)
    assert centres.shape == (2, 4000, 2)
    row, col = (centres[..., 0] * 4).floor(), (centres[..., 1] * 5).floor()
    in_first = (row == 1) & (col == 2)
    in_second = (row == 3) & (col == 4)
    assert (in_first | in_second).all()
    assert in_second.float().mean().item() == pytest.approx(0.75, abs=0.03)
    within = torch.stack([centres[..., 0] * 4 - row, centres[..., 1] * 5 - col], dim=-1)
    assert within.mean().item() == pytest.approx(0.5, abs=0.02)
    assert within.min() < 0.01 and within.max() > 0.99  # the whole cell
    assert abs(torch.corrcoef(within.view(-1, 2).T)[0, 1].item()) < 0.05  # y and x drawn apart
