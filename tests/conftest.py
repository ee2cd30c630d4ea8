"""Suite-wide settings. The fixtures themselves come from corex.testing (a pytest11 plugin)."""

import torch

# Tiny test models are faster on one thread (no synchronisation between threads on small
# kernels); pytest-xdist runs one worker per core instead.
torch.set_num_threads(1)
