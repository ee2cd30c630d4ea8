"""corex_moco: momentum update, queue contents and wrap-around, validation, checkpoint round trip,
learning on a toy set, shuffle BN on one device and across two gloo processes, and the cheaper
step's equivalence with the formulation it replaced (foreach momentum update, mask-free views)."""

from __future__ import annotations

import datetime
from copy import deepcopy
from itertools import chain, combinations
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import corex_kornia
import corex_moco
from corex.interfaces import Encoder, Objective
from corex.testing import assert_mirrors
from corex_moco import MoCo


class TinyEncoder(nn.Module):
    """Two conv + batch-norm stages: the smallest pyramid where batch norm can leak."""

    arch = "tiny"
    in_channels = 1
    channels = (8, 16)
    strides = (2, 4)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.stem(x)
        return [a, self.down(a)]


def make_moco(batch_size: int = 4, **options) -> MoCo:
    options = {"queue_size": 8, "projection_dim": 8, **options}
    encoder = TinyEncoder()
    return MoCo(encoder=encoder, channels=encoder.channels, batch_size=batch_size, **options)


def identity(batch: dict) -> dict:
    return batch


def images(n: int, seed: int) -> Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_keys(moco: MoCo, x: Tensor) -> Tensor:
    """Keys without any shuffling, straight through the key encoder and head."""
    with torch.no_grad():
        return F.normalize(moco.key_projector(moco.key_encoder(x)[-1]), dim=1)


def key_parameters(moco: MoCo) -> list[nn.Parameter]:
    return list(chain(moco.key_encoder.parameters(), moco.key_projector.parameters()))


def query_parameters(moco: MoCo) -> list[nn.Parameter]:
    return list(chain(moco.encoder.parameters(), moco.projector.parameters()))


def perturb_queries(moco: MoCo) -> None:
    """Move the query encoder away from its key copy, so keys and queries differ."""
    with torch.no_grad():
        for p in query_parameters(moco):
            p.add_(0.2 * torch.randn_like(p))


def record_keys(moco: MoCo) -> list[Tensor]:
    """Capture the keys each step computes (the instance attribute shadows the method)."""
    seen: list[Tensor] = []
    encode = moco.encode_keys

    def recording(x: Tensor) -> Tensor:
        seen.append(encode(x))
        return seen[-1]

    moco.encode_keys = recording
    return seen


# -- registration and options ---------------------------------------------------------------------


def test_registered_and_satisfies_protocols():
    moco = make_moco()
    factory = corex_moco.corex_objectives()["moco"]
    assert factory is corex_moco.moco_objective
    assert_mirrors(factory, MoCo)
    assert isinstance(factory(encoder=moco.encoder, channels=moco.encoder.channels, batch_size=4, queue_size=8), MoCo)
    assert isinstance(moco, Objective) and isinstance(moco.key_encoder, Encoder)
    assert all(not p.requires_grad for p in key_parameters(moco))
    assert {"queue", "queue_ptr"} <= set(moco.state_dict())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_momentum": 1.0}, r"key_momentum .* got 1\.0"),
        ({"key_momentum": -0.1}, r"key_momentum .* got -0\.1"),
        ({"temperature": 0.0}, r"temperature .* got 0\.0"),
        ({"queue_size": 10}, r"queue_size 10 is not divisible by the batch size 4"),
        ({"queue_size": 0}, r"queue_size must be at least 1, got 0"),
        ({"bn_splits": 3}, r"bn_splits 3 does not divide the per-device batch size 4"),
        ({"hidden_dim": 0}, r"hidden_dim .* got 0"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        make_moco(**options)


def test_hidden_dim_defaults_to_the_deepest_channel_count():
    assert make_moco().projector[2].out_features == TinyEncoder.channels[-1]
    assert make_moco(hidden_dim=32).projector[2].out_features == 32
    assert make_moco(projection_dim=5, queue_size=4).queue.shape == (5, 4)


# -- the key encoder ------------------------------------------------------------------------------


def test_key_encoder_follows_the_momentum_update_and_takes_no_gradient():
    torch.manual_seed(0)
    moco = make_moco(key_momentum=0.9, shuffle_bn=False)
    perturb_queries(moco)
    old_keys = [p.clone() for p in key_parameters(moco)]
    queries_before_step = [p.detach().clone() for p in query_parameters(moco)]
    optimizer = torch.optim.SGD(query_parameters(moco), lr=0.5)

    moco({"image": images(4, 1)}, identity)["loss"].backward()
    optimizer.step()

    assert all(p.grad is None for p in key_parameters(moco))
    moved = [not torch.equal(p, q) for p, q in zip(query_parameters(moco), queries_before_step)]
    assert any(moved)  # so the check below tells "before" from "after" the optimizer step
    for key, old, query in zip(key_parameters(moco), old_keys, queries_before_step):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query)


