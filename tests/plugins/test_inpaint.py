"""corex_inpaint: masking policies, the masked loss, what the encoder sees, training, previews."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import corex_inpaint
from corex.testing import assert_mirrors
from corex_inpaint import Inpainting, lung_field_weights, masked_reconstruction_loss, random_masks
from corex_inpaint.masks import LUNG_ELLIPSES

SIZE = 32
POLICIES = ("rectangles", "strokes", "lungs")


class TinyEncoder(nn.Module):
    """A three-level pyramid (strides 2, 4, 8) of conv-BN-ReLU, recording its last input."""

    arch = "tiny"

    def __init__(self, width: int = 4):
        super().__init__()
        self.in_channels = 1
        self.channels = (width, 2 * width, 4 * width)
        self.strides = (2, 4, 8)
        ins = (1, width, 2 * width)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())
            for i, o in zip(ins, self.channels)
        )
        self.last_input: Tensor | None = None

    def forward(self, x: Tensor) -> list[Tensor]:
        self.last_input = x.detach().clone()
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def make_objective(**options) -> Inpainting:
    encoder = TinyEncoder()
    return Inpainting(encoder=encoder, channels=encoder.channels, strides=encoder.strides, **options)


def identity(batch: dict) -> dict:
    return batch


def smooth_images(count: int, size: int = SIZE, seed: int = 0) -> Tensor:
    """Low-frequency patterns in [0, 1]: easy to inpaint from context, so a few steps help."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq = torch.rand(count, 2, generator=generator) * 2 + 0.5
    phase = torch.rand(count, 2, generator=generator) * 2 * math.pi
    waves = torch.sin(2 * math.pi * freq[:, :1, None] * y + phase[:, :1, None]) + torch.cos(
        2 * math.pi * freq[:, 1:, None] * x + phase[:, 1:, None]
    )
    return (0.5 + 0.25 * waves).unsqueeze(1)


def phantom(count: int, size: int = SIZE) -> Tensor:
    """Bright thorax with two dark lungs inside the prior's ellipses, on dark air."""
    y, x = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    image = 0.1 + 0.7 * ((((x - 0.5) / 0.48) ** 2 + ((y - 0.5) / 0.5) ** 2) < 1).float()
    for cx in (0.3, 0.7):
        image = image - 0.45 * ((((x - cx) / 0.12) ** 2 + ((y - 0.45) / 0.25) ** 2) < 1).float()
    return image.clamp(0, 1).expand(count, 1, size, size).clone()


def in_ellipses(size: int) -> Tensor:
    y, x = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    inside = torch.zeros(size, size, dtype=torch.bool)
    for cx, cy, ax, ay in LUNG_ELLIPSES:
        inside |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1
    return inside


# -- the loss -------------------------------------------------------------------------------------


