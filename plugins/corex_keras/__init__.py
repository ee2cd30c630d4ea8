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
"""

from __future__ import annotations

from corex import hookimpl
from corex_keras.encoder import APPLICATIONS, KerasEncoder, keras_densenet121, keras_efficientnetb0, keras_resnet50


@hookimpl
def corex_encoders():
    return {
        "keras_resnet50": keras_resnet50,
        "keras_densenet121": keras_densenet121,
        "keras_efficientnetb0": keras_efficientnetb0,
    }


__all__ = ["APPLICATIONS", "KerasEncoder", "keras_densenet121", "keras_efficientnetb0", "keras_resnet50"]
