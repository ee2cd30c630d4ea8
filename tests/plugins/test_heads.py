"""corex_heads: classification and segmentation heads on a real tiny pyramid, and their losses."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import corex_heads
from corex.interfaces import Head
from corex.testing import assert_mirrors
from corex_encoders import resnet18
from corex_heads import ClassificationHead, SegmentationHead, UNetDecoder, soft_dice_loss


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return resnet18(width=8)


def batch(labels, masks=None, has_mask=None):
    labels = torch.tensor(labels)
    n = len(labels)
    return {
        "label": labels,
        "mask": torch.zeros(n, 1, 64, 64) if masks is None else masks,
        "has_mask": torch.ones(n, dtype=torch.bool) if has_mask is None else torch.tensor(has_mask),
    }


def test_hook_registers_both_heads():
    factories = corex_heads.corex_heads()
    assert factories == {"classification": corex_heads.classification_head, "segmentation": corex_heads.segmentation_head}
    classify = factories["classification"](channels=(8,), num_classes=3, dropout=0.25, class_weights=[1.0, 2.0, 3.0],
                                           label_smoothing=0.1, feature_norm=True)
    assert isinstance(classify, ClassificationHead) and isinstance(classify, Head)
    assert (classify.num_classes, classify.dropout.p, classify.label_smoothing) == (3, 0.25, 0.1)
    assert classify.class_weights.tolist() == [1.0, 2.0, 3.0] and isinstance(classify.norm, torch.nn.BatchNorm1d)
    segment = factories["segmentation"](channels=(8, 16), strides=(2, 4), decoder_width=6, dice_weight=0.5,
                                        bce_weight=2.0, pos_weight=3.0)
    assert isinstance(segment, SegmentationHead) and isinstance(segment, Head)
    assert (segment.dice_weight, segment.bce_weight, segment.pos_weight.tolist()) == (0.5, 2.0, [3.0])
    assert repr(segment.decoder) == repr(UNetDecoder((8, 16), (2, 4), out_channels=1, width=6))


@pytest.mark.parametrize(("factory", "implementation"), [("classification_head", ClassificationHead),
                                                         ("segmentation_head", SegmentationHead)])
def test_each_light_factory_has_its_heads_options(factory, implementation):
    assert_mirrors(getattr(corex_heads, factory), implementation)


def test_heads_on_a_real_pyramid(encoder):
    pyramid = encoder(torch.rand(3, 1, 64, 64))
    classify = ClassificationHead(channels=encoder.channels, num_classes=4, dropout=0.2)
    segment = SegmentationHead(channels=encoder.channels, strides=encoder.strides)
    assert isinstance(classify, Head) and classify.task == "classification"
    assert isinstance(segment, Head) and segment.task == "segmentation"
    assert classify(pyramid).shape == (3, 4)
    assert segment(pyramid).shape == (3, 1, 64, 64)


@pytest.mark.parametrize("strides", [(1, 2, 4), (2, 4, 8), (4, 8, 16)])
def test_unet_decoder_returns_input_resolution(strides):
    channels = (4, 8, 16)
    pyramid = [torch.rand(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    decoder = UNetDecoder(channels, strides, out_channels=3, width=5)
    assert decoder(pyramid).shape == (2, 3, 64, 64)
    # Level i has width * 2**i channels.
    assert [block.conv2[0].out_channels for block in decoder.blocks] == [5, 10]


def test_cross_entropy_matches_torch_and_ignores_unlabelled():
    head = ClassificationHead(channels=(8,), num_classes=4)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 1.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert head.loss(logits, batch([0, 3, 2, 1])).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 3, 2, 1])).item()
    )
    partly = head.loss(logits, batch([0, -1, 2, -1]))
    assert partly.item() == pytest.approx(F.cross_entropy(logits[[0, 2]], torch.tensor([0, 2])).item())


def test_class_weights_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    labels = [0, 3]  # right, wrong
    per_sample = F.cross_entropy(logits, torch.tensor(labels), reduction="none")
    plain = ClassificationHead(channels=(8,), num_classes=4).loss(logits, batch(labels))
    weighted = ClassificationHead(channels=(8,), num_classes=4, class_weights=[1.0, 1.0, 1.0, 9.0])
    # Weighted mean: (1 * ce_0 + 9 * ce_1) / (1 + 9), so the wrong, rare-class sample dominates.
    expected = (per_sample[0] + 9 * per_sample[1]) / 10
    assert weighted.loss(logits, batch(labels)).item() == pytest.approx(expected.item())
    assert weighted.loss(logits, batch(labels)).item() > plain.item()

    smoothed = ClassificationHead(channels=(8,), num_classes=4, label_smoothing=0.1).loss(logits, batch(labels))
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1).item())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"class_weights": [1.0, 2.0]}, r"class_weights has 2 entries \[1.0, 2.0\], but there are 4 classes"),
        ({"class_weights": [1.0, 0.0, 1.0, 1.0]}, "class_weights must all be positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"label_smoothing": -0.1}, "label_smoothing must be in"),
    ],
)
def test_classification_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ClassificationHead(channels=(8,), num_classes=4, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decoder_width": 0}, "decoder_width must be at least 1, got 0"),
        ({"pos_weight": 0.0}, "pos_weight must be positive, got 0.0"),
        ({"dice_weight": 0.0, "bce_weight": 0.0}, "both 0"),
        ({"dice_weight": -1.0}, "must be non-negative"),
    ],
)
def test_segmentation_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        SegmentationHead(channels=(8, 16), strides=(2, 4), **options)


def square_mask(n: int = 1, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(n, 1, size, size)
    mask[..., 16:40, 20:44] = 1
    return mask


def test_soft_dice_extremes():
    mask = square_mask(2)
    perfect = 20 * (2 * mask - 1)
    assert soft_dice_loss(perfect, mask).tolist() == pytest.approx([0, 0], abs=1e-4)
    assert soft_dice_loss(-perfect, mask).tolist() == pytest.approx([1, 1], abs=1e-3)
    # A negative study: the empty mask is a real target.
    empty = torch.zeros(1, 1, 64, 64)
    assert soft_dice_loss(torch.full_like(empty, -20.0), empty).item() == pytest.approx(0, abs=1e-4)
    assert soft_dice_loss(torch.full_like(empty, 20.0), empty).item() == pytest.approx(1, abs=1e-3)
    # Per sample: one good and one bad prediction are scored separately.
    mixed = torch.cat([perfect[:1], -perfect[1:]])
    assert soft_dice_loss(mixed, mask).tolist() == pytest.approx([0, 1], abs=1e-3)


def test_segmentation_loss_is_weighted_bce_plus_dice():
    head = SegmentationHead(channels=(8, 16), strides=(2, 4), bce_weight=0.5, dice_weight=2.0, pos_weight=3.0)
    logits = torch.randn(2, 1, 64, 64)
    mask = square_mask(2)
    bce = F.binary_cross_entropy_with_logits(logits, mask, pos_weight=torch.tensor([3.0]))
    dice = soft_dice_loss(logits, mask).mean()
    actual = head.loss(logits, batch([0, 1], masks=mask))
    assert actual.item() == pytest.approx((0.5 * bce + 2.0 * dice).item(), rel=1e-5)


def test_samples_without_mask_do_not_count():
    head = SegmentationHead(channels=(8, 16), strides=(2, 4))
    logits = torch.randn(2, 1, 64, 64)
    mask = square_mask(2)
    loss = head.loss(logits, batch([0, 1], masks=mask, has_mask=[True, False]))
    mask[1] = 1 - mask[1]
    assert head.loss(logits, batch([0, 1], masks=mask, has_mask=[True, False])).item() == loss.item()
    assert loss.item() == pytest.approx(head.loss(logits[:1], batch([0], masks=mask[:1])).item())
    assert head.loss(logits, batch([0, 1], masks=mask)).item() != pytest.approx(loss.item())


def test_no_target_gives_a_zero_with_a_graph(encoder):
    pyramid = encoder(torch.rand(2, 1, 64, 64))
    classify = ClassificationHead(channels=encoder.channels, num_classes=4)
    segment = SegmentationHead(channels=encoder.channels, strides=encoder.strides)
    unlabelled = batch([-1, -1], has_mask=[False, False])
    losses = [classify.loss(classify(pyramid), unlabelled), segment.loss(segment(pyramid), unlabelled)]
    for loss in losses:
        assert loss.item() == 0 and loss.requires_grad
    sum(losses).backward()
    assert classify.fc.weight.grad is not None and torch.all(classify.fc.weight.grad == 0)


def test_gradients_reach_the_encoder(encoder):
    classify = ClassificationHead(channels=encoder.channels, num_classes=4)
    segment = SegmentationHead(channels=encoder.channels, strides=encoder.strides)
    pyramid = encoder(torch.rand(2, 1, 64, 64))
    data = batch([1, -1], masks=square_mask(2), has_mask=[False, True])
    loss = classify.loss(classify(pyramid), data) + segment.loss(segment(pyramid), data)
    loss.backward()
    for module in (encoder.conv1, encoder.layer1[0].conv1, encoder.layer4[1].conv2):
        assert module.weight.grad.abs().sum() > 0


def test_tiny_model_overfits_eight_images(encoder):
    torch.manual_seed(0)
    images = torch.rand(8, 1, 32, 32)
    data = batch([0, 1, 2, 3, 0, 1, 2, 3])
    head = ClassificationHead(channels=encoder.channels, num_classes=4)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = head.loss(head(encoder(images)), data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.0  # about log(4) at the start
    assert losses[-1] < 0.1 * losses[0]


def test_feature_norm_standardises_pooled_features_for_linear_probes():
    from corex_heads.classification import ClassificationHead

    torch.manual_seed(0)
    head = ClassificationHead(channels=(4, 8), num_classes=4, feature_norm=True)
    features = [torch.randn(16, 4, 8, 8), 100 + 50 * torch.randn(16, 8, 2, 2)]  # far from unit scale
    head.train()
    head(features)
    pooled = features[-1].mean(dim=(2, 3))
    normed = head.norm(pooled)
    assert torch.allclose(normed.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(normed.std(0, unbiased=False), torch.ones(8), atol=1e-2)
    assert not any(p.requires_grad for p in head.norm.parameters())  # no affine: a pure standardiser
    assert isinstance(ClassificationHead(channels=(4, 8), num_classes=4).norm, torch.nn.Identity)
