"""Seeds and random-number state: what makes a resumed run equal an uninterrupted one.

The seed fixes initialisation; each epoch's shuffling comes from a generator seeded by
(seed, stage, epoch); every RNG's state is saved with each checkpoint as tensors and plain values,
so checkpoints load with ``weights_only=True``. ``tune_allocator`` lives here because, like the
seed, it is set once when a run starts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def tune_allocator() -> None:
    """Stop glibc returning large activation buffers to the kernel after every step.

    Measured on the 2-core reference machine: ResNet-50 at batch 32 trained 1.9x faster
    (2.2 -> 4.2 images/s) because the page faults of re-mapping those buffers disappear.
    Respects MALLOC_* variables a user has set.
    """
    if platform.system() != "Linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def stage_seed(seed: int, stage: str, epoch: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) + epoch) % 2**63
