"""Feature pyramids from keras-core applications, run on keras's torch backend.

keras-core 0.1.7 builds every variable as a ``torch.nn.Parameter``, so a keras model can train
inside corex's torch loop. :class:`KerasEncoder` makes it a well-behaved torch module:

* every keras variable is registered under a clean, stable name (``conv1_conv.kernel``,
  ``conv1_bn.moving_mean``): trainable ones as parameters, the others (batch-norm statistics,
  dropout seeds) as buffers, so the optimizer, ``state_dict``, ``.to(device)`` and
  ``requires_grad_`` treat them as they treat any torch module;
* keras decides batch-norm behaviour from its ``training`` argument, not from torch's mode, so
  ``forward`` passes ``training=self.training``;
* keras works channels-last: the input is permuted to ``(B, H, W, C)`` and each output back to
  ``(B, C, H, W)`` (both are views: no copy);
* each level of the pyramid lies on the autograd path to the deeper ones: the layers after a tap
  read the very ``(B, C, H, W)`` tensor the encoder returns (permuted back, a view again), so
  gradients can be taken with respect to any level (Grad-CAM at ``level=-2``), as for a torch
  encoder.

keras-core is imported only when an encoder is built, never by the plugin hook.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

INSTALL_HINT = 'pip install "corex-cxr[keras]"  (keras-core 0.1.7)'


@dataclass(frozen=True)
class Application:
    """A keras application and the layers tapped for its pyramid (strides 2, 4, 8, 16, 32)."""

    constructor: str  # the attribute of ``keras_core.applications``
    taps: tuple[str, str, str, str, str]
    input_scale: float = 1.0  # multiplies the [0, 1] image before the first keras layer


APPLICATIONS = {
    # He et al. 2016. Stem ReLU, then the last block of each of the four stages.
    "resnet50": Application(
        "ResNet50", ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
    ),
    # Huang et al. 2017. Stem ReLU, the BN-ReLU opening each transition (the dense block's
    # output, before the 1x1 convolution halves it), and the final BN-ReLU: the taps of
    # corex_encoders' densenet121.
    "densenet121": Application(
        "DenseNet121", ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu", "relu")
    ),
    # Tan & Le 2019. The last block of the stages that end at strides 2-16, then the 1x1 "top"
    # convolution's activation. The model opens with Rescaling(1/255) and an (unadapted,
    # identity) Normalization, keras's convention for [0, 255] input: scaling by 255 first means
    # the network sees our [0, 1] image unchanged.
    "efficientnetb0": Application(
        "EfficientNetB0",
        ("block1a_project_bn", "block2b_add", "block3b_add", "block5c_add", "top_activation"),
        input_scale=255.0,
    ),
}


def keras_home() -> Path:
    """Where keras keeps its settings (keras.json) for corex: ``$KERAS_HOME`` if the user set it,
    else ``keras`` in corex's cache (``$COREX_CACHE``, default ``~/.cache/corex``), not ``~/.keras``."""
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"])
    return Path(os.environ.get("COREX_CACHE") or "~/.cache/corex").expanduser() / "keras"


def import_keras() -> Any:
    """keras_core on the torch backend, or a ValueError that says how to get it."""
    # keras reads KERAS_BACKEND once, at its first import; it beats keras.json. It writes
    # keras.json into KERAS_HOME at that import, so that too is set first.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ["KERAS_HOME"] = str(keras_home())
    try:
        # keras announces its backend on stdout, where `corex run` writes its results.
        with contextlib.redirect_stdout(sys.stderr):
            import keras_core
    except ImportError as exc:
        if exc.name == "keras_core":
            raise ValueError(f"keras encoders need keras-core; install it with: {INSTALL_HINT}") from exc
        raise ValueError(
            f"keras-core failed to import ({exc}); keras encoders need the torch backend: set KERAS_BACKEND=torch"
        ) from exc
    backend = keras_core.config.backend()
    if backend != "torch":
        raise ValueError(
            f"keras-core runs on the '{backend}' backend, but keras encoders need torch: "
            "set KERAS_BACKEND=torch before anything imports keras_core"
        )
    return keras_core


