"""corex/checkpoints.py: every load is weights-only, and each way a file can be wrong is a message
naming the file (and where it was wanted), never a traceback or a silently wrong model."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from corex import checkpoints
from corex.errors import CorexError

WHERE = "stages.train.encoder_from"


def message(function, *args, **kwargs) -> str:
    with pytest.raises(CorexError) as caught:
        function(*args, **kwargs)
    text = str(caught.value)
    assert text.startswith(f"{WHERE}: '"), text
    return text


def test_a_good_file_loads_as_it_was_saved(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2, "best": {"epoch": None}}, path)
    state = checkpoints.load_checkpoint(path, WHERE, required=("model", "epoch"))
    assert type(state) is dict and state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert checkpoints.load_file(path, WHERE)["best"] == {"epoch": None}


def test_a_missing_file_a_folder_and_an_empty_file(tmp_path):
    assert message(checkpoints.load_file, tmp_path / "none.pt", WHERE) == f"{WHERE}: '{tmp_path / 'none.pt'}' does not exist"
    assert message(checkpoints.load_file, tmp_path, WHERE) == f"{WHERE}: '{tmp_path}' is a folder, not a weights file"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "is empty (0 bytes): it was never completely written" in message(checkpoints.load_file, empty, WHERE)


def test_a_file_with_pickled_code_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("x")}, path)  # a pickled object, not a tensor or a plain value
    text = message(checkpoints.load_file, path, WHERE)
    assert "holds pickled Python objects, and corex refused to load it" in text and str(path) in text


def test_a_damaged_file_is_a_message(tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # the start of a zip archive, and nothing after
    assert "is damaged or not a torch file" in message(checkpoints.load_file, path, WHERE)


def test_a_truncated_checkpoint_is_a_message(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    assert "it may have been cut short" in message(checkpoints.load_file, path, WHERE)


@pytest.mark.parametrize("text", ["Weights only load failed. This file can still be loaded ...",
                                  "Unsupported global: GLOBAL pathlib.PosixPath; use weights_only=False if you trust it"])
def test_either_way_torch_says_weights_only_refusal_is_recognised(tmp_path, monkeypatch, text):
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")

    def refused(*args, **kwargs):
        raise pickle.UnpicklingError(text)

    monkeypatch.setattr(checkpoints.torch, "load", refused)
    assert "holds pickled Python objects, and corex refused to load it" in message(checkpoints.load_file, path, WHERE)


def test_an_unpickling_error_that_is_not_about_weights_only_says_damaged_with_its_gist(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")

    def broken(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, 'x'. Some advice follows. And more.")

    monkeypatch.setattr(checkpoints.torch, "load", broken)
    assert message(checkpoints.load_file, path, WHERE) == f"{WHERE}: '{path}' is damaged or not a torch file (invalid load key, 'x')"


@pytest.mark.parametrize("error, gist", [(EOFError(), "EOFError"), (RuntimeError("PytorchStreamReader failed reading zip archive"),
                                                                      "PytorchStreamReader failed reading zip archive"),
                                         (RuntimeError("first line\nsecond line"), "first line"),
                                         (RuntimeError("x" * 300), "x" * 160), (RuntimeError("x. rest of the advice"), "x"),
                                         (RuntimeError(". starts with a full stop"), ". starts with a full stop")])
def test_the_message_quotes_the_first_line_of_torchs_error(tmp_path, monkeypatch, error, gist):
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints.torch, "load", broken)
    assert message(checkpoints.load_file, path, WHERE).endswith(f"it may have been cut short ({gist})")


def test_a_file_that_is_not_a_checkpoint_of_this_kind(tmp_path):
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    assert message(checkpoints.load_checkpoint, listed, WHERE) == f"{WHERE}: '{listed}' holds a list, not a corex checkpoint"
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "epoch": 1}, partial)
    text = message(checkpoints.load_checkpoint, partial, WHERE, required=("model", "optimizer", "epoch", "rng"))
    assert text.endswith("is not a corex checkpoint of this kind (it lacks optimizer, rng)")
    assert checkpoints.load_checkpoint(partial, WHERE, required=())["epoch"] == 1
    for model in ({"w": [1.0]}, {1: torch.zeros(1)}, torch.zeros(1)):
        bad = tmp_path / "bad.pt"
        torch.save({"model": model}, bad)
        assert "has a 'model' entry that is not a state dict of tensors" in message(checkpoints.load_checkpoint, bad, WHERE)
    no_model = tmp_path / "no_model.pt"
    torch.save({"epoch": 3}, no_model)
    assert checkpoints.load_checkpoint(no_model, WHERE, required=("epoch",)) == {"epoch": 3}


def test_weights_of_another_model_are_a_message():
    module = nn.Linear(3, 2)
    other = nn.Linear(4, 2).state_dict()
    text = message(checkpoints.load_state, module, other, Path("w.pt"), WHERE)
    assert "'w.pt' does not fit this recipe's model (Error(s) in loading state_dict for Linear" in text
    assert "written by another recipe or another version of a plugin" in text and "\n" not in text
    extra = {**module.state_dict(), "extra": torch.zeros(1)}
    assert "does not fit" in message(checkpoints.load_state, module, extra, Path("w.pt"), WHERE)  # strict
    good = {k: torch.ones_like(v) for k, v in module.state_dict().items()}
    checkpoints.load_state(module, good, Path("w.pt"), WHERE)
    assert all((v == 1).all() for v in module.state_dict().values())
