"""corex/seeding.py: what makes a resumed run equal an uninterrupted one (every RNG's state saved and
restored, weights-only), epoch seeds that never change between versions, and the allocator set-up."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch

from corex import seeding


def draws() -> tuple:
    """One draw of each generator a run uses (numpy's normal twice: its cached second value counts)."""
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_every_rngs_state_survives_a_weights_only_checkpoint():
    seeding.seed_everything(3)
    np.random.standard_normal()  # leaves numpy's second normal cached: part of the state
    random.gauss(0, 1)  # and Python's
    buffer = io.BytesIO()
    torch.save(seeding.rng_state(), buffer)
    expected = draws()
    seeding.seed_everything(99)
    draws()
    buffer.seek(0)
    seeding.set_rng_state(torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_rng_state_holds_plain_values_and_tensors_only():
    state = seeding.rng_state()
    assert set(state) >= {"python", "numpy", "torch"}
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    assert kind == "MT19937" and keys.dtype == torch.int64 and keys.shape == (624,)
    assert type(pos) is int and type(has_gauss) is int and type(gauss) is float
    assert isinstance(state["torch"], torch.Tensor)
    assert ("cuda" in state) == torch.cuda.is_available()


def test_seed_everything_repeats_every_generator_and_different_seeds_differ():
    seeding.seed_everything(5)
    first = draws()
    seeding.seed_everything(5)
    assert draws() == first
    seeding.seed_everything(6)
    assert all(a != b for a, b in zip(draws(), first))


def test_a_seed_beyond_numpys_range_seeds_numpy_with_its_low_32_bits():
    seeding.seed_everything(2**32 + 5)
    value = np.random.rand()
    np.random.seed(5)
    assert value == np.random.rand()
    assert torch.initial_seed() == 2**32 + 5


def test_deterministic_mode_is_switched_on_only_when_asked(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        seeding.seed_everything(1)
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        seeding.seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def test_a_loader_worker_seeds_python_and_numpy_from_its_torch_seed():
    torch.manual_seed(3 * 2**32 + 7)  # a worker's torch seed is the base seed plus its id: 64 bits
    seeding.seed_worker(0)
    values = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    assert values == (random.random(), np.random.rand())


def test_epoch_seeds_are_fixed_numbers_so_a_resume_by_a_later_version_shuffles_alike():
    assert seeding.stage_seed(0, "train", 1) == 1550247076
    assert seeding.stage_seed(7, "pretrain", 3) == 1902301828
    assert seeding.stage_seed(2**40, "train", 0) == 1099514927861130403
    assert seeding.stage_seed(2**62, "train", 5) < 2**63  # a torch generator takes it
    seeds = {seeding.stage_seed(s, st, e) for s in (0, 1) for st in ("train", "pretrain") for e in (1, 2, 3)}
    assert len(seeds) == 12


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, option, value):
        self.calls.append((option, value))


def test_the_allocator_is_tuned_on_glibc_unless_the_user_set_malloc_variables(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    libc = FakeLibc()
    opened = []
    monkeypatch.setattr(seeding.ctypes, "CDLL", lambda name: opened.append(name) or libc)
    monkeypatch.setattr(seeding.platform, "system", lambda: "Linux")
    seeding.tune_allocator()
    assert opened == ["libc.so.6"]
    assert libc.calls == [(-4, 0), (-1, 2**30)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB

    libc.calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    seeding.tune_allocator()
    assert libc.calls == []

    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(seeding.platform, "system", lambda: "Darwin")
    seeding.tune_allocator()
    assert libc.calls == []


@pytest.mark.parametrize("error", [OSError("no libc.so.6"), AttributeError("mallopt")])
def test_a_libc_without_mallopt_is_left_alone(monkeypatch, error):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(seeding.platform, "system", lambda: "Linux")

    def missing(name):
        raise error

    monkeypatch.setattr(seeding.ctypes, "CDLL", missing)
    seeding.tune_allocator()  # musl and friends: nothing to tune, no error


def test_the_cuda_generators_are_restored_only_when_saved_and_present(monkeypatch):
    restored = []
    monkeypatch.setattr(seeding.torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    state = seeding.rng_state()
    state.pop("cuda", None)
    monkeypatch.setattr(seeding.torch.cuda, "is_available", lambda: True)
    seeding.set_rng_state(state)  # written on a machine without a GPU, resumed on one
    assert restored == []
    state["cuda"] = [torch.ByteTensor(8)]
    seeding.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0][0], state["cuda"][0])
    monkeypatch.setattr(seeding.torch.cuda, "is_available", lambda: False)
    seeding.set_rng_state(state)  # written on a GPU machine, resumed on a CPU one
    assert len(restored) == 1