def test_eval_mode_changes_neither_key_encoder_nor_queue():
    torch.manual_seed(0)
    moco = make_moco(key_momentum=0.5)
    perturb_queries(moco)
    before = {k: v.clone() for k, v in moco.state_dict().items()}
    moco.eval()
    out = moco({"image": images(4, 1)}, identity)
    assert torch.isfinite(out["loss"])
    for name, value in moco.state_dict().items():
        assert torch.equal(value, before[name]), name


# -- the queue ------------------------------------------------------------------------------------


def test_queue_holds_the_keys_not_the_queries():
    torch.manual_seed(0)
    moco = make_moco(key_momentum=0.5, shuffle_bn=False)
    perturb_queries(moco)
    x = images(4, 1)
    untouched = moco.queue[:, 4:].clone()

    moco({"image": x}, identity)

    enqueued = moco.queue[:, :4].T
    with torch.no_grad():  # train mode, so batch statistics as in the step
        queries = F.normalize(moco.projector(moco.encoder(x)[-1]), dim=1)
    torch.testing.assert_close(enqueued, plain_keys(moco, x))
    assert (enqueued - queries).abs().max() > 1e-2
    assert torch.equal(moco.queue[:, 4:], untouched)
    assert int(moco.queue_ptr) == 4


def test_queue_wraps_around():
    torch.manual_seed(0)
    moco = make_moco(queue_size=8, batch_size=4)
    keys = record_keys(moco)
    pointers = []
    for step in range(3):
        moco({"image": images(4, step)}, identity)
        pointers.append(int(moco.queue_ptr))
    assert pointers == [4, 0, 4]
    torch.testing.assert_close(moco.queue[:, :4].T, keys[2])  # step 3 overwrote step 1
    torch.testing.assert_close(moco.queue[:, 4:].T, keys[1])

    # An uneven batch (the engine drops them, but be robust) wraps column by column.
    moco({"image": images(6, 3)}, identity)
    assert int(moco.queue_ptr) == 2
    torch.testing.assert_close(moco.queue[:, [4, 5, 6, 7, 0, 1]].T, keys[3])
    torch.testing.assert_close(moco.queue[:, 2:4].T, keys[2][2:])


def test_state_dict_round_trip_restores_queue_pointer_and_loss():
    torch.manual_seed(0)
    trained = make_moco(key_momentum=0.5)
    for step in range(3):
        trained({"image": images(4, step)}, identity)
    restored = make_moco(key_momentum=0.5)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.queue, trained.queue)
    assert int(restored.queue_ptr) == int(trained.queue_ptr) == 4

    losses = []
    for moco in (trained, restored):
        torch.manual_seed(7)  # same views and same key permutation
        losses.append(moco({"image": images(4, 9)}, noisy_shift)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)


# -- shuffle BN on one device ---------------------------------------------------------------------


def test_split_bn_normalises_each_key_with_a_random_sub_batch_and_unshuffles():
    torch.manual_seed(0)
    moco = make_moco(bn_splits=2)
    x = images(4, 1)

    keys = moco.encode_keys(x)  # train mode: batch statistics of 2-image sub-batches
    assert (keys - plain_keys(moco, x)).abs().max() > 1e-3  # not the whole batch's statistics
    partners = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        pair_keys = [plain_keys(moco, x[[i, j]])[0] for j in others]  # key i beside image j
        matches = [j for j, k in zip(others, pair_keys) if torch.allclose(keys[i], k, atol=1e-5)]
        assert len(matches) == 1, f"key {i} was not normalised with exactly one other image"
        partners.append(matches[0])
    assert all(partners[partners[i]] == i for i in range(4))  # two disjoint sub-batches

    moco.eval()  # running statistics: shuffling must change nothing, so un-shuffling is exact
    x = images(8, 2)  # 8 images, so a wrong un-shuffle (e.g. order for its inverse) shows
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(moco.encode_keys(x), plain_keys(moco, x))


