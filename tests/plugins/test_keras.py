"""corex_keras: keras-core applications as torch encoders (pyramids, parameters, modes, state, engine)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corex
import corex_keras
import corex_keras.encoder
from corex.errors import RecipeError
from corex.interfaces import Encoder
from corex.testing import assert_light, assert_mirrors
from corex_eval.localization import LocalizationEvaluator
from corex_heads.classification import ClassificationHead
from corex_keras import keras_densenet121, keras_efficientnetb0, keras_resnet50

try:
    corex_keras.encoder.import_keras()  # sets KERAS_BACKEND=torch before keras_core is imported
except ValueError as missing:
    pytest.skip(str(missing), allow_module_level=True)

FACTORIES = {
    "keras_resnet50": keras_resnet50,
    "keras_densenet121": keras_densenet121,
    "keras_efficientnetb0": keras_efficientnetb0,
}
FIRST_BATCH_NORM = {"keras_resnet50": "conv1_bn", "keras_densenet121": "conv1_bn", "keras_efficientnetb0": "stem_bn"}
CHANNELS = {
    "keras_resnet50": (64, 256, 512, 1024, 2048),
    "keras_densenet121": (64, 256, 512, 1024, 1024),
    "keras_efficientnetb0": (16, 24, 40, 112, 1280),
}


@pytest.fixture(scope="module")
def encoders() -> dict[str, corex_keras.KerasEncoder]:
    """Each application built once (seeded) for the whole module."""
    torch.manual_seed(0)
    return {name: factory() for name, factory in FACTORIES.items()}


@pytest.fixture
def effnet(encoders) -> corex_keras.KerasEncoder:
    """The smallest one, with every kind of keras state: BN statistics, Normalization, dropout seeds."""
    encoder = encoders["keras_efficientnetb0"]
    encoder.train()
    return encoder


def images(seed: int = 1, channels: int = 1) -> torch.Tensor:
    return torch.rand(2, channels, 64, 64, generator=torch.Generator().manual_seed(seed))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_hook_names_the_encoders_without_importing_keras_or_torch():
    assert corex_keras.corex_encoders() == FACTORIES
    assert_light("corex_keras")  # keras_core is among the modules it must not import


@pytest.mark.parametrize("name", FACTORIES)
def test_each_light_factory_has_its_implementations_options(name):
    implementation = getattr(corex_keras.encoder, name)
    assert_mirrors(FACTORIES[name], implementation)
    assert corex_keras.KerasEncoder is corex_keras.encoder.KerasEncoder
    assert corex_keras.APPLICATIONS is corex_keras.encoder.APPLICATIONS


ROOT = Path(__file__).resolve().parents[2]


def away_from_home(tmp_path: Path) -> dict[str, str]:
    """The environment with HOME in a temporary folder and no keras settings of the user's."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_HOME", "KERAS_BACKEND", "COREX_CACHE")}
    return {**env, "HOME": str(home)}


@pytest.mark.slow
def test_the_tests_keep_keras_home_out_of_the_users_home(tmp_path):
    env = away_from_home(tmp_path)
    test = f"{Path(__file__).relative_to(ROOT)}::test_another_keras_backend_is_a_clear_error"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:xdist", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert not (tmp_path / "home" / ".keras").exists()


