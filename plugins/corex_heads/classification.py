"""Study-level classification head: global average pooling, dropout, linear."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
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
        self.norm = nn.BatchNorm1d(channels[-1], affine=False) if feature_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        # A mean, not AdaptiveAvgPool2d, whose CUDA backward fails under deterministic algorithms.
        pooled = features[-1].mean(dim=(2, 3))
        return self.fc(self.dropout(self.norm(pooled)))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy over the labelled samples; a graph-carrying zero when there are none."""
        labels = batch["label"].to(logits.device)
        if not bool((labels != -1).any()):
            return logits.sum() * 0
        return F.cross_entropy(
            logits.float(),
            labels,
            weight=self.class_weights,
            ignore_index=-1,
            label_smoothing=self.label_smoothing,
        )