def test_both_views_are_encoded_in_sub_batches():
    moco = make_moco(batch_size=8, queue_size=8, bn_splits=4)
    sizes: dict[str, list[int]] = {"query": [], "key": []}
    moco.encoder.register_forward_pre_hook(lambda _, args: sizes["query"].append(len(args[0])))
    moco.key_encoder.register_forward_pre_hook(lambda _, args: sizes["key"].append(len(args[0])))
    moco({"image": images(8, 1)}, identity)
    assert sizes == {"query": [2, 2, 2, 2], "key": [2, 2, 2, 2]}


# -- step cost: cheaper formulations that compute the same ------------------------------------------


def test_foreach_momentum_update_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    moco = make_moco(key_momentum=0.99)
    perturb_queries(moco)
    expected = []
    with torch.no_grad():
        for key, query in zip(key_parameters(moco), query_parameters(moco), strict=True):
            expected.append(key.clone().mul_(0.99).add_(query, alpha=1 - 0.99))
    moco.momentum_update(moco.key_momentum)
    for key, want in zip(key_parameters(moco), expected, strict=True):
        assert torch.equal(key, want)


def test_momentum_update_follows_parameters_replaced_by_to():
    torch.manual_seed(0)
    moco = make_moco(key_momentum=0.5)
    moco.momentum_update(moco.key_momentum)  # fills the cached parameter lists
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() makes new Parameters
    try:
        moco.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    perturb_queries(moco)
    old_keys = [p.clone() for p in key_parameters(moco)]
    moco.momentum_update(moco.key_momentum)
    for key, old, query in zip(key_parameters(moco), old_keys, query_parameters(moco), strict=True):
        torch.testing.assert_close(key, 0.5 * old + 0.5 * query)


def test_views_are_two_independent_augmentation_calls_without_the_mask():
    calls = []

    def recording(batch: dict) -> dict:
        calls.append(dict(batch))
        return noisy_shift(batch)

    moco = make_moco()
    x = images(4, 1)
    moco({"image": x, "mask": (x > 0.5).float(), "label": torch.zeros(4)}, recording)
    assert len(calls) == 2
    for batch in calls:
        assert "mask" not in batch and batch["image"] is x and "label" in batch


def test_leaving_out_the_mask_does_not_change_the_kornia_views():
    moco_cxr = corex_kornia.moco_cxr()
    x = images(4, 1)
    torch.manual_seed(3)
    with_mask = moco_cxr({"image": x, "mask": (x > 0.5).float()})["image"]
    torch.manual_seed(3)
    without = moco_cxr({"image": x})["image"]
    assert torch.equal(with_mask, without)


# -- learning -------------------------------------------------------------------------------------


def noisy_shift(batch: dict) -> dict:
    """A toy augmentation: shift by up to 3 pixels (circularly) and add noise."""
    x = batch["image"]
    dy, dx = torch.randint(-3, 4, (2,)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) + 0.05 * torch.randn_like(x)
    return {**batch, "image": x}


def test_learns_to_pick_the_positive_on_a_toy_set():
    torch.manual_seed(0)
    blobs = torch.rand(128, 1, 4, 4, generator=torch.Generator().manual_seed(123))
    pool = F.interpolate(blobs, size=32, mode="bilinear", align_corners=False)  # distinct, smooth
    moco = make_moco(batch_size=16, queue_size=32, key_momentum=0.9, temperature=0.2)
    optimizer = torch.optim.Adam(query_parameters(moco), lr=3e-3)
    losses, accuracies = [], []
    for _ in range(40):
        out = moco({"image": pool[torch.randperm(128)[:16]]}, noisy_shift)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
        accuracies.append(out["accuracy"].item())

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    # Start counting once the queue holds real keys (2 steps): until then its negatives are the
    # random initial vectors, which are easy to beat.
    assert mean(losses[-5:]) < mean(losses[2:7]) - 0.4, losses
    assert mean(accuracies[-5:]) > 0.2, accuracies  # chance is 1/33