@pytest.mark.slow
def test_a_run_keeps_keras_home_in_the_corex_cache_unless_the_user_set_it(tmp_path):
    env = {**away_from_home(tmp_path), "COREX_CACHE": str(tmp_path / "cache")}
    code = "import os, corex_keras.encoder; corex_keras.encoder.import_keras(); print(os.environ['KERAS_HOME'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(tmp_path / "cache" / "keras")
    assert (tmp_path / "cache" / "keras" / "keras.json").is_file()
    assert not (tmp_path / "home" / ".keras").exists()

    mine = tmp_path / "my-keras"
    done = subprocess.run([sys.executable, "-c", code], env={**env, "KERAS_HOME": str(mine)}, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(mine) and (mine / "keras.json").is_file()


def test_missing_keras_core_is_a_clear_error_and_the_hook_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_core", None)  # `import keras_core` now fails
    assert set(corex_keras.corex_encoders()) == set(FACTORIES)
    with pytest.raises(ValueError, match=r'keras-core; install it with: pip install "corex-cxr\[keras\]"  \(keras-core 0\.1\.7\)'):
        keras_resnet50()


def test_another_keras_backend_is_a_clear_error(monkeypatch):
    import keras_core

    monkeypatch.setattr(keras_core.config, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="'jax' backend, but keras encoders need torch: set KERAS_BACKEND=torch"):
        keras_densenet121()


@pytest.mark.parametrize("name", FACTORIES)
def test_pyramid_matches_channels_and_strides(encoders, name):
    encoder = encoders[name]
    assert isinstance(encoder, Encoder)
    assert (encoder.arch, encoder.in_channels, encoder.channels) == (name, 1, CHANNELS[name])
    assert tuple(encoder.strides) == (2, 4, 8, 16, 32)
    with torch.no_grad():
        pyramid = encoder.eval()(images())
    assert [tuple(f.shape) for f in pyramid] == [(2, c, 64 // s, 64 // s) for c, s in zip(encoder.channels, encoder.strides)]
    assert all(torch.isfinite(f).all() for f in pyramid)


@pytest.mark.parametrize("name", FACTORIES)
def test_every_keras_variable_is_torch_state_under_a_clean_name(encoders, name):
    encoder = encoders[name]
    keras_model = encoder.graph.model
    params, buffers = dict(encoder.named_parameters()), dict(encoder.named_buffers())
    assert len(params) == len(keras_model.trainable_variables) and len(buffers) == len(keras_model.non_trainable_variables)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params.values())
    bn = FIRST_BATCH_NORM[name]
    assert {f"{bn}.gamma", f"{bn}.beta"} <= set(params) and {f"{bn}.moving_mean", f"{bn}.moving_variance"} <= set(buffers)
    # The very tensors keras computes with (so the optimizer trains what keras uses).
    encoder.bind()
    held = {**params, **buffers}
    assert all(variable.value is held[f"{layer}.{var}"] for variable, layer, var in encoder.graph.variables)
    # requires_grad_(True) (the engine does it) must not make statistics trainable.
    encoder.requires_grad_(True)
    assert not any(b.requires_grad for b in encoder.buffers())


def test_an_optimizer_step_trains_every_parameter_through_keras(effnet):
    before = {k: p.detach().clone() for k, p in effnet.named_parameters()}
    optimizer = torch.optim.SGD(effnet.parameters(), lr=0.1)
    loss = sum(f.square().mean() for f in effnet(images()))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in effnet.parameters())
    optimizer.step()
    optimizer.zero_grad()
    changed = [k for k, p in effnet.named_parameters() if not torch.equal(p, before[k])]
    assert len(changed) == len(before)


def test_batch_norm_follows_train_and_eval(effnet):
    x = images()
    statistics = effnet.stem_bn.moving_mean.clone()
    with torch.no_grad():
        trained = effnet.train()(x)
    assert not torch.equal(effnet.stem_bn.moving_mean, statistics)  # train mode updates them

    statistics = effnet.stem_bn.moving_mean.clone()
    with torch.no_grad():
        first, second = effnet.eval()(x), effnet(x)
    assert torch.equal(effnet.stem_bn.moving_mean, statistics)  # eval mode only reads them
    assert same(first, second)  # and is deterministic (no dropout)
    assert not torch.allclose(trained[0], first[0])  # batch statistics vs moving statistics


def test_state_dict_round_trip_reproduces_outputs_exactly(effnet):
    with torch.no_grad():
        effnet.train()(images(2))  # statistics away from their initial values
    torch.manual_seed(123)
    fresh = keras_efficientnetb0().eval()
    effnet.eval()
    with torch.no_grad():
        assert not same(fresh(images()), effnet(images()))
        fresh.load_state_dict(effnet.state_dict())
        assert same(fresh(images()), effnet(images()))


def test_replaced_tensors_are_used(effnet):
    """What .to(device) does to buffers (and load_state_dict(assign=True) to all): new tensor objects."""
    effnet.eval()
    with torch.no_grad():
        before = effnet(images())
        effnet._apply(lambda t: t.clone())
        effnet.stem_bn.moving_variance = effnet.stem_bn.moving_variance * 4
        after = effnet(images())
    assert not torch.allclose(before[0], after[0])
    with torch.no_grad():
        effnet.train()(images())
    assert effnet.graph.model.get_layer("stem_bn").moving_mean.value is effnet.stem_bn.moving_mean


def test_a_deep_copy_is_independent(effnet):
    """MoCo's key encoder is a deep copy of the query encoder."""
    key = copy.deepcopy(effnet).eval()
    effnet.eval()
    with torch.no_grad():
        assert same(key(images()), effnet(images()))
        key.stem_conv.kernel.add_(1.0)
        reference = [f.clone() for f in effnet(images())]
        assert not same(key(images()), reference)
        assert same(effnet(images()), reference)


def test_efficientnet_sees_the_image_unscaled(effnet):
    """EfficientNet opens with Rescaling(1/255) and an identity Normalization; the encoder scales by 255."""
    layers = effnet.graph.model.get_layer
    x = images()
    effnet.bind()
    seen = layers("normalization")(layers("rescaling")(x.permute(0, 2, 3, 1) * effnet.input_scale))
    assert torch.allclose(seen.permute(0, 3, 1, 2), x, atol=1e-6)


def test_torch_seed_fixes_the_weights_and_names_do_not_depend_on_earlier_builds(effnet):
    torch.manual_seed(0)
    first = keras_efficientnetb0().state_dict()
    torch.manual_seed(0)
    second = keras_efficientnetb0().state_dict()
    torch.manual_seed(1)
    other = keras_efficientnetb0().state_dict()
    # keras would call the fourth Normalization layer of this process "normalization_3".
    assert list(first) == list(second) == list(other) == list(effnet.state_dict())
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["stem_conv.kernel"], other["stem_conv.kernel"])