@contextlib.contextmanager
def building_scope(keras: Any) -> Iterator[None]:
    """Build a keras model the way a torch module is built, whatever else the process did.

    Channels-last layers on the CPU; layer names that do not depend on how many keras models were
    built before (keras numbers unnamed layers per process, and the names become our state_dict
    keys); initial weights drawn from torch's generator, so ``torch.manual_seed`` fixes them
    (keras seeds its initializers from Python's ``random``).
    """
    from keras_core.src.backend.common import global_state
    from keras_core.src.backend.torch.core import device_scope

    data_format = keras.config.image_data_format()
    layer_names = global_state.get_global_attribute("object_name_uids")
    python_rng = random.getstate()
    keras.config.set_image_data_format("channels_last")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    random.seed(int(torch.randint(0, 2**31 - 1, ())))
    try:
        with device_scope("cpu"):
            yield
    finally:
        random.setstate(python_rng)
        global_state.set_global_attribute("object_name_uids", layer_names)
        keras.config.set_image_data_format(data_format)


class KerasGraph:
    """The keras functional model (inputs to the five taps) and where its variables live.

    It stays out of torch's module tree (as a submodule it would add unnamed ``torch_params.N``
    copies of every variable) and holds no state of its own: the encoder registers the variables
    and binds them before each call. So copies of an encoder (MoCo's key encoder) share one graph;
    keras models cannot be deep-copied anyway.

    :meth:`pyramid` runs the model and returns the taps channels-first, each one on the autograd
    path to the deeper ones: as keras runs its graph, the output of each tapped layer is permuted
    to ``(B, C, H, W)``, kept, and permuted back for the layers after it. Both permutations are
    views and the second restores the first's strides, so every layer sees exactly the tensor it
    saw before (same values, same memory layout: the same numbers out), but the tensor the encoder
    returns for a level is now an ancestor of the deeper levels. Returning ``output.permute(...)``
    of keras's outputs instead gives views *beside* the graph: a gradient with respect to one of
    them is ``None``, which is why Grad-CAM refused every level but the deepest.
    """

    def __init__(self, model: Any, taps: tuple[Any, ...]):
        self.model = model
        # (variable, layer name, variable name): the encoder holds it as `<layer>.<variable>`.
        self.variables = [(v, layer.name, v.name) for layer in model.layers for v in layer.variables]
        # Layers that cache tensors computed from their variables (Normalization's mean, variance).
        self.cached_layers = [layer for layer in model.layers if hasattr(layer, "finalize_state")]
        # The tapped layers, by identity, and their level.
        self.levels = {id(layer): level for level, layer in enumerate(taps)}
        self.tapped: list[Tensor | None] | None = None  # the levels of the call under way, else None
        # keras's Functional.call hands each layer to `operation_fn` through this (private, keras-core
        # 0.1.7) method; the instance attribute wraps it. Outside `pyramid` (symbolic shape inference,
        # keras's own calls) it is keras's method unchanged.
        run_through_graph = model._run_through_graph
        model._run_through_graph = lambda inputs, operation_fn: run_through_graph(inputs, self._tapping(operation_fn))

    def _tapping(self, operation_fn: Any) -> Any:
        def tapping_fn(operation: Any) -> Any:
            call = operation_fn(operation)
            level = self.levels.get(id(operation))
            if self.tapped is None or level is None:
                return call

            def tap(*args: Any, **kwargs: Any) -> Any:
                assert self.tapped is not None and self.tapped[level] is None, f"layer {operation.name} ran twice"
                channels_first = call(*args, **kwargs).permute(0, 3, 1, 2)
                self.tapped[level] = channels_first
                return channels_first.permute(0, 2, 3, 1)  # what the next layers read: a view of it

            return tap

        return tapping_fn

    def pyramid(self, x: Tensor, training: bool) -> list[Tensor]:
        """The taps, ``(B, C, H, W)``, of the channels-last input ``x``."""
        self.tapped = [None] * len(self.levels)
        try:
            self.model(x, training=training)
            tapped = self.tapped
        finally:
            self.tapped = None
        missing = [level for level, t in enumerate(tapped) if t is None]
        assert not missing, f"keras did not run the tapped layers of levels {missing}"
        return tapped  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict[int, Any]) -> KerasGraph:
        return self


