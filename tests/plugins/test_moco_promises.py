"""corex_moco: the option ranges at their edges, the queue-size warning, the head's shape, the
initial queue, and the step's reported accuracy (issue 23: survivors of mutation testing)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex_moco import MoCo


class ThreeLevels(nn.Module):
    """A pyramid whose levels all have different widths, so the deepest one is unambiguous."""

    arch = "three"
    in_channels = 1
    channels = (4, 6, 10)
    strides = (2, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        ins = (1, 4, 6)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU()) for i, o in zip(ins, self.channels)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def make(batch_size: int = 4, **options) -> MoCo:
    options = {"queue_size": 8, "projection_dim": 8, **options}
    encoder = ThreeLevels()
    return MoCo(encoder=encoder, channels=encoder.channels, batch_size=batch_size, **options)


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def identity(batch: dict) -> dict:
    return batch


# -- option ranges --------------------------------------------------------------------------------


def test_the_smallest_valid_options_build_and_step():
    """batch 1, queue 1, one split, 1-d projection and hidden layer: the lower edges are allowed."""
    torch.manual_seed(0)
    moco = make(batch_size=1, queue_size=1, bn_splits=1, projection_dim=1, hidden_dim=1)
    assert moco.queue.shape == (1, 1) and moco.projector[2].out_features == 1
    out = moco({"image": images(1)}, identity)
    assert torch.isfinite(out["loss"])
    assert int(moco.queue_ptr) == 0  # one key into a queue of one: wrapped


def test_a_key_momentum_of_zero_makes_the_key_encoder_a_copy_of_the_query_encoder():
    torch.manual_seed(0)
    moco = make(key_momentum=0.0, shuffle_bn=False)
    with torch.no_grad():
        for p in moco.encoder.parameters():
            p.add_(torch.randn_like(p))
    moco({"image": images(4)}, identity)
    for query, key in zip(moco.encoder.parameters(), moco.key_encoder.parameters(), strict=True):
        assert torch.equal(query, key)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, r"batch_size must be at least 1, got 0"),
        ({"projection_dim": 0}, r"projection_dim must be at least 1, got 0"),
        ({"bn_splits": 0}, r"bn_splits must be at least 1, got 0"),
        ({"temperature": -0.2}, r"temperature must be positive, got -0\.2"),
        # the per-device batch is a whole number of images
        ({"batch_size": 6, "queue_size": 12, "bn_splits": 4}, r"bn_splits 4 does not divide the per-device batch size 6\.$"),
    ],
)
def test_options_below_their_range_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make(**options)


# -- the queue-size warning -----------------------------------------------------------------------


def test_a_queue_of_exactly_a_quarter_of_the_training_set_is_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(queue_size=32, dataset_size=128)


def test_a_queue_as_large_as_the_training_set_meets_one_stale_key_per_query():
    with pytest.warns(UserWarning, match=r"every query will meet about 1\.0 earlier keys of its own image"):
        make(queue_size=128, dataset_size=128)


def test_the_warning_points_at_the_line_that_built_the_objective():
    encoder = ThreeLevels()
    with pytest.warns(UserWarning, match="queue_size") as caught:
        MoCo(encoder=encoder, channels=encoder.channels, batch_size=4, queue_size=64, dataset_size=128)
    assert caught[0].filename == __file__


# -- head and queue -------------------------------------------------------------------------------


def test_the_head_reads_the_deepest_level_and_is_as_wide_by_default():
    moco = make()
    linear = [m for m in moco.projector.modules() if isinstance(m, nn.Linear)]
    assert linear[0].in_features == ThreeLevels.channels[-1]
    assert linear[0].out_features == ThreeLevels.channels[-1]  # hidden_dim None: the deepest width
    assert linear[-1].out_features == 8
    key_linear = [m for m in moco.key_projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in key_linear] == [(m.in_features, m.out_features) for m in linear]


def test_the_initial_queue_holds_unit_length_random_keys():
    torch.manual_seed(0)
    queue = make(queue_size=64, projection_dim=8).queue
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(64))  # each column, a key, has norm 1
    assert queue.std(dim=1).min() > 0.2  # not one key repeated


def test_keys_carry_no_gradient_even_when_asked_for_outside_a_step():
    moco = make()
    x = images(4).requires_grad_()
    keys = moco.encode_keys(x)
    assert not keys.requires_grad and keys.grad_fn is None


# -- what a step reports --------------------------------------------------------------------------


def test_the_step_reports_the_share_of_queries_that_pick_their_positive_and_its_mean_similarity():
    """With key momentum 0 and no shuffling, each key is its query (similarity 1, above any
    negative): every query picks its positive. The loss is InfoNCE over the queue as it was."""
    torch.manual_seed(0)
    moco = make(batch_size=8, queue_size=16, temperature=0.5, key_momentum=0.0, shuffle_bn=False)
    queue = moco.queue.clone()
    x = images(8, 3)
    out = moco({"image": x}, identity)
    with torch.no_grad():
        queries = F.normalize(moco.projector(moco.encoder(x)[-1]), dim=1)  # batch statistics, as in the step
    logits = torch.cat([torch.ones(8, 1), queries @ queue], dim=1) / 0.5
    assert (logits[:, 1:] < 2).all()
    torch.testing.assert_close(out["accuracy"], torch.tensor(1.0))
    torch.testing.assert_close(out["logit_positive"], torch.tensor(1.0))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))


def test_a_query_that_meets_itself_in_the_queue_has_not_picked_its_positive():
    """A negative identical to the query (similarity 1) beats a positive below 1."""
    torch.manual_seed(0)
    moco = make(batch_size=4, queue_size=8)
    with torch.no_grad():
        for p in moco.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    moco.eval()  # no update: the queue stays as set
    x = images(4, 5)
    with torch.no_grad():
        queries = F.normalize(moco.projector(moco.encoder(x)[-1]), dim=1)
        moco.queue[:, :4] = queries.T
    out = moco({"image": x}, identity)
    assert out["logit_positive"] < 0.999
    assert out["accuracy"].item() == 0.0