# keras-core 0.1.7's saving code calls np.array(variable) the numpy-1 way.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_weights_load_from_a_keras_file(effnet, tmp_path):
    effnet.bind()
    effnet.graph.model.save_weights(str(tmp_path / "b0.weights.h5"))
    torch.manual_seed(7)
    loaded = keras_efficientnetb0(weights=tmp_path / "b0.weights.h5").eval()
    with torch.no_grad():
        assert same(loaded(images()), effnet.eval()(images()))
    with pytest.raises(ValueError, match=r"weights: cannot load '.*b0.weights.h5' into keras_densenet121 with in_channels=1"):
        keras_densenet121(weights=tmp_path / "b0.weights.h5")
    with pytest.raises(ValueError, match="weights: no such file"):
        keras_resnet50(weights=tmp_path / "missing.weights.h5")


def test_three_input_channels_take_a_repeated_grey_image():
    encoder = keras_efficientnetb0(in_channels=3).eval()
    grey = images()
    with torch.no_grad():
        assert same(encoder(grey), encoder(grey.expand(-1, 3, -1, -1)))
        with pytest.raises(ValueError, match="built with in_channels=3, but the input has 2 channels"):
            encoder(images(channels=2))
    with pytest.raises(ValueError, match="in_channels must be at least 1, got 0"):
        keras_efficientnetb0(in_channels=0)


