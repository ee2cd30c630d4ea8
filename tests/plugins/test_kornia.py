"""corex_kornia: batch augmentation keeps image and mask together, and only them."""

from __future__ import annotations

import inspect

import pytest
import torch

import corex_kornia
import corex_kornia.pipelines
import corex_kornia.spelled
from corex.interfaces import Augmentation
from corex.testing import assert_mirrors
from corex_kornia import corex_augmentations, cxr_light, kornia_pipeline, moco_cxr, mocov2

SIZE = 48

# One augmentation of every named pipeline, with every op forced on where an option allows it.
PIPELINES = {
    "cxr_light": lambda: cxr_light(p=1.0),
    "moco_cxr": moco_cxr,
    "mocov2": mocov2,
    "kornia": lambda: kornia_pipeline(
        ops=[
            {"RandomAffine": {"degrees": 15, "translate": [0.1, 0.1], "p": 1.0}},
            "RandomVerticalFlip",
        ]
    ),
}


def make_batch(image: torch.Tensor, *, with_mask: bool = True) -> dict:
    batch_size = image.shape[0]
    batch = {
        "image": image,
        "label": torch.arange(batch_size) % 4,
        "has_mask": torch.ones(batch_size, dtype=torch.bool),
        "study_id": [f"s{i}" for i in range(batch_size)],
        "image_id": [f"i{i}" for i in range(batch_size)],
        "patient_id": [f"p{i}" for i in range(batch_size)],
    }
    if with_mask:
        batch["mask"] = (image > 0.5).float()
    return batch


def square_batch(batch_size: int = 8) -> dict:
    """A bright, off-centre rectangle on black: image and mask are the same picture."""
    image = torch.zeros(batch_size, 1, SIZE, SIZE)
    image[:, :, 8:30, 6:24] = 1.0
    return make_batch(image)


