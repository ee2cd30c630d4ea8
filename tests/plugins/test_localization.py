"""Tests of the localization (Grad-CAM) evaluator: the scores on hand-made maps, Grad-CAM itself on
tiny real models, which images are scored, and a run through the real engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import corex
import corex_eval
from corex import CorexModel
from corex.interfaces import Evaluator
from corex_encoders import resnet18
from corex_eval.localization import LocalizationEvaluator, localization_scores
from corex_heads.classification import ClassificationHead

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def tiny_model(seed: int = 0) -> CorexModel:
    torch.manual_seed(seed)
    encoder = resnet18(width=8)
    head = ClassificationHead(channels=encoder.channels, num_classes=len(CLASSES))
    return CorexModel(encoder, {"classification": head}).eval()


def patterned_squares(n: int, size: int, side: int, generator: torch.Generator) -> dict:
    """Class 0 is noise only; class k > 0 is a square with pattern k (filled, horizontal or
    vertical stripes) at a random place, and the square is the mask. The class is in the square's
    content, not its position, so the evidence for it is local."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patterns = [None, torch.ones(side, side), (y // 2 % 2).float(), (x // 2 % 2).float()]
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, size, size, generator=generator) * 0.1
    masks = torch.zeros(n, 1, size, size)
    for i, label in enumerate(labels.tolist()):
        if label:
            top, left = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
            images[i, 0, top : top + side, left : left + side] += 0.8 * patterns[label]
            masks[i, 0, top : top + side, left : left + side] = 1.0
    return {
        "image": images.clamp(0, 1),
        "label": labels,
        "mask": masks,
        "has_mask": torch.ones(n, dtype=torch.bool),
        "image_id": [f"i{i}" for i in range(n)],
    }


def evaluate(model: CorexModel, batch: dict, **options) -> LocalizationEvaluator:
    """One update the way the engine makes it: eval mode, under no_grad."""
    evaluator = LocalizationEvaluator(class_names=CLASSES, **options)
    with torch.no_grad():
        evaluator.update(batch, {}, model=model)
    return evaluator


# -- the scores on hand-made maps ----------------------------------------------------------------


def test_pointing_game_hits_when_the_maximum_is_inside_the_mask():
    masks = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    masks[:, :, :2, :2] = True  # top-left quarter
    saliency = torch.zeros(4, 1, 4, 4)
    saliency[0, 0, 1, 1] = 1.0  # maximum inside
    saliency[1, 0, 3, 3] = 1.0  # maximum outside
    saliency[2, 0, 0, 0] = saliency[2, 0, 3, 3] = 1.0  # two maxima, one inside: half a hit
    saliency[1, 0, 0, 0] = 0.5  # a lesser peak inside does not count
    # saliency[3] is all zero: treated as uniform, it scores the mask's area
    hits, _ = localization_scores(saliency, masks)
    assert hits.tolist() == [1.0, 0.0, 0.5, 0.25]


def test_saliency_in_mask_is_the_share_of_the_maps_sum_inside_the_mask():
    masks = torch.zeros(3, 1, 2, 2)
    masks[:, 0, 0, :] = 1.0  # top row
    saliency = torch.tensor(
        [
            [[0.5, 1.0], [0.25, 0.25]],  # 1.5 of 2.0 inside
            [[0.0, 0.0], [1.0, 0.5]],  # nothing inside
            [[0.0, 0.0], [0.0, 0.0]],  # uniform: the mask's area, 1/2
        ]
    )[:, None]
    _, energy = localization_scores(saliency, masks)
    assert energy.tolist() == [0.75, 0.0, 0.5]


def test_negative_saliency_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        localization_scores(-torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))


# -- Grad-CAM ------------------------------------------------------------------------------------


