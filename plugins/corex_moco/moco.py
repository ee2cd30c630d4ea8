"""MoCo v2: momentum contrast with a queue of negative keys.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020 (MoCo), and Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrast
Learning", arXiv 2003.04297, 2020 (MoCo v2).

Two augmented views of each image go through two encoders. The query encoder (the shared
encoder, which is what transfers) is trained by back-propagation; the key encoder is a copy of it
that only follows by a moving average. A query must pick its own key (the positive) out of the
queue of keys from earlier batches (the negatives), with the InfoNCE loss (He et al., eq. 1):

    L_q = -log exp(q.k+ / T) / sum_{i=0..K} exp(q.k_i / T)

Reference settings: ImageNet-1M, ResNet-50, SGD lr 0.03 (momentum 0.9, weight decay 1e-4) for a
batch of 256 on 8 GPUs, 200 epochs; queue K = 65536, key momentum m = 0.999, temperature
T = 0.07 (v1) or 0.2 (v2, with the MLP head); v2's head is 2048-2048-128.

For chest X-rays, MoCo-CXR (Sowrirajan, Yang, Ng, Rajpurkar, MIDL 2021) pre-trained ResNet-18
and DenseNet-121 from ImageNet weights with the v2 head and T = 0.2; its released scripts
(stanfordmlgroup/MoCo-CXR) use Adam, lr 1e-4, batch 16, 20 epochs, a queue of 24576 and small
rotations instead of crops and colour jitter. Those are the scripts' values; we have not checked
each of them against the paper's text.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from corex.interfaces import Batch
from corex_ssl import MomentumObjective, momentum_copy
from corex_ssl import projection_head as mlp_head


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order). Not differentiable:
    only keys go through it, and they carry no gradient."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def projection_head(in_features: int, hidden_dim: int, projection_dim: int) -> nn.Sequential:
    """MoCo v2's head on the deepest feature map: global average pool -> Linear -> ReLU -> Linear.

    Chen et al. 2020: "we replace the fc head in MoCo with a 2-layer MLP head (hidden layer
    2048-d, with ReLU)", i.e. 2048-2048-128 on a ResNet-50.
    """
    return mlp_head(in_features, hidden_dim, projection_dim)


# Warn when the queue exceeds this share of the training set (see the check in MoCo.__init__).
STALE_KEY_SHARE = 0.25

class MoCo(MomentumObjective):
    """The MoCo v2 objective around the shared (query) encoder.

    Options (defaults are MoCo v2's):

    * ``key_momentum`` (0.999): m in He et al.'s eq. 2, "theta_k <- m theta_k + (1 - m) theta_q
      ... m in [0, 1) is a momentum coefficient"; the weight kept by the OLD key parameters.
      Some libraries store the weight of the new value instead, 1 - m (PyTorch's BatchNorm
      ``momentum``, MMEngine's ``ExponentialMovingAverage``): 0.999 here is 0.001 there.
    * ``temperature`` (0.2): T; 0.07 in MoCo v1, 0.2 in v2 with the MLP head.
    * ``queue_size`` (65536): K negative keys; must be divisible by the global batch size so the
      queue is overwritten in whole batches, as in the reference implementation.
    * ``projection_dim`` (128) and ``hidden_dim`` (None: the encoder's deepest channel count,
      so the head is 2048-2048-128 on a ResNet-50 and scales with the encoder's width).
    * ``shuffle_bn`` (True) and ``bn_splits`` (2): the remedy for batch-norm leakage, below.

    Batch-norm leakage. He et al., section 3.3: "we found that using BN prevents the model from
    learning good representations ... The model appears to 'cheat' the pretext task and easily
    finds a low-loss solution. This is possibly because the intra-batch communication among
    samples (caused by BN) leaks information." A query and its positive key normalised with the
    statistics of the same images share a signature that the queue's negatives (from earlier
    batches) lack. The reference shuffles the keys across its 8 GPUs, so that each key is
    normalised with a random sub-batch rather than its query's.

    * Under ``torch.distributed`` (world size > 1) this is done exactly: the key images of all
      ranks are gathered, permuted by rank 0's random permutation, each rank encodes its slice of
      the permuted batch, and the keys are gathered back and un-shuffled. Needs the same batch
      size on every rank (the engine drops the last, uneven, batch in pre-training). Wrap the
      objective in DDP with ``broadcast_buffers`` (the default), as the reference does: each rank
      then starts every step from rank 0's queue and key-encoder running statistics.
    * On one device it is emulated, like the split batch norm of the reference's single-GPU CIFAR
      demo: both views are encoded in ``bn_splits`` sub-batches, so every batch-norm layer
      normalises each sub-batch with its own statistics, as each GPU does in the reference. The
      queries go in order; the keys go as a random permutation and are un-shuffled afterwards,
      so a key's sub-batch is a random set of images that shares on average only 1/bn_splits of
      its images with its query's sub-batch. Limits: (1) the leak is weakened, not removed: some
      overlap remains (as with the reference's 8 GPUs), and all keys still come from the current
      batch; (2) statistics over batch/bn_splits samples are noisier, so keep sub-batches of 8
      or more; (3) the encoder's batch-norm running statistics are updated once per sub-batch;
      (4) bn_splits forward passes per view cost a few percent more than one (one pass with
      grouped batch-norm calls was measured no faster on a CPU at batch 16, so it was not
      kept). The encoder itself is left untouched (no layer surgery), so what transfers loads
      without key renaming.
      ``bn_splits=1`` or ``shuffle_bn=False`` turns it off (fine for encoders without batch norm).

    The key encoder and key head are deep copies of the query ones, made at construction (build
    the objective after loading any initial weights into the encoder); they take no gradients.
    In training mode each step first moves their parameters by the momentum update, then computes
    the keys (as in the reference). The key encoder runs in the module's mode, so in training its
    batch norm uses batch statistics; its running statistics are its own, accumulated from the
    key views, as in the reference (only parameters are averaged, since running statistics
    estimated under one set of weights do not fit another). They are only used in eval mode, and
    only the query encoder transfers. After the loss, the keys (of all ranks) replace the oldest
    queue columns. In eval mode nothing is updated: the loss is measured against the current
    queue. The queue and its pointer are buffers, so they are checkpointed and restored on resume.

    The views are made by two calls of the augmentation, so they are independent draws whatever the
    augmentation (one call on a doubled batch would tie them for one that draws once per batch).
    The batch's ``mask`` is not passed to it: MoCo never uses the views' masks, and warping them
    took close to half of each augmentation call (the images come out the same without it). The
    momentum update is corex_ssl's (:class:`corex_ssl.MomentumObjective`), over the pairs
    :meth:`momentum_pairs` names.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        channels: Sequence[int],
        batch_size: int,
        key_momentum: float = 0.999,
        temperature: float = 0.2,
        queue_size: int = 65536,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        shuffle_bn: bool = True,
        bn_splits: int = 2,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= key_momentum < 1.0:
            raise ValueError(
                f"key_momentum must be in [0, 1) (the weight of the old key-encoder parameters; "
                f"0.999 in MoCo), got {key_momentum}."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}.")
        if queue_size % batch_size:
            raise ValueError(
                f"queue_size {queue_size} is not divisible by the batch size {batch_size}."
            )
        if dataset_size and queue_size > STALE_KEY_SHARE * dataset_size:
            # An image comes back about once an epoch, so a queue of q keys holds its own earlier
            # key for about q / N of the queries: a negative that is the positive's own image.
            ratio = queue_size / dataset_size
            if ratio >= 1:
                detail = f"every query will meet about {ratio:.1f} earlier keys of its own image as negatives"
            else:
                detail = f"about {ratio:.0%} of the queries will meet their own image's key from an earlier epoch as a negative"
            warnings.warn(
                f"queue_size {queue_size} against {dataset_size} training images: {detail} "
                f"(MoCo on ImageNet: 5%). Use a queue of at most {int(STALE_KEY_SHARE * dataset_size)} here.",
                stacklevel=2,
            )
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be at least 1, got {projection_dim}.")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"hidden_dim must be at least 1 (or None), got {hidden_dim}.")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be at least 1, got {bn_splits}.")
        device_batch = batch_size // _world_size()
        if shuffle_bn and _world_size() == 1 and device_batch % bn_splits:
            raise ValueError(
                f"bn_splits {bn_splits} does not divide the per-device batch size {device_batch}."
            )

        self.key_momentum = key_momentum
        self.temperature = temperature
        self.queue_size = queue_size
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits

        self.encoder = encoder
        self.projector = projection_head(channels[-1], hidden_dim or channels[-1], projection_dim)
        self.key_encoder = momentum_copy(encoder)
        self.key_projector = momentum_copy(self.projector)

        self.register_buffer("queue", F.normalize(torch.randn(projection_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- the step ---------------------------------------------------------------------------------

    def forward(self, batch: Batch, augment: Callable[[Batch], Batch]) -> Mapping[str, Tensor]:
        images = {key: value for key, value in batch.items() if key != "mask"}
        with torch.no_grad():
            query_view = augment(images)["image"]
            key_view = augment(images)["image"]

        queries = self._project(self.encoder, self.projector, query_view, self._local_splits())
        with torch.no_grad():
            if self.training:
                self.momentum_update(self.key_momentum)
            keys = self.encode_keys(key_view)

        positive = (queries * keys).sum(dim=1, keepdim=True)
        # A copy, because the queue is overwritten in place below while autograd still needs it.
        negative = queries @ self.queue.clone()
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)

        if self.training:
            self._enqueue(keys)
        return {
            "loss": loss,
            "accuracy": (logits.argmax(dim=1) == 0).float().mean().detach(),
            "logit_positive": positive.mean().detach(),
        }

    @torch.no_grad()
    def encode_keys(self, images: Tensor) -> Tensor:
        """L2-normalised key projections of ``images``, in their order, with shuffled batch norm."""
        if self.shuffle_bn and _world_size() > 1:
            return self._encode_keys_across_ranks(images)
        if self.shuffle_bn and self.bn_splits > 1:
            order = torch.randperm(len(images), device=images.device)
            shuffled = images[order]
            keys = self._project(self.key_encoder, self.key_projector, shuffled, self.bn_splits)
            return keys[torch.argsort(order)]  # un-shuffle
        return self._project(self.key_encoder, self.key_projector, images, 1)

    # -- pieces -----------------------------------------------------------------------------------

    def _local_splits(self) -> int:
        """Sub-batches for batch norm on this device: bn_splits only when emulating shuffle BN."""
        return self.bn_splits if self.shuffle_bn and _world_size() == 1 else 1

    @staticmethod
    def _project(encoder: nn.Module, projector: nn.Module, images: Tensor, splits: int) -> Tensor:
        chunks = images.tensor_split(splits) if splits > 1 else (images,)
        return F.normalize(torch.cat([projector(encoder(chunk)[-1]) for chunk in chunks]), dim=1)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The key encoder and key head follow the query ones (corex_ssl.MomentumObjective)."""
        return [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]

    @torch.no_grad()
    def _encode_keys_across_ranks(self, images: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        every_image = _gather(images)
        order = torch.randperm(len(every_image), device=images.device)
        dist.broadcast(order, src=0)  # one permutation for all ranks
        my_slice = order.view(world, -1)[rank]
        keys = self._project(self.key_encoder, self.key_projector, every_image[my_slice], 1)
        every_key = _gather(keys)[torch.argsort(order)]  # back to the gathered images' order
        return every_key.view(world, len(images), -1)[rank]

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Overwrite the oldest columns with the keys of the global batch, wrapping around."""
        if _world_size() > 1:
            keys = _gather(keys)
        keys = keys[-self.queue_size :]  # only if a batch is ever larger than the queue
        # Pointer arithmetic on the device: no read back to the host (a GPU sync) per step.
        columns = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % self.queue_size
        self.queue.index_copy_(1, columns, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(len(keys)).remainder_(self.queue_size)
