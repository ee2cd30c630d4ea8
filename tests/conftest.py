"""Suite-wide settings. The fixtures themselves come from corex.testing (a pytest11 plugin)."""

import atexit
import os
import shutil
import tempfile

import torch

# keras writes keras.json into its home when first imported; the tests must leave nothing in the
# user's ~/.keras (nor in a KERAS_HOME of theirs), so it gets a folder of its own, set before any
# test module imports keras.
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="corex-tests-keras-")
atexit.register(shutil.rmtree, os.environ["KERAS_HOME"], ignore_errors=True)

# Tiny test models are faster on one thread (no synchronisation between threads on small
# kernels); pytest-xdist runs one worker per core instead.
torch.set_num_threads(1)