def test_the_engine_pretrains_with_moco_then_trains_a_keras_encoder(tiny_recipe, tmp_path):
    """MoCo deep-copies the encoder into its key encoder; the train stage starts from the result."""
    tiny_recipe["model"]["encoder"] = {"name": "keras_efficientnetb0"}
    tiny_recipe["data"]["studies"] = 40
    pretrain = {"kind": "pretrain", "epochs": 1, "augment": "moco_cxr", "objective": {"name": "moco", "queue_size": 32}}
    train = {**tiny_recipe["stages"]["train"], "epochs": 1, "encoder_from": "pretrain"}
    tiny_recipe["stages"] = {"pretrain": pretrain, "train": train, "test": tiny_recipe["stages"]["test"]}
    results = corex.run(corex.load_recipe(tiny_recipe), out=tmp_path / "r", progress=False)
    assert math.isfinite(results["stages"]["pretrain"]["metrics"]["loss"])
    metrics = results["stages"]["test"]["metrics"]
    assert {"loss", "macro_f1", "dice"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    saved = torch.load(tmp_path / "r" / "checkpoints" / "train" / "model.pt", weights_only=True)
    assert saved["arch"] == "keras_efficientnetb0"
    assert {"encoder.stem_conv.kernel", "encoder.stem_bn.moving_mean"} <= set(saved["model"])
    assert not any("torch_params" in key for key in saved["model"])


def test_bad_options_are_reported_with_the_recipe_path(tiny_recipe, tmp_path):
    tiny_recipe["model"]["encoder"] = {"name": "keras_resnet50", "in_channels": "three", "widht": 8}
    with pytest.raises(RecipeError) as info:
        corex.load_recipe(tiny_recipe)
    problems = "\n".join(info.value.problems)
    assert "model.encoder.in_channels: expected" in problems
    assert "model.encoder.widht: unknown option" in problems

    tiny_recipe["model"]["encoder"] = {"name": "keras_resnet50", "in_channels": 0}
    with pytest.raises(RecipeError, match=r"model.encoder: encoder 'keras_resnet50' \(plugin 'keras'.*\): in_channels must be at least 1, got 0"):
        corex.run(corex.load_recipe(tiny_recipe), out=tmp_path / "bad", progress=False)


# -- Gradients through the pyramid (Grad-CAM at any level) -------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_each_level_lies_on_the_autograd_path_to_the_deeper_ones(encoders, name):
    """The deepest map depends on every returned level (not on a view taken beside keras's graph),
    and the returned levels are exactly keras's own outputs."""
    encoder = encoders[name].eval()
    x = images()
    pyramid = encoder(x)
    gradients = torch.autograd.grad(pyramid[-1].square().sum(), pyramid[:-1], allow_unused=True)
    for level, gradient in enumerate(gradients):
        assert gradient is not None, f"level {level}: the deepest level does not depend on it"
        assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0, f"level {level}"
    with torch.no_grad():
        keras_input = (x * encoder.input_scale).permute(0, 2, 3, 1)
        keras_outputs = encoder.graph.model(keras_input, training=False)  # keras's own run, untapped
    assert same([f.detach() for f in pyramid], [f.permute(0, 3, 1, 2) for f in keras_outputs])


@pytest.mark.parametrize("name", FACTORIES)
def test_grad_cam_works_at_every_pyramid_level(name):
    torch.manual_seed(0)  # a fresh encoder: other tests train the shared ones
    encoder = FACTORIES[name]().eval()
    head = ClassificationHead(channels=encoder.channels, num_classes=4)
    # Positive weights on the (mostly non-negative) deepest features: evidence for every class, so
    # that no map is all zero by chance of the random initialisation (Grad-CAM keeps the positive part).
    head.fc.weight.data.abs_()
    model = corex.CorexModel(encoder, {"classification": head}).eval()
    x, labels = images(), torch.tensor([1, 3])
    classes = ["negative", "typical", "indeterminate", "atypical"]
    for level in range(-1, -len(encoder.channels) - 1, -1):
        with torch.no_grad():  # as the engine evaluates
            cam = LocalizationEvaluator(class_names=classes, level=level).grad_cam(model, x, labels)
        assert cam.shape == (2, 1, 64, 64), level
        assert torch.isfinite(cam).all(), level
        flat = cam.flatten(1)
        assert (flat.amax(1) > flat.amin(1)).all(), f"level {level}: a constant map"
    assert not any(p.grad is not None for p in model.parameters())  # only the features' gradients


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:AUROC leaves out:UserWarning")  # a 40-study phantom's tiny test split
def test_the_quickstart_with_a_keras_encoder_scores_grad_cam(corex_cli, tmp_path):
    """The reported failure: `corex run recipes/quickstart.yaml` with a keras encoder trained, then its
    evaluate stage refused Grad-CAM at level -2."""
    out = tmp_path / "run"
    code, _, err = corex_cli(
        "run", ROOT / "recipes" / "quickstart.yaml", "--out", out, "--overwrite", "--no-progress",
        "--set", "model.encoder={name: keras_efficientnetb0}", "--set", "stages.train.epochs=1",
        "--set", "data.studies=40", "--set", "data.image_size=64", "--set", "data.batch_size=8",
        "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.workers=1",
        "--set", "stages.test.evaluators.0.bootstrap=20", "--set", "stages.test.evaluators.2.bootstrap=20",
    )
    assert code == 0, err[-3000:]
    results = json.loads((out / "results.json").read_text())
    metrics = results["stages"]["test"]["metrics"]
    assert "pointing_game" in metrics and metrics["n_localized"] > 0
    assert 0.0 <= metrics["pointing_game"] <= 1.0
    assert (out / "test" / "saliency_examples.png").is_file()
