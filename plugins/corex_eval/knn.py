"""Weighted kNN evaluation of an encoder: how good are its features, without any fine-tuning.

The classifier of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR 2018), which self-supervised learning reports next to linear probing (DINO,
solo-learn's ``WeightedKNNClassifier``, lightly's ``knn_predict``): each image's feature is the global
average of the encoder's deepest pyramid map, L2-normalised; a scored image's ``k`` nearest training
images by cosine similarity ``s`` vote for their class with weight ``exp(s / T)``; the class
probabilities are the normalised votes. The defaults, ``k = 20`` and ``T = 0.07``, are those of
solo-learn's ``WeightedKNNClassifier`` and of Wu et al. (lightly's ``knn_predict`` uses
``k = 200``, ``T = 0.1``; DINO reports ``k = 20`` with ``T = 0.07``).

The engine feeds the stage's training split through :meth:`KnnEvaluator.training_update` (the
feature bank) and then the scored split through :meth:`KnnEvaluator.update`, with the model, so the
evaluator runs in an evaluate stage right after a pretrain stage, on a model without heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from corex.errors import CorexError
from corex_eval.artefacts import number, slug, write_csv
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_blocks
from corex_eval.classification import weighted_metrics
from corex_eval.multilabel import macro, read_labels, score_labels

PREFIX = "knn"
CHUNK = 256  # scored images per similarity block: (CHUNK, bank images) float32, 80 MB for a bank of 80,000


def pooled_features(model: Any, images: Tensor) -> Tensor:
    """The L2-normalised global average of the encoder's deepest pyramid map, ``(B, C)`` float32."""
    with torch.no_grad():
        deepest = model.encoder(images)[-1]
    return F.normalize(deepest.float().mean(dim=(2, 3)), dim=1)


def knn_votes(queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int, temperature: float) -> Tensor:
    """Class probabilities ``(M, K)`` of the weighted kNN vote of single-label ``bank_labels`` ``(N,)``.

    ``queries`` ``(M, C)`` and ``bank`` ``(N, C)`` are L2-normalised; the ``min(k, N)`` most similar
    bank rows vote with weight ``exp(s / T)``. The weights are computed relative to each row's
    largest similarity, which changes no probability and keeps a small ``T`` from overflowing.
    """
    out = []
    for start in range(0, len(queries), CHUNK):
        similarity = queries[start:start + CHUNK] @ bank.T
        top = similarity.topk(min(k, len(bank)), dim=1)
        weights = ((top.values - top.values[:, :1]).double() / temperature).exp()
        votes = torch.zeros(len(similarity), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[top.indices], weights)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out) if out else torch.empty(0, num_classes, dtype=torch.float64)


def knn_label_scores(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int, temperature: float) -> Tensor:
    """Per-label scores ``(M, L)`` of multi-label ``bank_labels`` ``(N, L)`` (1, 0, -1 unknown).

    The ``min(k, N)`` nearest bank images are found once per scored image; for each label, those of
    them whose label is known vote, with weight ``exp(s / T)``, and the score is the weighted share of
    positives. Where none of the neighbours knows the label, the score is the label's share of
    positives among the bank's known entries (its prior).
    """
    known_all = bank_labels >= 0
    prior = ((bank_labels == 1).double().sum(0) / known_all.double().sum(0)).nan_to_num(0.0)
    out = []
    for start in range(0, len(queries), CHUNK):
        similarity = queries[start:start + CHUNK] @ bank.T
        top = similarity.topk(min(k, len(bank)), dim=1)
        weights = ((top.values - top.values[:, :1]).double() / temperature).exp()[:, :, None]  # (M, k, 1)
        neighbours = bank_labels[top.indices]  # (M, k, L)
        known = (neighbours >= 0).double()
        positive = (neighbours == 1).double()
        mass = (weights * known).sum(1)
        score = (weights * positive).sum(1) / mass
        out.append(torch.where(mass > 0, score, prior))
    return torch.cat(out) if out else torch.empty(0, bank_labels.shape[1], dtype=torch.float64)


