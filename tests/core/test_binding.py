"""Factory annotations read without importing what they name only for type checkers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from corex.binding import Problems, bind_options, type_hints

if TYPE_CHECKING:  # never imported at run time: the annotation below cannot be resolved
    from some_heavy_library import Optimizer


def step_schedule(*, optimizer: Optimizer, epochs: int, gamma: float = 0.1, mode: Literal["step", "exp"] = "step"):
    """A light schedule factory whose injected argument names a type-checking-only class."""


def test_an_unresolvable_annotation_leaves_the_other_options_checked():
    hints = type_hints(step_schedule)
    assert "optimizer" not in hints
    assert hints["gamma"] is float and hints["epochs"] is int
    problems = Problems()
    bind_options(step_schedule, {"gamma": "fast", "mode": "cosine"}, "schedule", problems, injected={"optimizer", "epochs"})
    assert problems == ["schedule.gamma: expected a number, got 'fast'", "schedule.mode: expected one of 'step', 'exp', got 'cosine'"]