def hand_made(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    reconstruction = torch.rand(2, 1, 8, 8, generator=generator)
    target = torch.rand(2, 1, 8, 8, generator=generator)
    hidden = torch.zeros(2, 1, 8, 8)
    hidden[:, :, 2:6, 1:5] = 1
    return reconstruction, target, hidden


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_sees_only_hidden_pixels_when_visible_weight_is_zero(kind):
    reconstruction, target, hidden = hand_made()
    loss, loss_hidden, _ = masked_reconstruction_loss(reconstruction, target, hidden, kind)
    error = (reconstruction - target).abs() if kind == "l1" else (reconstruction - target) ** 2
    assert loss.item() == pytest.approx(error[hidden.bool()].mean().item())
    assert loss.item() == pytest.approx(loss_hidden.item())

    visible = 1 - hidden
    for changed in (
        masked_reconstruction_loss(reconstruction, target + 0.7 * visible, hidden, kind)[0],
        masked_reconstruction_loss(reconstruction - 0.7 * visible, target, hidden, kind)[0],
    ):
        assert changed.item() == pytest.approx(loss.item(), abs=1e-7)

    one_hidden_pixel = torch.zeros_like(hidden)
    one_hidden_pixel[1, 0, 3, 2] = 1
    changed = masked_reconstruction_loss(reconstruction, target + 0.7 * one_hidden_pixel, hidden, kind)[0]
    assert changed.item() != pytest.approx(loss.item(), abs=1e-4)


def test_visible_weight_adds_the_visible_error():
    reconstruction, target, hidden = hand_made()
    visible = 1 - hidden
    loss, loss_hidden, loss_visible = masked_reconstruction_loss(reconstruction, target, hidden, "l1", 0.5)
    assert loss_visible.item() == pytest.approx((reconstruction - target).abs()[visible.bool()].mean().item())
    assert loss.item() == pytest.approx(loss_hidden.item() + 0.5 * loss_visible.item())
    changed = masked_reconstruction_loss(reconstruction, target + 0.7 * visible, hidden, "l1", 0.5)[0]
    assert changed.item() > loss.item() + 1e-3


@pytest.mark.parametrize("visible_weight", [0.0, 0.5])
def test_module_loss_uses_visible_pixels_only_when_weighted(visible_weight):
    """The module's masks come from the global RNG: under a seed we know which pixels it hides,
    so we can swap in reconstructions that differ only at visible or only at hidden pixels."""
    objective = make_objective(visible_weight=visible_weight)
    image = smooth_images(4)
    torch.manual_seed(7)
    hidden = random_masks(image, "rectangles", 0.25, 4)
    base = torch.rand_like(image)

    def loss_with(reconstruction: Tensor) -> float:
        objective.reconstruct = lambda masked: reconstruction
        torch.manual_seed(7)
        return objective({"image": image}, identity)["loss"].item()

    reference = loss_with(base)
    visible_changed = loss_with(base + 0.4 * (1 - hidden))
    hidden_changed = loss_with(base + 0.4 * hidden)
    assert hidden_changed != pytest.approx(reference, abs=1e-4)
    if visible_weight == 0:
        assert visible_changed == pytest.approx(reference, abs=1e-7)
    else:
        assert visible_changed != pytest.approx(reference, abs=1e-4)


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("coverage", [0.1, 0.25, 0.6])
def test_each_policy_hides_the_target_fraction(policy, coverage):
    """Every policy thresholds a distance field at the coverage quantile, so it is exact up to one
    pixel of rounding plus ties along rectangle edges (a tied edge is at most 32 pixels = 3% of a
    32x32 image; edges of different regions rarely tie together). Allow -1 pixel / +4%."""
    torch.manual_seed(0)
    masks = random_masks(phantom(16), policy, coverage, 4)
    per_sample = masks.mean(dim=(1, 2, 3))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert per_sample.min().item() >= coverage - 1 / SIZE**2
    assert per_sample.max().item() <= coverage + 0.04
    assert per_sample.mean().item() == pytest.approx(coverage, abs=0.015)


@pytest.mark.parametrize("policy", POLICIES)
def test_masks_differ_across_the_batch_and_repeat_under_a_seed(policy):
    images = phantom(8)
    torch.manual_seed(3)
    first = random_masks(images, policy, 0.25, 4)
    torch.manual_seed(3)
    again = random_masks(images, policy, 0.25, 4)
    other = random_masks(images, policy, 0.25, 4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    flat = first.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_lungs_policy_prefers_the_lung_fields():
    images = phantom(64)
    inside = in_ellipses(SIZE)
    weights = lung_field_weights(images)
    assert weights.shape == (64, SIZE, SIZE)
    assert (weights[:, ~inside] == 0).all()
    dark = images[0, 0] < 0.5
    assert weights[0][inside & dark].min() > weights[0][inside & ~dark].max()

    def share_inside(policy: str) -> float:
        torch.manual_seed(0)
        masks = random_masks(images, policy, 0.1, 2)[:, 0]
        return (masks[:, inside].sum() / masks.sum()).item()

    # The ellipses cover ~35% of the image: uniform rectangles put about that share inside.
    assert share_inside("lungs") > share_inside("rectangles") + 0.2


def test_masks_accept_double_precision_images():
    masks = random_masks(phantom(2).double(), "strokes", 0.25, 3)
    assert masks.device == torch.device("cpu") and masks.shape == (2, 1, SIZE, SIZE)


# -- what the encoder sees ------------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["zero", "mean", "noise"])
def test_encoder_cannot_see_the_hidden_pixels(fill):
    objective = make_objective(fill=fill)
    image = smooth_images(4)
    torch.manual_seed(11)
    hidden = random_masks(image, "rectangles", 0.25, 4).bool()

    torch.manual_seed(11)
    out = objective({"image": image}, identity)
    seen = objective.encoder.last_input
    assert out["coverage"].item() == pytest.approx(hidden.float().mean().item())
    assert torch.equal(seen[~hidden], image[~hidden])
    if fill == "zero":
        assert (seen[hidden] == 0).all()
    elif fill == "mean":
        visible_mean = (image * ~hidden).sum((1, 2, 3)) / (~hidden).sum((1, 2, 3))
        expected = visible_mean[:, None, None, None].expand_as(image)[hidden]
        assert torch.allclose(seen[hidden], expected)
    else:
        assert seen[hidden].min() >= 0 and seen[hidden].max() <= 1 and seen[hidden].std() > 0.2

    # The strongest check: change the image only where it is hidden; the encoder input is the same.
    altered = torch.where(hidden, 1 - image, image)
    torch.manual_seed(11)
    objective({"image": altered}, identity)
    assert torch.equal(objective.encoder.last_input, seen)


def test_augment_runs_before_masking():
    objective = make_objective(fill="zero")
    flipped = []

    def flip(batch: dict) -> dict:
        flipped.append(True)
        return {**batch, "image": batch["image"].flip(-1)}

    image = smooth_images(2)
    torch.manual_seed(0)
    objective({"image": image}, flip)
    seen = objective.encoder.last_input
    assert flipped == [True]
    visible = seen != 0
    assert torch.equal(seen[visible], image.flip(-1)[visible])


# -- training -------------------------------------------------------------------------------------


def test_gradients_reach_the_encoder_and_training_reduces_the_loss():
    torch.manual_seed(0)
    objective = make_objective(decoder_width=8)
    images = smooth_images(8)
    batch = {"image": images}

    def fixed_mask_loss() -> float:
        torch.manual_seed(1234)
        with torch.no_grad():
            return objective(batch, identity)["loss"].item()

    out = objective(batch, identity)
    out["loss"].backward()
    grads = [p.grad for p in objective.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert set(out) == {"loss", "loss_hidden", "loss_visible", "coverage"}

    before = fixed_mask_loss()
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        objective(batch, identity)["loss"].backward()
        optimizer.step()
    after = fixed_mask_loss()
    assert after < 0.6 * before, (before, after)


# -- previews -------------------------------------------------------------------------------------


def test_on_epoch_end_writes_a_png_and_leaves_the_rng_alone(tmp_path):
    from PIL import Image

    objective = make_objective(policy="strokes", fill="noise")
    batch = {"image": smooth_images(6)}
    objective.train()
    running_mean = objective.encoder.levels[0][1].running_mean.clone()

    torch.manual_seed(5)
    state = torch.get_rng_state()
    path = objective.on_epoch_end(epoch=3, batch=batch, out_dir=tmp_path / "pretrain")
    assert torch.equal(torch.get_rng_state(), state)
    assert path == tmp_path / "pretrain" / "inpaint_epoch003.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["inpaint_epoch003.png"]  # no temp left
    with Image.open(path) as png:
        assert png.size[0] == png.size[1]  # 4 columns by 4 rows: 6 samples given, 4 shown
    two = objective.on_epoch_end(epoch=9, batch={"image": batch["image"][:2]}, out_dir=tmp_path)
    with Image.open(two) as png:
        assert png.size[0] == 2 * png.size[1]  # 4 columns by 2 rows

    # Fixed preview masks: the same model gives the same grid at every epoch.
    objective.on_epoch_end(epoch=4, batch=batch, out_dir=tmp_path / "pretrain")
    assert (tmp_path / "pretrain" / "inpaint_epoch004.png").read_bytes() == path.read_bytes()
    # Eval mode during the preview: batch-norm statistics untouched, training mode restored.
    assert torch.equal(objective.encoder.levels[0][1].running_mean, running_mean)
    assert objective.training and objective.encoder.training


# -- options and registration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"coverage": 0.0}, "coverage"),
        ({"coverage": 1.0}, "coverage"),
        ({"coverage": -0.2}, "coverage"),
        ({"max_regions": 0}, "max_regions"),
        ({"visible_weight": -1.0}, "visible_weight"),
        ({"decoder_width": 0}, "decoder_width"),
        ({"policy": "circles"}, "policy"),
        ({"fill": "blur"}, "fill"),
        ({"loss": "l3"}, "loss"),
    ],
)
def test_bad_options_raise_a_specific_value_error(options, named):
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match=rf"{named}.*{value!r}" if isinstance(value, str) else named):
        make_objective(**options)


def test_plugin_registers_the_objective():
    assert corex_inpaint.corex_objectives() == {"inpaint": corex_inpaint.inpaint_objective}
    encoder = TinyEncoder()
    options = {"policy": "lungs", "coverage": 0.4, "max_regions": 2, "fill": "noise", "loss": "l2", "visible_weight": 0.3,
               "decoder_width": 6}
    built = corex_inpaint.inpaint_objective(encoder=encoder, channels=encoder.channels, strides=encoder.strides, **options)
    assert isinstance(built, Inpainting) and built.encoder is encoder
    assert (built.policy, built.coverage, built.max_regions, built.fill, built.loss_kind, built.visible_weight) == (
        "lungs", 0.4, 2, "noise", "l2", 0.3)
    assert repr(built.decoder) == repr(make_objective(decoder_width=6).decoder)


def test_the_light_factory_has_the_objectives_options():
    assert_mirrors(corex_inpaint.inpaint_objective, Inpainting)