# -- shuffle BN across processes ------------------------------------------------------------------


def _distributed_step(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)  # identical weights and queue on both ranks, as DDP would make them
        moco = make_moco(batch_size=4 * world_size, queue_size=16)
        keys = record_keys(moco)
        sizes: dict[str, list[int]] = {"query": [], "key": []}
        moco.encoder.register_forward_pre_hook(lambda _, args: sizes["query"].append(len(args[0])))
        moco.key_encoder.register_forward_pre_hook(lambda _, args: sizes["key"].append(len(args[0])))
        queue_before = moco.queue.clone()
        x = images(4, 100 + rank)  # each rank its own images
        model = nn.parallel.DistributedDataParallel(moco)
        out = model({"image": x}, identity)
        out["loss"].backward()
        calls = {name: list(values) for name, values in sizes.items()}

        # Which split of the global batch into two halves of 4 gives this rank's keys, each key
        # normalised with the half its image went to? (Train mode: batch statistics.)
        copy = deepcopy(moco)
        every_image = torch.cat([images(4, 100 + r) for r in range(world_size)])
        mine = range(4 * rank, 4 * rank + 4)
        halves = []
        for half in combinations(range(8), 4):
            other = [i for i in range(8) if i not in half]
            found = torch.empty(8, keys[0].shape[1])
            found[list(half)] = plain_keys(copy, every_image[list(half)])
            found[other] = plain_keys(copy, every_image[other])
            if torch.allclose(found[list(mine)], keys[0], atol=1e-5):
                halves.append(half)
        # Queries: this rank's batch, encoded as one batch, against the queue before the step.
        with torch.no_grad():
            queries = F.normalize(copy.projector(copy.encoder(x)[-1]), dim=1)
        logits = torch.cat([(queries * keys[0]).sum(1, keepdim=True), queries @ queue_before], dim=1) / copy.temperature
        loss_error = (out["loss"] - F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))).abs().item()
        plain_train = plain_keys(moco, x)  # this rank's batch statistics, no shuffle

        # Running statistics: the cross-rank shuffle must be invisible, once every rank holds
        # rank 0's buffers (what DDP broadcasts before each forward).
        for buffer in moco.key_encoder.buffers():
            dist.broadcast(buffer, src=0)
        moco.eval()
        shuffled_eval, plain_eval = moco.encode_keys(x), plain_keys(moco, x)
        torch.save(
            {"queue": moco.queue, "ptr": moco.queue_ptr, "keys": keys[0],
             "plain_train": plain_train, "shuffled_eval": shuffled_eval, "plain_eval": plain_eval,
             "calls": calls, "halves": halves, "loss_error": loss_error},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_across_two_gloo_processes(tmp_path):
    mp.spawn(_distributed_step, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert int(ranks[0]["ptr"]) == int(ranks[1]["ptr"]) == 8
    global_keys = torch.cat([ranks[0]["keys"], ranks[1]["keys"]])  # rank order
    torch.testing.assert_close(ranks[0]["queue"][:, :8].T, global_keys)
    for r in ranks:
        assert (r["keys"] - r["plain_train"]).abs().max() > 1e-3  # other ranks' images shared BN
        torch.testing.assert_close(r["shuffled_eval"], r["plain_eval"])
        # Each rank encodes its own queries in one batch and its slice of the shuffled global
        # batch of keys in one batch (no local sub-batches on top)...
        assert r["calls"] == {"query": [4], "key": [4]}
        assert r["loss_error"] < 1e-5
    # ...and both ranks' keys come from one split of the 8 images into two halves.
    assert set(ranks[0]["halves"]) & set(ranks[1]["halves"])


def test_a_queue_that_outgrows_the_training_set_is_warned_about():
    """With a queue of q keys, about q / N queries meet their own image's stale key as a negative."""
    import warnings

    with pytest.warns(UserWarning, match=r"queue_size 64 against 128 training images: about 50% of the queries.*at most 32"):
        make_moco(queue_size=64, dataset_size=128)
    with pytest.warns(UserWarning, match=r"every query will meet about 2.0 earlier keys of its own image"):
        make_moco(queue_size=256, dataset_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_moco(queue_size=16, dataset_size=128)  # 12.5%: fine
        make_moco(queue_size=64)  # size unknown: no opinion
