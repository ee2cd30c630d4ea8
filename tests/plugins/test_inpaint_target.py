"""The inpainting objective's promise: the encoder sees the masked image, and the reconstruction is
scored against the ORIGINAL image in the hidden pixels (never against the masked input, whose
hidden pixels hold only the fill value). Issue 23: a mutant scoring against the masked input
passed the 45 tests of test_inpaint.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from corex_inpaint import Inpainting, masked_reconstruction_loss, random_masks

SIZE = 16


class Encoder(nn.Module):
    arch = "tiny"

    def __init__(self):
        super().__init__()
        self.in_channels = 1
        self.channels, self.strides = (4, 8), (2, 4)
        self.levels = nn.ModuleList([nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)])

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def objective(**options) -> Inpainting:
    encoder = Encoder()
    return Inpainting(encoder=encoder, channels=encoder.channels, strides=encoder.strides, **options)


def images(count: int = 3) -> Tensor:
    """Bright, varied images (values in [0.55, 0.95]): no hidden pixel equals any fill value."""
    generator = torch.Generator().manual_seed(5)
    return 0.55 + 0.4 * torch.rand(count, 1, SIZE, SIZE, generator=generator)


def run(model: Inpainting, image: Tensor, reconstruction=None, seed: int = 3) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The objective's outputs, with ``reconstruction(masked)`` in place of the network; returns
    the outputs, the masked image the network was given, and the pixels hidden."""
    seen: list[Tensor] = []
    network = model.reconstruct

    def spy(masked: Tensor) -> Tensor:
        seen.append(masked.detach().clone())
        return reconstruction(masked) if reconstruction is not None else network(masked)

    model.reconstruct = spy
    torch.manual_seed(seed)
    hidden = random_masks(image, model.policy, model.coverage, model.max_regions)
    torch.manual_seed(seed)
    out = model({"image": image}, lambda batch: batch)
    assert len(seen) == 1
    return out, seen[0], hidden


@pytest.mark.parametrize("fill", ["zero", "mean", "noise"])
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_a_perfect_reconstruction_of_the_original_image_costs_nothing(fill, loss):
    image = images()
    out, masked, hidden = run(objective(fill=fill, loss=loss, visible_weight=0.5), image, lambda masked: image)
    assert hidden.sum() > 0 and not torch.equal(masked, image)  # the network really was given less than the image
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["loss_hidden"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["loss_visible"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("fill", ["zero", "mean", "noise"])
def test_copying_the_masked_input_is_charged_the_hidden_content(fill):
    """A network that returns what it was given is wrong by |original - fill| in every hidden pixel."""
    image = images()
    out, masked, hidden = run(objective(fill=fill, loss="l1"), image, lambda masked: masked)
    hidden_pixels = hidden.bool()
    expected = (image - masked).abs()[hidden_pixels].mean().item()
    assert expected > 0.1
    assert out["loss_hidden"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)  # visible_weight 0: the hidden pixels alone
    assert out["loss_visible"].item() == pytest.approx(0.0, abs=1e-7)  # the visible pixels were given as they are


@pytest.mark.parametrize("visible_weight", [0.0, 0.25])
def test_the_loss_is_the_masked_loss_against_the_original_image(visible_weight):
    image = images(4)
    model = objective(loss="l2", visible_weight=visible_weight)
    out, masked, hidden = run(model, image)
    assert torch.equal(masked, torch.where(hidden.bool(), torch.zeros_like(image), image))
    with torch.no_grad():  # the network's own reconstruction of what it was given
        recomputed = torch.sigmoid(model.decoder(model.encoder(masked)))
    loss, loss_hidden, loss_visible = masked_reconstruction_loss(recomputed, image, hidden, "l2", visible_weight)
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert out["loss_hidden"].item() == pytest.approx(loss_hidden.item(), rel=1e-5)
    assert out["loss_visible"].item() == pytest.approx(loss_visible.item(), rel=1e-5)
    assert out["coverage"].item() == pytest.approx(hidden.mean().item())


# -- the edges of the loss, the options and the preview (survivors of mutation testing) -------------


def test_a_single_hidden_or_visible_pixel_is_averaged_over_itself():
    target = torch.zeros(1, 1, 4, 4)
    reconstruction = torch.full((1, 1, 4, 4), 0.5)
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 1, 2] = 1
    loss, loss_hidden, loss_visible = masked_reconstruction_loss(reconstruction, target, one, "l1")
    assert loss_hidden.item() == pytest.approx(0.5) and loss_visible.item() == pytest.approx(0.5)
    _, _, loss_visible = masked_reconstruction_loss(reconstruction, target, 1 - one, "l1")
    assert loss_visible.item() == pytest.approx(0.5)
    # Nothing hidden: no error (not a division by zero).
    assert masked_reconstruction_loss(reconstruction, target, torch.zeros_like(one), "l1")[1].item() == 0.0


def test_the_reconstruction_is_one_grey_channel_like_the_input_and_a_width_of_one_is_allowed():
    model = objective(decoder_width=1)
    image = images(2)
    assert model.reconstruct(image).shape == image.shape
    with pytest.raises(ValueError, match="decoder_width must be at least 1, got 0"):
        objective(decoder_width=0)


def test_the_preview_grid_draws_every_sample_on_the_unit_scale(tmp_path):
    import numpy as np
    from PIL import Image

    from corex_inpaint.objective import _save_grid

    grey = torch.full((1, 1, 8, 8), 0.5)
    path = _save_grid({"input": grey, "other": torch.ones(1, 1, 8, 8)}, tmp_path / "grid.png")  # one row: axes stay 2-d
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("L"), dtype=float)
    height, width = pixels.shape
    assert abs(pixels[height // 2 + 10, width // 4] - 128) < 12  # 0.5 drawn mid-grey: the unit scale, no stretch
    assert pixels[height // 2 + 10, 3 * width // 4] > 240  # 1.0 drawn white
    model = objective()
    written = model.on_epoch_end(epoch=3, batch={"image": images(1)}, out_dir=tmp_path)
    assert written.name == "inpaint_epoch003.png" and written.exists()


def test_the_mean_fill_of_an_image_with_one_visible_pixel_is_that_pixel():
    model = objective(fill="mean")
    image = images(1)
    hidden = torch.ones_like(image)
    hidden[0, 0, 3, 4] = 0
    masked = model.hide(image, hidden)
    assert torch.allclose(masked, torch.full_like(image, image[0, 0, 3, 4].item()))