class KnnEvaluator:
    """Weighted cosine kNN on pooled encoder features (see the module docstring).

    ``needs_model``: the engine passes the model, and the evaluator runs ``model.encoder(images)``
    itself, so the model needs no head. :meth:`training_update` adds the training split's labelled
    images to the feature bank (single-label data: ``label >= 0``; multi-label data, whose batches
    carry ``labels``: every image, unknown entries ignored per label); :meth:`update` collects the
    scored split's features; :meth:`compute` votes. :meth:`reset` keeps the bank;
    :meth:`reset_training` drops it.

    Single-label data (``label``): ``knn/accuracy``, ``knn/balanced_accuracy``, ``knn/macro_f1``
    and ``knn/auroc`` (macro one-vs-rest), with the conventions of the ``classification`` evaluator
    (:func:`corex_eval.classification.weighted_metrics`), on the vote probabilities. Multi-label data
    (``labels``): ``knn/auroc`` and ``knn/ap`` (the per-label scores' means over the labels with a
    known positive and a known negative, as the ``multilabel`` evaluator computes them) and
    ``knn/auroc/<label>``, ``knn/ap/<label>``. Both: ``knn/n`` scored units, ``knn/n_train`` bank images.

    ``level``: ``"study"`` (default) averages the vote probabilities of a study's images and scores
    each study once, as the ``classification`` evaluator does; ``"image"`` scores every image. The
    bank always holds images. Intervals: 95% patient-clustered bootstrap (``bootstrap`` resamples,
    ``seed``) of every macro metric.
    """

    needs_model = True

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        k: int = 20,
        temperature: float = 0.07,
        level: Literal["study", "image"] = "study",
        bootstrap: int = 1000,
        seed: int = 0,
        split: str = "test",
    ) -> None:
        slugs = [slug(name) for name in class_names]
        if not slugs:
            raise ValueError("class_names is empty: the knn evaluator needs the data's class names.")
        if "" in slugs or len(set(slugs)) != len(slugs):
            raise ValueError(f"class_names {list(class_names)!r} give clashing metric names {slugs!r}.")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if level not in ("study", "image"):
            raise ValueError(f"level must be 'study' or 'image', got {level!r}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        self.class_names = list(class_names)
        self.slugs = slugs
        self.k = k
        self.temperature = temperature
        self.level = level
        self.bootstrap = bootstrap
        self.seed = seed
        self.split = split
        self.multilabel: bool | None = None  # known from the first batch
        self.reset()
        self.reset_training()

    def reset(self) -> None:
        """Forget the scored split (the training features stay: see :meth:`reset_training`)."""
        self._scored = _FeatureStore()
        self._votes: _Scored | None = None  # compute, intervals and save vote once

    def reset_training(self) -> None:
        self._bank = _FeatureStore()
        self._votes = None

    def training_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        """Add the batch's labelled training images to the feature bank."""
        self._bank.add(*self._read(batch, model), batch)
        self._votes = None

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        self._scored.add(*self._read(batch, model), batch)
        self._votes = None

    def _read(self, batch: Mapping[str, Any], model: Any) -> tuple[Tensor, Tensor]:
        if model is None:
            raise ValueError("the knn evaluator needs the model (it sets needs_model): call it as update(batch, outputs, model=model).")
        multilabel = "labels" in batch
        if self.multilabel is None:
            self.multilabel = multilabel
        elif self.multilabel != multilabel:
            raise CorexError("knn: some batches carry multi-label 'labels' and others do not; the training and scored "
                             "splits must come from one kind of data")
        if multilabel:
            labels = read_labels(batch, len(self.class_names))
        else:
            labels = batch["label"].detach().long().cpu()
            if ((labels < -1) | (labels >= len(self.class_names))).any():
                raise ValueError(f"labels must lie in -1..{len(self.class_names) - 1}, got {labels.tolist()}.")
        return pooled_features(model, batch["image"]).cpu(), labels

    # -- scoring ----------------------------------------------------------------------------------

    def _bank_tensors(self) -> tuple[Tensor, Tensor]:
        features, labels = self._bank.tensors()
        if not self.multilabel:
            keep = labels >= 0
            features, labels = features[keep], labels[keep]
        if len(features) == 0:
            raise CorexError("knn: no labelled training image reached the evaluator, so there is nothing to vote with. In an "
                             "evaluate stage the engine streams the stage's training split through training_update first; "
                             "check that its training split is labelled (data.label_fraction), or call training_update "
                             "yourself from Python")
        return features, labels

    def scored(self) -> _Scored:
        """The scored units: ids, probabilities ``(N, K)`` (``(N, L)`` per-label scores for
        multi-label data), labels, bootstrap clusters and patients."""
        if self._votes is None:
            self._votes = self._vote()
        return self._votes

    def _vote(self) -> _Scored:
        features, labels = self._scored.tensors()
        if not self.multilabel:
            keep = labels >= 0
        else:
            keep = torch.ones(len(labels), dtype=torch.bool)
        if not bool(keep.any()):
            return _Scored([], torch.empty(0, len(self.class_names), dtype=torch.float64), labels[:0], torch.empty(0, dtype=torch.long), None)
        bank, bank_labels = self._bank_tensors()
        features = features[keep]
        if self.multilabel:
            probabilities = knn_label_scores(features, bank, bank_labels, self.k, self.temperature)
        else:
            probabilities = knn_votes(features, bank, bank_labels, len(self.class_names), self.k, self.temperature)
        return self._scored.units(self.level, keep, probabilities, labels[keep])

    def compute(self) -> dict[str, float]:
        scored = self.scored()
        counts = {f"{PREFIX}/n": float(len(scored.ids)), f"{PREFIX}/n_train": float(len(self._bank_tensors()[0]))}
        if not scored.ids:
            return dict.fromkeys(self._metric_names(), math.nan) | counts
        ones = torch.ones(1, len(scored.ids), dtype=torch.float64)
        return {name: float(value[0]) for name, value in self._weighted(scored, ones).items()} | counts

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling patients (each with all its studies)."""
        scored = self.scored()
        if self.bootstrap == 0 or not scored.ids:
            return {}
        values: dict[str, list[Tensor]] = {}
        for counts in resample_blocks(scored.clusters, self.bootstrap, self.seed):
            for name, value in self._weighted(scored, counts).items():
                if name.count("/") == 1:  # the macro metrics
                    values.setdefault(name, []).append(value)
        return percentile_intervals(values)

    def _weighted(self, scored: _Scored, weights: Tensor) -> dict[str, Tensor]:
        if self.multilabel:
            scores = score_labels(scored.probabilities, scored.labels, torch.full((len(self.class_names),), 0.5), weights)
            defined = scores["defined"]
            return {f"{PREFIX}/auroc": macro(scores["auroc/*"], defined), f"{PREFIX}/ap": macro(scores["ap/*"], defined),
                    **{f"{PREFIX}/auroc/{s}": scores["auroc/*"][:, c] for c, s in enumerate(self.slugs)},
                    **{f"{PREFIX}/ap/{s}": scores["ap/*"][:, c] for c, s in enumerate(self.slugs)}}
        metrics = weighted_metrics(scored.probabilities, scored.labels, weights)
        return {f"{PREFIX}/{name}": metrics[name] for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")}

    def _metric_names(self) -> list[str]:
        if self.multilabel:
            return [f"{PREFIX}/auroc", f"{PREFIX}/ap", *(f"{PREFIX}/{m}/{s}" for m in ("auroc", "ap") for s in self.slugs)]
        return [f"{PREFIX}/{name}" for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")]

    # -- artefacts --------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """Write ``knn_predictions.csv``: per scored study (or image), the label, the kNN prediction
        and every class's vote probability (multi-label: every label's score and target)."""
        scored = self.scored()
        if not scored.ids:
            return
        extra = ["patient_id"] if scored.patients is not None else []
        patient = (lambda i: [scored.patients[i]]) if scored.patients is not None else (lambda i: [])
        if self.multilabel:
            header = [f"{self.level}_id", *(f"p_{s}" for s in self.slugs), *(f"y_{s}" for s in self.slugs), *extra]
            rows = [[unit, *map(number, scored.probabilities[i].tolist()),
                     *("" if y < 0 else int(y) for y in scored.labels[i].tolist()), *patient(i)] for i, unit in enumerate(scored.ids)]
        else:
            header = [f"{self.level}_id", "label", "predicted", *(f"p_{s}" for s in self.slugs), *extra]
            predicted = scored.probabilities.argmax(1).tolist()
            rows = [[unit, self.class_names[int(scored.labels[i])], self.class_names[predicted[i]],
                     *map(number, scored.probabilities[i].tolist()), *patient(i)] for i, unit in enumerate(scored.ids)]
        write_csv(Path(out_dir) / "knn_predictions.csv", header, rows)


class _Scored:
    def __init__(self, ids: list[str], probabilities: Tensor, labels: Tensor, clusters: Tensor, patients: list[str] | None) -> None:
        self.ids, self.probabilities, self.labels, self.clusters, self.patients = ids, probabilities, labels, clusters, patients


class _FeatureStore:
    """Pooled features, labels (``(N,)`` or ``(N, L)``) and ids of the images seen so far."""

    def __init__(self) -> None:
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.study_ids: list[str] = []
        self.image_ids: list[str] = []
        self.patient_ids: list[str] | None = []

    def add(self, features: Tensor, labels: Tensor, batch: Mapping[str, Any]) -> None:
        self.features.append(features)
        self.labels.append(labels)
        self.study_ids += [str(s) for s in batch["study_id"]]
        self.image_ids += [str(i) for i in batch["image_id"]]
        patients = batch.get("patient_id")
        if patients is None or self.patient_ids is None:
            self.patient_ids = None
        else:
            self.patient_ids += [str(p) for p in patients]

    def tensors(self) -> tuple[Tensor, Tensor]:
        if not self.features:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat(self.features), torch.cat(self.labels)

    def units(self, level: str, keep: Tensor, probabilities: Tensor, labels: Tensor) -> _Scored:
        """Average the kept images' ``probabilities`` per study (or keep each image), in order of first sight."""
        index = keep.nonzero().flatten().tolist()
        keys = [(self.image_ids if level == "image" else self.study_ids)[i] for i in index]
        unit = cluster_index(keys)
        count = int(unit.max()) + 1
        first = torch.full((count,), len(unit), dtype=torch.long).scatter_reduce(0, unit, torch.arange(len(unit)), reduce="amin")
        unit_labels = labels[first]
        differ = unit_labels[unit] != labels
        disagree = (differ if differ.ndim == 1 else differ.any(1)).nonzero().flatten().tolist()
        if disagree:
            raise ValueError(f"study {keys[disagree[0]]!r} has images with different labels; score at level: image.")
        sizes = torch.bincount(unit, minlength=count).double()
        mean = torch.zeros(count, probabilities.shape[1], dtype=torch.float64).index_add_(0, unit, probabilities) / sizes[:, None]
        first_images = [index[i] for i in first.tolist()]
        patients = None if self.patient_ids is None else [self.patient_ids[i] for i in first_images]
        clusters = cluster_index(patients or [self.study_ids[i] for i in first_images])
        return _Scored(list(dict.fromkeys(keys)), mean, unit_labels, clusters, patients)
