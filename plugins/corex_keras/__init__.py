"""corex_keras: encoders from keras-core applications, trained by corex on keras's torch backend.

::

    encoder = keras_densenet121()             # grey input, random initial weights
    features = encoder(images)               # [stride 2, 4, 8, 16, 32], highest resolution first

Encoders: ``keras_resnet50``, ``keras_densenet121``, ``keras_efficientnetb0``. Options:
``in_channels`` (1: grey radiographs; a grey input is repeated to it) and ``weights`` (a local keras
weights file for the same architecture and ``in_channels``, or None; nothing is ever downloaded).

keras-core is optional (``pip install keras-core==0.1.7``) and imported only when an encoder is built,
with ``KERAS_BACKEND=torch`` unless the environment already says otherwise, and with keras's home
(where it writes keras.json) in corex's cache, ``$COREX_CACHE/keras`` (default
``~/.cache/corex/keras``), unless ``KERAS_HOME`` is set: corex leaves ``~/.keras`` alone.

This module imports neither torch nor keras: ``corex --help`` and ``corex plugins`` load it to read
the factories' signatures; each factory imports :mod:`corex_keras.encoder` when a run builds it.
"""

from __future__ import annotations

from pathlib import Path

from corex import hookimpl
from corex.interfaces import Encoder
from corex.lazy import lazy_exports


def keras_resnet50(*, in_channels: int = 1, weights: Path | None = None) -> Encoder:
    """keras-core ResNet50 (see :func:`corex_keras.encoder.keras_resnet50`)."""
    from corex_keras.encoder import keras_resnet50 as build

    return build(in_channels=in_channels, weights=weights)


def keras_densenet121(*, in_channels: int = 1, weights: Path | None = None) -> Encoder:
    """keras-core DenseNet121 (see :func:`corex_keras.encoder.keras_densenet121`)."""
    from corex_keras.encoder import keras_densenet121 as build

    return build(in_channels=in_channels, weights=weights)


def keras_efficientnetb0(*, in_channels: int = 1, weights: Path | None = None) -> Encoder:
    """keras-core EfficientNetB0 (see :func:`corex_keras.encoder.keras_efficientnetb0`)."""
    from corex_keras.encoder import keras_efficientnetb0 as build

    return build(in_channels=in_channels, weights=weights)


@hookimpl
def corex_encoders():
    return {
        "keras_resnet50": keras_resnet50,
        "keras_densenet121": keras_densenet121,
        "keras_efficientnetb0": keras_efficientnetb0,
    }


__getattr__ = lazy_exports(__name__, {"APPLICATIONS": "corex_keras.encoder", "KerasEncoder": "corex_keras.encoder"})
__all__ = ["APPLICATIONS", "KerasEncoder", "keras_densenet121", "keras_efficientnetb0", "keras_resnet50"]
