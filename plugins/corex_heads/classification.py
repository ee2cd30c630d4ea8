"""Study-level classification head: global average pooling, dropout, linear; single- or multi-label."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex.errors import CorexError
from corex.interfaces import Batch


class ClassificationHead(nn.Module):
    """Logits ``(B, num_classes)`` from the deepest feature map.

    The paper classifies each study as negative / typical / indeterminate / atypical with
    cross-entropy on a pooled ResNet/DenseNet feature. ``class_weights`` re-weight the
    cross-entropy per class (e.g. against the rarity of "atypical"); ``label_smoothing`` is
    torch's (Szegedy et al. 2016). Samples with ``label == -1`` carry no target and are ignored.

    ``feature_norm`` standardises the pooled features with a batch norm that has no affine
    parameters before the linear layer, as MAE's linear evaluation does (He et al. 2022): a linear
    probe on a frozen encoder otherwise faces features of arbitrary scale and, with an ordinary
    learning rate, learns little more than the class prior. Use it for ``freeze: true`` stages.

    ``multilabel`` (NIH ChestX-ray14, CheXpert): the ``num_classes`` outputs are independent
    findings, each a logit of "present". The target is the batch's ``labels`` ``(B, L)`` (1.0
    positive, 0.0 negative, -1.0 unknown or ignored, e.g. CheXpert's uncertain labels under
    ``uncertain: ignore``) and the loss is binary cross-entropy with logits averaged over the
    *known* entries only, each weighted by its label's ``class_weights`` entry when given
    (``sum w_l * bce / number of known entries``); ``label_smoothing`` ``e`` turns the targets into
    ``1 - e/2`` and ``e/2``. A batch with no known entry gives a graph-carrying zero. A single-label
    head refuses a batch with ``labels`` and no ``label`` (it would learn nothing).
    """

    task = "classification"

    def __init__(
        self,
        *,
        channels: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        feature_norm: bool = False,
        multilabel: bool = False,
    ):
        super().__init__()
        if num_classes < (1 if multilabel else 2):
            raise ValueError(f"num_classes must be at least {1 if multilabel else 2}, got {num_classes}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if class_weights is not None:
            if len(class_weights) != num_classes:
                raise ValueError(
                    f"class_weights has {len(class_weights)} entries {class_weights}, "
                    f"but there are {num_classes} classes."
                )
            if any(w <= 0 for w in class_weights):
                raise ValueError(f"class_weights must all be positive, got {class_weights}.")
            weights = torch.tensor(class_weights, dtype=torch.float32)
        else:
            weights = None
        # Not persistent: the weights are a recipe option, not learned state, so checkpoints stay
        # loadable whatever the weights were.
        self.register_buffer("class_weights", weights, persistent=False)
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.norm = nn.BatchNorm1d(channels[-1], affine=False) if feature_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        # A mean, not AdaptiveAvgPool2d, whose CUDA backward fails under deterministic algorithms.
        pooled = features[-1].mean(dim=(2, 3))
        return self.fc(self.dropout(self.norm(pooled)))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy over the labelled samples (binary cross-entropy over the known labels when
        ``multilabel``); a graph-carrying zero when there are none."""
        if self.multilabel:
            return self._multilabel_loss(logits, batch)
        labels = batch["label"].to(logits.device)
        if not bool((labels != -1).any()):
            if "labels" in batch:
                raise CorexError("the classification head is single-label, but the data is multi-label (its batches carry "
                                 "'labels' and every 'label' is -1): set multilabel: true on the head")
            return logits.sum() * 0
        return F.cross_entropy(
            logits.float(),
            labels,
            weight=self.class_weights,
            ignore_index=-1,
            label_smoothing=self.label_smoothing,
        )

    def _multilabel_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Binary cross-entropy with logits over the known entries of ``batch["labels"]``."""
        if "labels" not in batch:
            raise CorexError("the classification head has multilabel: true, but the batches carry no 'labels' (a "
                             "multi-label source such as nih_cxr14 or chexpert gives them); drop multilabel for single-label data")
        targets = batch["labels"].to(logits.device)
        if targets.shape != logits.shape:
            raise CorexError(f"the classification head gives {tuple(logits.shape)} logits but the batch's labels are "
                             f"{tuple(targets.shape)}: the head's classes and the data's labels differ")
        known = targets >= 0  # -1: unknown or ignored
        if not bool(known.any()):
            return logits.sum() * 0
        targets = targets.float().clamp(min=0)
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        if self.class_weights is not None:
            per_entry = per_entry * self.class_weights
        return per_entry[known].sum() / known.sum()