class KerasEncoder(nn.Module):
    """A keras-core application as a corex encoder: five feature maps at strides 2, 4, 8, 16, 32.

    Built with ``weights=None`` (keras's ``"imagenet"`` would download); ``weights`` loads a
    local keras weights file (``.weights.h5`` or ``.keras`` written by ``save_weights``, or a
    legacy ``.h5`` such as keras's ImageNet "notop" files) into the full application before
    the pyramid is cut from it, so the file must match the architecture and ``in_channels``.
    A one-channel (grey) input is repeated to ``in_channels``, so ``in_channels=3`` runs RGB
    weights unchanged. No ImageNet mean/std is applied: the [0, 1] image is fed as it is
    (times 255 for EfficientNet, see ``APPLICATIONS``).
    """

    strides = (2, 4, 8, 16, 32)

    def __init__(self, arch: str, *, in_channels: int = 1, weights: Path | None = None):
        super().__init__()
        if arch not in APPLICATIONS:
            raise ValueError(f"unknown keras application '{arch}'; choose one of {sorted(APPLICATIONS)}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}.")
        if weights is not None:
            weights = Path(weights).expanduser()
            if not weights.is_file():
                raise ValueError(f"weights: no such file '{weights}'.")
        keras = import_keras()
        application = APPLICATIONS[arch]
        self.arch = f"keras_{arch}"
        self.in_channels = in_channels
        self.input_scale = application.input_scale

        with building_scope(keras):
            full = getattr(keras.applications, application.constructor)(
                weights=None, include_top=False, input_shape=(None, None, in_channels)
            )
            if weights is not None:
                try:
                    full.load_weights(str(weights))
                except Exception as exc:  # keras raises ValueError, KeyError, OSError, ... here
                    raise ValueError(
                        f"weights: cannot load '{weights}' into {self.arch} with in_channels={in_channels}: {exc}"
                    ) from exc
            taps = tuple(full.get_layer(name) for name in application.taps)
            model = keras.Model(full.input, [layer.output for layer in taps])
        self.channels = tuple(int(t.shape[-1]) for t in model.outputs)

        self.graph = KerasGraph(model, taps)
        for variable, layer_name, name in self.graph.variables:
            if layer_name not in self._modules:
                self.add_module(layer_name, nn.Module())
            if variable.trainable:
                self._modules[layer_name].register_parameter(name, variable.value)
            else:  # batch-norm statistics, dropout seeds: state, not something to optimise
                self._modules[layer_name].register_buffer(name, variable.value.detach())

    def bind(self) -> None:
        """Point every keras variable at the tensor this module holds under its name.

        torch may have replaced that tensor (``.to()`` replaces buffers, ``load_state_dict(...,
        assign=True)`` replaces everything) and copies of this module share one keras graph, so
        this runs before every call.
        """
        for variable, layer_name, name in self.graph.variables:
            variable._value = getattr(self._modules[layer_name], name)
        for layer in self.graph.cached_layers:
            layer.finalize_state()

    def forward(self, x: Tensor) -> list[Tensor]:
        from keras_core.src.backend.torch.core import device_scope

        if x.shape[1] == 1 and self.in_channels > 1:
            x = x.expand(-1, self.in_channels, -1, -1)  # a grey image for RGB weights
        elif x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} was built with in_channels={self.in_channels}, but the input has {x.shape[1]} channels."
            )
        if self.input_scale != 1.0:
            x = x * self.input_scale
        # keras moves every tensor it creates or receives to its "current device": make it x's.
        with device_scope(x.device):
            self.bind()
            # Channels-first views that the deeper levels are computed from (see KerasGraph).
            return self.graph.pyramid(x.permute(0, 2, 3, 1), training=self.training)


def keras_resnet50(*, in_channels: int = 1, weights: Path | None = None) -> KerasEncoder:
    """keras-core ResNet50 (He et al. 2016): channels (64, 256, 512, 1024, 2048).
    ``weights``: a local keras weights file for the same architecture and ``in_channels``."""
    return KerasEncoder("resnet50", in_channels=in_channels, weights=weights)


def keras_densenet121(*, in_channels: int = 1, weights: Path | None = None) -> KerasEncoder:
    """keras-core DenseNet121: channels (64, 256, 512, 1024, 1024). Options as for ``keras_resnet50``."""
    return KerasEncoder("densenet121", in_channels=in_channels, weights=weights)


def keras_efficientnetb0(*, in_channels: int = 1, weights: Path | None = None) -> KerasEncoder:
    """keras-core EfficientNetB0: channels (16, 24, 40, 112, 1280); the input is scaled by 255
    for the model's own Rescaling(1/255). Options as for ``keras_resnet50``."""
    return KerasEncoder("efficientnetb0", in_channels=in_channels, weights=weights)
