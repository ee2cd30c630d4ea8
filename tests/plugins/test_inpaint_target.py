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