def textured_batch(batch_size: int = 8) -> dict:
    """Identical copies of a picture without symmetries, so any transform changes it."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    picture = 0.2 + 0.5 * xs * ys + 0.2 * torch.sin(9 * xs) * torch.cos(5 * ys)
    picture[10:20, 8:18] = 0.95
    return make_batch(picture.expand(batch_size, 1, SIZE, SIZE).clone())


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two boolean masks; 1 where both are empty."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones(len(a)))


def run(augment, batch: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    with torch.no_grad():
        return augment(batch)


def test_registers_every_pipeline_with_typed_keyword_options():
    factories = corex_augmentations()
    assert set(factories) == {"cxr_light", "moco_cxr", "mocov2", "kornia", "none"}
    for name, factory in factories.items():
        for parameter in inspect.signature(factory).parameters.values():
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (name, parameter.name)
            assert parameter.annotation is not inspect.Parameter.empty, (name, parameter.name)
        if name != "kornia":  # the only one without defaults for all options
            assert isinstance(factory(), Augmentation)


# The recipe-facing light factories, their implementations and options away from every default.
IMPLEMENTATIONS = {
    "cxr_light": (corex_kornia.pipelines.cxr_light, {"degrees": 5.0, "translate": 0.1, "scale": (0.8, 1.2),
                                                     "brightness": 0.2, "contrast": 0.3, "hflip": True, "p": 0.7}),
    "moco_cxr": (corex_kornia.pipelines.moco_cxr, {"degrees": 7.0, "crop_scale": (0.5, 1.0), "hflip": False}),
    "mocov2": (corex_kornia.pipelines.mocov2, {"crop_scale": (0.3, 0.9), "brightness": 0.2, "contrast": 0.1,
                                               "blur_sigma": (0.2, 1.0), "hflip": False}),
    "kornia": (corex_kornia.spelled.kornia_pipeline, {"ops": ["RandomVerticalFlip", {"RandomInvert": {"p": 0.3}}]}),
    "none": (corex_kornia.NoAugmentation, {}),
}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_each_light_factory_passes_every_option_to_its_implementation(name):
    factory, (implementation, options) = corex_augmentations()[name], IMPLEMENTATIONS[name]
    assert_mirrors(factory, implementation)
    built = factory(**options)
    assert type(built) is type(implementation(**options)) and repr(built) == repr(implementation(**options))


@pytest.mark.parametrize("name", PIPELINES)
def test_each_sample_gets_its_own_parameters(name):
    out = run(PIPELINES[name](), textured_batch(8), seed=0)["image"].flatten(1)
    distances = torch.cdist(out, out)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert (distances[off_diagonal] > 1e-3).all()


@pytest.mark.parametrize("name", PIPELINES)
def test_seed_repeats_parameters(name):
    augment, batch = PIPELINES[name](), square_batch(4)
    first, again, other = run(augment, batch, 1), run(augment, batch, 1), run(augment, batch, 2)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], other["image"])


@pytest.mark.parametrize("name", PIPELINES)
def test_mask_follows_image_and_stays_binary(name):
    batch = square_batch(16)
    out = run(PIPELINES[name](), batch, seed=3)
    image, mask = out["image"], out["mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.dtype == torch.float32
    assert image.shape == batch["image"].shape and 0.0 <= image.min() and image.max() <= 1.0
    # Intensity jitter dims the rectangle: threshold each image at half its own maximum.
    brightest = image.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    assert (iou(image > 0.5 * brightest, mask) > 0.9).all()
    # Control: the geometry did move, so a mask left behind would have failed the check above.
    assert (iou(mask, batch["mask"]) < 0.9).any()


@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior")  # kornia's own
def test_masks_resampled_bilinearly_are_thresholded_back_to_binary():
    # kornia warps masks through the elastic transform bilinearly (soft edges).
    augment = kornia_pipeline(ops=[{"RandomElasticTransform": {"alpha": [2.0, 2.0], "p": 1.0}}])
    out = run(augment, square_batch(4), seed=0)
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}


def test_cxr_light_never_mirrors_by_default():
    # A lateralised picture: all mass in the left third. Rotation <= 10 degrees and a shift of
    # 6% keep it on the left; a horizontal flip would move it right.
    image = torch.zeros(32, 1, SIZE, SIZE)
    image[:, :, 12:36, 4:16] = 0.8

    def left_of_centre(augment) -> torch.Tensor:
        out = run(augment, make_batch(image.clone()), seed=5)["image"]
        return out[..., : SIZE // 2].sum((1, 2, 3)) > out[..., SIZE // 2 :].sum((1, 2, 3))

    assert left_of_centre(cxr_light(p=1.0)).all()
    assert not left_of_centre(cxr_light(p=1.0, hflip=True)).all()  # the check can see a flip


@pytest.mark.parametrize("name", [*PIPELINES, "none"])
def test_other_keys_pass_through_and_input_is_untouched(name):
    augment = corex_augmentations()["none"]() if name == "none" else PIPELINES[name]()
    batch = square_batch(4)
    original = batch["image"].clone()
    out = run(augment, batch, seed=0)
    assert out is not batch and torch.equal(batch["image"], original)
    for key in ("label", "has_mask", "study_id", "image_id", "patient_id"):
        assert out[key] is batch[key]


@pytest.mark.parametrize("name", PIPELINES)
def test_batches_without_mask(name):
    batch = textured_batch(4)
    del batch["mask"]
    out = run(PIPELINES[name](), batch, seed=0)
    assert "mask" not in out and out["image"].shape == batch["image"].shape


def test_moco_pipelines_keep_non_square_input_size():
    batch = make_batch(torch.rand(2, 1, 32, 40))
    for augment in (moco_cxr(), mocov2()):
        out = run(augment, batch, seed=0)
        assert out["image"].shape == out["mask"].shape == (2, 1, 32, 40)


def test_none_returns_the_batch_unchanged():
    batch = square_batch(2)
    out = corex_augmentations()["none"]()(batch)
    assert out.keys() == batch.keys() and all(out[key] is batch[key] for key in batch)


def test_kornia_accepts_bare_names_and_null_params():
    augment = kornia_pipeline(ops=["RandomHorizontalFlip", {"RandomVerticalFlip": None}])
    assert "RandomHorizontalFlip, RandomVerticalFlip" in repr(augment)


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (
            ["RandomHorizontalFlip", "RandomAfine"],
            "ops[1]: 'RandomAfine' is not a kornia.augmentation class; did you mean 'RandomAffine'?",
        ),
        (
            [{"RandomAffine": {"degrees": 5, "shift": 0.1}}],
            "ops[0] RandomAffine: RandomAffine.__init__() got an unexpected keyword argument 'shift'",
        ),
        (
            [{"RandomAffine": {"degrees": 5, "translate": [2, 2]}}],
            "ops[0] RandomAffine: translate out of bounds",
        ),
        (["RandomAffine3D"], "ops[0]: 'RandomAffine3D' is not a 2D image augmentation; did you"),
        (["RandomThinPlateSpline"], "ops[0] RandomThinPlateSpline: kornia cannot apply it to masks"),
        ([{"Normalize": {"mean": [0.5], "std": [0.2]}}], "ops[0]: Normalize takes images out of"),
        ([{"RandomAffine": {"degrees": 5}, "RandomHorizontalFlip": {}}], "ops[0]: expected a"),
        ([{"RandomAffine": 5}], "ops[0]: expected a kornia"),
    ],
)
def test_kornia_reports_bad_ops_when_built(ops, message):
    with pytest.raises(ValueError) as error:
        kornia_pipeline(ops=ops)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        (cxr_light, {"p": 1.5}, "p must be in [0.0, 1.0], got 1.5"),
        (cxr_light, {"degrees": -1.0}, "degrees must be in [0.0, 180.0], got -1.0"),
        (cxr_light, {"scale": (1.1, 0.9)}, "scale must be (min, max)"),
        (moco_cxr, {"crop_scale": (0.5,)}, "crop_scale must be two numbers (min, max), got (0.5,)"),
        (mocov2, {"crop_scale": (0.0, 1.0)}, "crop_scale must be (min, max) with 0.0 < min"),
        (mocov2, {"blur_sigma": (2.0, 0.1)}, "blur_sigma must be (min, max)"),
    ],
)
def test_named_pipelines_reject_bad_options(factory, options, message):
    with pytest.raises(ValueError) as error:
        factory(**options)
    assert message in str(error.value)