def test_grad_cam_equals_cam_for_a_pooled_linear_head():
    # With global average pooling and a linear layer, d logit_k / d A_c is w_kc / (h w) at every
    # position, so Grad-CAM at the deepest level is CAM (Zhou et al. 2016) up to scale.
    model = tiny_model()
    images, labels = torch.rand(3, 1, 96, 96), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cam = LocalizationEvaluator(class_names=CLASSES).grad_cam(model, images, labels)
        deepest = model.encoder(images)[-1]
        weights = model.heads["classification"].fc.weight[labels]
        expected = torch.relu(torch.einsum("bc,bchw->bhw", weights, deepest))[:, None]
        expected = F.interpolate(expected, size=(96, 96), mode="bilinear", align_corners=False)
        expected /= expected.flatten(1).amax(1)[:, None, None, None]
    assert deepest.shape[-1] == 3  # a real map, not a single pixel
    torch.testing.assert_close(cam, expected)
    assert cam.shape == (3, 1, 96, 96)
    assert cam.min() >= 0 and cam.flatten(1).amax(1).tolist() == [1.0, 1.0, 1.0]


def test_grad_cam_of_a_trained_model_points_at_the_evidence():
    generator = torch.Generator().manual_seed(1)
    model = tiny_model(seed=1)
    held_out = patterned_squares(48, size=64, side=24, generator=generator)
    # level -3 (stride 8) gives 8x8 maps at 64 px; the deepest is 2x2, too coarse for the boxes.
    untrained = evaluate(model, held_out, level=-3).compute()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        batch = patterned_squares(16, size=64, side=24, generator=generator)
        loss = model.heads["classification"].loss(model(batch["image"])["classification"], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    trained = evaluate(model, held_out, level=-3).compute()

    assert trained["n_localized"] == untrained["n_localized"] == 36  # the 12 negatives are not scored
    assert trained["pointing_game"] > 0.7
    assert trained["pointing_game"] > untrained["pointing_game"] + 0.3
    assert trained["saliency_in_mask"] > 2 * trained["mask_area"]
    assert trained["saliency_in_mask"] > untrained["saliency_in_mask"] + 0.1


def test_evaluation_leaves_the_model_untouched():
    model = tiny_model()
    batch = patterned_squares(8, size=32, side=12, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator = evaluate(model, batch, level=-2)
    assert evaluator.compute()["n_localized"] == 6
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # A frozen encoder still gives maps: the gradient is taken with respect to the features.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = evaluate(model, batch, level=-2).compute()
    assert frozen == evaluator.compute()


# -- which images are scored ---------------------------------------------------------------------


def test_only_annotated_positive_images_with_an_opacity_are_scored():
    model = tiny_model()
    batch = patterned_squares(6, size=32, side=12, generator=torch.Generator().manual_seed(0))
    batch["label"] = torch.tensor([-1, 0, 2, 3, 1, 2])
    batch["mask"].zero_()
    batch["mask"][:, :, :12, :12] = 1.0  # every image has the same opacity ...
    batch["mask"][3] = 0.0  # ... but image 3, which is empty
    batch["has_mask"] = torch.tensor([True, True, False, True, True, True])
    evaluator = evaluate(model, batch, level=-2, max_examples=1)
    metrics = evaluator.compute()
    assert metrics["n_localized"] == 2  # images 4 and 5
    assert metrics["mask_area"] == pytest.approx(144 / 1024)
    assert 0.0 <= metrics["pointing_game"] <= 1.0 and 0.0 <= metrics["saliency_in_mask"] <= 1.0
    assert [e["image_id"] for e in evaluator._examples] == ["i4"]

    evaluator.update({**batch, "label": torch.tensor([-1, 0, 0, 0, -1, 0])}, {}, model=model)
    assert evaluator.compute()["n_localized"] == 2  # a batch with nothing to score adds nothing
    evaluator.reset()
    assert evaluator.compute()["n_localized"] == 0


def test_nothing_scored_gives_nan_no_intervals_and_no_figure(tmp_path):
    evaluator = LocalizationEvaluator(class_names=CLASSES)
    metrics = evaluator.compute()
    assert metrics["n_localized"] == 0
    assert all(math.isnan(metrics[k]) for k in ("pointing_game", "saliency_in_mask", "mask_area"))
    assert evaluator.intervals() == {}
    evaluator.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_intervals_are_seeded_percentile_bootstraps_of_the_images():
    evaluator = LocalizationEvaluator(class_names=CLASSES)
    evaluator._hits = [torch.tensor([1.0, 1.0, 0.0, 1.0])]
    evaluator._energy = [torch.full((4,), 0.4)]
    evaluator._area = [torch.full((4,), 0.1)]
    evaluator._clusters = ["p1", "p2", "p3", "p4"]  # four patients
    intervals = evaluator.intervals()
    assert intervals["saliency_in_mask"] == pytest.approx((0.4, 0.4))  # no spread to resample
    low, high = intervals["pointing_game"]
    assert 0.0 <= low < 0.75 < high == 1.0
    assert evaluator.intervals() == intervals
    assert LocalizationEvaluator(class_names=CLASSES, seed=1).intervals() == {}  # nothing scored
    evaluator.bootstrap = 0
    assert evaluator.intervals() == {}


def test_intervals_resample_a_patients_images_together():
    # Patient p1: a hit and a miss (mean 1/2); patient p2 the same. Every resample of whole
    # patients scores 1/2; resampling the four images one by one would spread from 0 to 1.
    evaluator = LocalizationEvaluator(class_names=CLASSES)
    evaluator._hits = [torch.tensor([1.0, 0.0, 1.0, 0.0])]
    evaluator._energy = [torch.tensor([0.6, 0.2, 0.6, 0.2])]
    evaluator._area = [torch.full((4,), 0.1)]
    evaluator._clusters = ["p1", "p1", "p2", "p2"]
    intervals = evaluator.intervals()
    assert intervals["pointing_game"] == pytest.approx((0.5, 0.5))
    assert intervals["saliency_in_mask"] == pytest.approx((0.4, 0.4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_examples": -1}, "max_examples must be 0"),
        ({"bootstrap": -5}, "bootstrap must be 0"),
        ({"class_names": ["only"]}, "at least 2 classes"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LocalizationEvaluator(**{"class_names": CLASSES, **options})


def test_bad_level_or_head_is_named():
    model = tiny_model()
    batch = patterned_squares(4, size=32, side=12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="level 5 is outside the encoder's 5 pyramid levels"):
        evaluate(model, batch, level=5)
    with pytest.raises(ValueError, match="head 'classifier' is not among the model's heads"):
        evaluate(model, batch, head="classifier")


# -- registration and the real engine ------------------------------------------------------------


def test_registered_as_an_evaluator_that_needs_the_model():
    factory = corex_eval.corex_evaluators()["localization"]
    assert factory is corex_eval.localization_evaluator
    assert isinstance(factory(class_names=CLASSES, level=-2), LocalizationEvaluator)
    evaluator = LocalizationEvaluator(class_names=CLASSES)
    assert isinstance(evaluator, Evaluator) and evaluator.needs_model


def test_runs_in_an_evaluate_stage_of_the_engine(tiny_recipe, tmp_path):
    tiny_recipe["stages"]["train"]["epochs"] = 1
    tiny_recipe["stages"]["test"]["evaluators"].append({"name": "localization", "level": -2})
    results = corex.run(corex.load_recipe(tiny_recipe), out=tmp_path / "r", progress=False)
    test = results["stages"]["test"]
    assert 0.0 <= test["metrics"]["pointing_game"] <= 1.0
    assert 0.0 <= test["metrics"]["saliency_in_mask"] <= 1.0
    assert test["metrics"]["n_localized"] == 24  # the toy test split: 32 studies, 8 negatives
    low, high = test["intervals"]["pointing_game"]
    assert low <= test["metrics"]["pointing_game"] <= high
    assert (tmp_path / "r" / "test" / "saliency_examples.png").stat().st_size > 0
    # The prior comes from the training split (LearnsFromTraining); the faithfulness curves from the model.
    assert 0.0 <= test["metrics"]["pointing_game/prior"] <= 1.0
    for name in ("deletion_auc", "insertion_auc", "deletion_auc/random", "insertion_auc/random"):
        assert 0.0 <= test["metrics"][name] <= 1.0, name


# -- baselines: the fixed-point prior of the training boxes --------------------------------------


def boxes_batch(boxes: list[tuple[int, int, int, int]], labels: list[int], size: int = 4, has_mask: list[bool] | None = None) -> dict:
    """Images with box masks ``(top, left, height, width)`` in a ``size`` x ``size`` image."""
    masks = torch.zeros(len(boxes), 1, size, size)
    for i, (top, left, height, width) in enumerate(boxes):
        masks[i, 0, top : top + height, left : left + width] = 1.0
    return {"image": torch.rand(len(boxes), 1, size, size), "label": torch.tensor(labels), "mask": masks,
            "has_mask": torch.tensor(has_mask or [True] * len(boxes)), "image_id": [f"b{i}" for i in range(len(boxes))]}


def test_the_fixed_point_prior_is_the_pixel_inside_the_most_training_boxes():
    evaluator = LocalizationEvaluator(class_names=CLASSES, faithfulness_steps=0, bootstrap=0)
    assert evaluator.prior_point is None
    # Worked by hand, 4 x 4: A covers rows 0-1 x cols 0-1, B rows 1-2 x cols 1-2, C rows 1-3 x col 1.
    # Pixel (1, 1) lies in all three, (2, 1) in two, every other covered pixel in one.
    # Not counted: a negative study's mask (label 0), an unannotated image, an unlabelled one.
    evaluator.training_update(boxes_batch([(0, 0, 2, 2), (1, 1, 2, 2), (3, 3, 1, 1), (3, 3, 1, 1)], [1, 2, 0, 3],
                                          has_mask=[True, True, True, False]), {})
    evaluator.training_update(boxes_batch([(1, 1, 3, 1), (3, 3, 1, 1)], [3, -1]), {})
    assert evaluator.prior_point == (1, 1, (4, 4))
    # Test images: the first two hold (1, 1), the third does not.
    model = tiny_model()
    test = boxes_batch([(0, 0, 2, 2), (1, 1, 1, 1), (2, 2, 2, 2)], [1, 2, 3])
    test["image"] = torch.rand(3, 1, 32, 32)
    test["mask"] = F.interpolate(test["mask"], size=(32, 32), mode="nearest")  # the prior maps to (8*1+4, 8*1+4) here
    with torch.no_grad():
        evaluator.update(test, {}, model=model)
    metrics = evaluator.compute()
    assert metrics["pointing_game/prior"] == pytest.approx(2 / 3)
    assert metrics["pointing_game/vs_prior"] == pytest.approx(metrics["pointing_game"] - 2 / 3)
    # reset() forgets the scored images but keeps the prior, as it keeps the calibration data elsewhere.
    evaluator.reset()
    assert evaluator.prior_point == (1, 1, (4, 4))
    evaluator.reset_training()
    assert evaluator.prior_point is None


def test_prior_ties_take_the_first_pixel_in_raster_order():
    evaluator = LocalizationEvaluator(class_names=CLASSES, faithfulness_steps=0)
    evaluator.training_update(boxes_batch([(2, 2, 2, 2), (0, 3, 1, 1)], [1, 1]), {})
    assert evaluator.prior_point == (0, 3, (4, 4))


def test_without_training_data_there_is_no_prior_metric():
    batch = patterned_squares(8, 32, 8, torch.Generator().manual_seed(0))
    metrics = evaluate(tiny_model(), batch, faithfulness_steps=0, bootstrap=0).compute()
    assert "pointing_game/prior" not in metrics and "deletion_auc" not in metrics


# -- faithfulness: deletion and insertion (RISE) -------------------------------------------------

from corex_eval.localization import area_under, curve_counts, faithfulness_curves  # noqa: E402


def test_deletion_and_insertion_on_a_score_whose_answer_is_known():
    """The score of class 1 is the share of a region R's pixels left intact; the map is R itself."""
    size, batch = 16, 48
    region = torch.zeros(batch, 1, size, size, dtype=torch.bool)
    region[:, :, 2:6, 3:11] = True  # 32 of 256 pixels: an eighth of the image
    images = region.float()

    def score(x):
        intact = (x * region[0].float()).flatten(1).sum(1) / region[0].sum()
        return torch.stack([1 - intact, intact], 1)

    steps = 16
    curves = faithfulness_curves(score, images, region.float(), torch.ones(batch, dtype=torch.long), steps,
                                 torch.Generator().manual_seed(0), canvas=torch.zeros_like(images))
    counts = curve_counts(size * size, steps).double()
    expected_deletion = (32 - counts.clamp(max=32)) / 32  # R goes first: gone after 2 of 16 steps
    expected_insertion = counts.clamp(max=32) / 32
    assert curves["deletion_auc"] == pytest.approx(expected_deletion.expand(batch, -1).float())
    assert curves["insertion_auc"] == pytest.approx(expected_insertion.expand(batch, -1).float())
    # A random order removes R's pixels at the pace of all pixels: 1 - share removed, on average.
    share = counts / (size * size)
    assert curves["deletion_auc/random"].mean(0).double() == pytest.approx(1 - share, abs=0.05)
    assert curves["insertion_auc/random"].mean(0).double() == pytest.approx(share, abs=0.05)
    # Areas: saliency 1/16 (the trapezoid of 1, 0.5, 0, ...), random about 1/2.
    assert area_under(curves["deletion_auc"]) == pytest.approx(torch.full((batch,), 1 / 16))
    assert area_under(curves["insertion_auc"]) == pytest.approx(torch.full((batch,), 1 - 1 / 16))
    assert float(area_under(curves["deletion_auc/random"]).mean()) == pytest.approx(0.5, abs=0.03)


def test_a_flat_map_scores_as_the_random_order():
    images = torch.rand(64, 1, 8, 8)

    def score(x):
        mean = x.flatten(1).mean(1)
        return torch.stack([1 - mean, mean], 1)

    curves = faithfulness_curves(score, images, torch.zeros_like(images), torch.ones(64, dtype=torch.long), 8,
                                 torch.Generator().manual_seed(1), canvas=torch.zeros_like(images))
    for name in ("deletion_auc", "insertion_auc"):
        assert float(area_under(curves[name]).mean()) == pytest.approx(float(area_under(curves[f"{name}/random"]).mean()), abs=0.02)


class Identity(torch.nn.Module):
    """A one-level 'encoder' whose feature map is the image: Grad-CAM of a pooled linear head is then the image."""

    arch, in_channels, channels, strides = "identity", 1, (1,), (1,)

    def forward(self, x):
        return [x]


class Brightness(torch.nn.Module):
    """Logit of class 1 grows with the image's mean intensity; the other classes' logits are 0."""

    task = "classification"

    def forward(self, features):
        mean = features[-1].mean(dim=(1, 2, 3))
        zeros = torch.zeros_like(mean)
        return torch.stack([zeros, 12 * mean, zeros, zeros], 1)


def test_the_evaluator_on_a_model_whose_evidence_is_known():
    """The model's class-1 evidence is brightness, which lies in the square: its Grad-CAM is the image, so
    deleting the most salient pixels first lowers the class's probability faster than a random order,
    and inserting them first raises it faster."""
    model = CorexModel(Identity(), {"classification": Brightness()}).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 32, 32, generator=generator) * 0.05
    masks = torch.zeros(12, 1, 32, 32)
    images[:, :, 8:20, 10:22] += 0.9
    masks[:, :, 8:20, 10:22] = 1.0
    batch = {"image": images, "label": torch.ones(12, dtype=torch.long), "mask": masks, "has_mask": torch.ones(12, dtype=torch.bool),
             "image_id": [f"i{i}" for i in range(12)], "patient_id": [f"p{i}" for i in range(12)]}
    evaluator = evaluate(model, batch, faithfulness_steps=8, bootstrap=100)
    metrics, intervals = evaluator.compute(), evaluator.intervals()
    assert metrics["pointing_game"] == 1.0
    assert metrics["deletion_auc"] < metrics["deletion_auc/random"] - 0.1
    assert metrics["insertion_auc"] > metrics["insertion_auc/random"] + 0.1
    assert metrics["deletion_auc/vs_random"] == pytest.approx(metrics["deletion_auc"] - metrics["deletion_auc/random"])
    assert intervals["deletion_auc/vs_random"][1] < 0 < intervals["insertion_auc/vs_random"][0]


def test_faithfulness_steps_are_checked():
    with pytest.raises(ValueError, match="faithfulness_steps"):
        LocalizationEvaluator(class_names=CLASSES, faithfulness_steps=1)
