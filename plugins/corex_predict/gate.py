"""The input gate: is this input something the model was made for?

Two checks, both reported as ``flags`` (plain phrases, ``"; "``-joined, empty when the input passes):

* **Header checks** (:func:`header_flags`) from the DICOM header (``corex_cxr.read_header``) or from
  the ``meta`` a corex_cxr source puts in every batch: ``Modality`` must be ``CR`` or ``DX``
  (``modality=MR``), ``BodyPartExamined`` ``CHEST`` (``body_part=KNEE``), ``ViewPosition`` not a
  lateral view (``view=LL``). A field that is absent is not a flag: many real chest radiographs
  carry no ``BodyPartExamined``, and a PNG carries no header at all.
* **An out-of-distribution score** (:class:`InputGate`): the Mahalanobis distance of the image's
  pooled encoder features (the global average of pyramid level ``level``, default the deepest) from
  the training split's, ``sqrt((f - mean)^T P (f - mean))``, with ``P`` the inverse of the
  Ledoit-Wolf shrunk covariance of the training features (Lee et al., "A Simple Unified Framework
  for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018, on the
  penultimate features; Ledoit and Wolf, J. Multivariate Anal. 2004, as scikit-learn's
  ``LedoitWolf`` computes it). The threshold is the ``1 - false_alarm_rate`` quantile of the
  validation split's scores (the smallest score that at most that share of validation images
  exceed), so in-distribution inputs are flagged at about that rate:
  ``out_of_distribution score 123.4 > 56.7``.

The gate is fitted by the ``input_gate`` evaluator (:class:`GateEvaluator`) in an evaluate stage:
the engine streams the training split through ``training_update`` (the features), the validation
split through ``calibration_update`` (the threshold), then the scored split through ``update`` (the
share of flagged images is its metric); ``save`` writes ``input_gate.pt`` (weights-only torch file)
and ``input_gate.json`` into the stage's folder. ``corex export`` carries it into the export and
``corex predict`` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corex import rundir
from corex.errors import CorexError

GATE_FORMAT = "corex-input-gate/1"
GATE_FILE = "input_gate.pt"
GATE_SUMMARY = "input_gate.json"
GATE_SCORES = "input_gate.csv"
PREFIX = "input_gate"

CHEST_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = ("CHEST", "THORAX")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT")
HEADER_FIELDS = ("modality", "body_part", "view")  # as corex_cxr.metadata names them


# -- header checks -----------------------------------------------------------------------------------


def header_fields(header: Any) -> dict[str, str]:
    """``modality``, ``body_part`` and ``view`` (upper-cased, ``""`` when absent) of a DICOM header
    (anything with ``.get(keyword)``: a pydicom ``Dataset`` or a dict)."""

    def text(keyword: str) -> str:
        try:
            value = header.get(keyword)
        except Exception:  # noqa: BLE001 -- a damaged element is an absent one here
            return ""
        return "" if value is None else str(value).strip().upper()

    return {"modality": text("Modality"), "body_part": text("BodyPartExamined"), "view": text("ViewPosition")}


def header_flags(fields: Mapping[str, Any]) -> list[str]:
    """The header checks' flags for ``{"modality", "body_part", "view"}`` (absent or empty: no flag)."""
    flags = []
    modality = str(fields.get("modality") or "").strip().upper()
    body_part = str(fields.get("body_part") or "").strip().upper()
    view = str(fields.get("view") or "").strip().upper()
    if modality and modality not in CHEST_MODALITIES:
        flags.append(f"modality={modality}")
    if body_part and body_part not in CHEST_BODY_PARTS:
        flags.append(f"body_part={body_part}")
    if view and view in LATERAL_VIEWS:
        flags.append(f"view={view}")
    return flags


def score_flag(score: float, threshold: float) -> str | None:
    """``out_of_distribution score S > T`` when ``score`` exceeds ``threshold`` (a NaN score too)."""
    if math.isnan(score) or score > threshold:
        return f"out_of_distribution score {_number(score)} > {_number(threshold)}"
    return None


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


# -- the fitted gate ---------------------------------------------------------------------------------


def pooled(features: Sequence[Tensor], level: int) -> Tensor:
    """The global average of pyramid map ``level``, ``(B, C)`` float32."""
    try:
        chosen = features[level]
    except IndexError:
        raise CorexError(f"input_gate: level {level} does not exist: the encoder's pyramid has {len(features)} levels "
                         f"({-len(features)} to {len(features) - 1})") from None
    return chosen.float().mean(dim=(2, 3))


def mahalanobis(features: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """``sqrt((f - mean)^T P (f - mean))`` per row of ``features`` ``(B, C)``, in ``features``' dtype.
    The same arithmetic the exported graphs hold, so a ``.pt``, ONNX and TorchScript model agree."""
    centred = features - mean.to(features)
    return ((centred @ precision.to(features)) * centred).sum(dim=1).clamp(min=0).sqrt()


def ledoit_wolf(features: Tensor) -> tuple[Tensor, Tensor, float]:
    """Mean, shrunk covariance and shrinkage of ``features`` ``(N, C)`` in float64, exactly as
    scikit-learn's ``LedoitWolf`` (biased empirical covariance shrunk towards ``mu * I``)."""
    x = features.double()
    n, p = x.shape
    mean = x.mean(0)
    x = x - mean
    covariance = x.T @ x / n
    squared = x * x
    trace_diagonal = squared.sum(0) / n
    mu = float(trace_diagonal.sum()) / p
    beta_sum = float((squared.T @ squared).sum())
    delta_sum = float(((x.T @ x) ** 2).sum()) / n ** 2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2.0 * mu * float(trace_diagonal.sum()) + p * mu ** 2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * mu * torch.eye(p, dtype=torch.float64)
    return mean, shrunk, shrinkage


def quantile_threshold(scores: Tensor, false_alarm_rate: float) -> float:
    """The smallest score that at most ``false_alarm_rate`` of ``scores`` exceed (``numpy.quantile``
    with ``method="higher"`` at ``1 - false_alarm_rate``)."""
    ordered = scores.double().sort().values
    n = len(ordered)
    index = min(n - 1, math.ceil((1.0 - false_alarm_rate) * (n - 1)))
    return float(ordered[index])


@dataclass
class InputGate:
    """A fitted gate. ``mean`` and ``precision`` are absent when the score is computed inside an
    exported graph (ONNX, TorchScript): then only the threshold is needed here."""

    threshold: float
    false_alarm_rate: float
    level: int
    mean: Tensor | None = None
    precision: Tensor | None = None
    n_train: int = 0
    n_calibration: int = 0
    calibration_split: str = "val"
    shrinkage: float = 0.0
    calibration_flagged: float = float("nan")  # share of the calibration split above the threshold

    def score(self, features: Sequence[Tensor]) -> Tensor:
        if self.mean is None or self.precision is None:
            raise CorexError("input_gate: this gate has no mean and precision (its score is computed by the exported graph)")
        return mahalanobis(pooled(features, self.level), self.mean, self.precision)

    def summary(self) -> dict[str, Any]:
        """Plain data for metadata and JSON: everything but the matrices."""
        dimension = int(self.mean.numel()) if self.mean is not None else None
        return {
            "format": GATE_FORMAT,
            "score": "mahalanobis",
            "feature": f"global average of encoder pyramid level {self.level}",
            "level": self.level,
            "dimension": dimension,
            "threshold": float(self.threshold),
            "false_alarm_rate": float(self.false_alarm_rate),
            "calibration_split": self.calibration_split,
            "calibration_flagged": _plain_float(self.calibration_flagged),
            "n_train": int(self.n_train),
            "n_calibration": int(self.n_calibration),
            "shrinkage": float(self.shrinkage),
            "covariance": "Ledoit-Wolf shrunk covariance of the training split's features",
        }

    def state(self) -> dict[str, Any]:
        """What ``input_gate.pt`` and a ``.pt`` export hold (tensors and plain values only)."""
        if self.mean is None or self.precision is None:
            raise CorexError("input_gate: a gate without its matrices cannot be saved")
        return {**self.summary(), "mean": self.mean.float().contiguous(), "precision": self.precision.float().contiguous()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], where: str) -> InputGate:
        from corex_predict.formats import check_format

        if not isinstance(state, Mapping):
            raise CorexError(f"{where}: the input gate is not a mapping")
        check_format(state.get("format"), GATE_FORMAT, where)
        try:
            mean, precision = state.get("mean"), state.get("precision")
            if mean is not None and (not isinstance(mean, Tensor) or not isinstance(precision, Tensor)
                                     or precision.shape != (mean.numel(), mean.numel())):
                raise ValueError("mean and precision do not fit together")
            return cls(
                threshold=float(state["threshold"]), false_alarm_rate=float(state["false_alarm_rate"]), level=int(state["level"]),
                mean=mean.float() if mean is not None else None, precision=precision.float() if precision is not None else None,
                n_train=int(state.get("n_train", 0)), n_calibration=int(state.get("n_calibration", 0)),
                calibration_split=str(state.get("calibration_split", "val")), shrinkage=float(state.get("shrinkage", 0.0)),
                calibration_flagged=float(state["calibration_flagged"]) if state.get("calibration_flagged") is not None else float("nan"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorexError(f"{where}: the input gate is incomplete or damaged ({exc}); fit it again (an evaluate stage with input_gate)") from None


def _plain_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def fit_gate(train: Tensor, calibration: Tensor | None, *, false_alarm_rate: float, level: int) -> InputGate:
    """Fit the gate on training features ``(N, C)``; the threshold on ``calibration`` features (else
    on the training features themselves, which sets it too low: say so)."""
    if len(train) < 2:
        raise CorexError(f"input_gate: {len(train)} training image(s) reached the gate; it needs at least 2 to estimate a covariance")
    mean, covariance, shrinkage = ledoit_wolf(train)
    precision = torch.linalg.pinv(covariance, hermitian=True)
    gate = InputGate(threshold=math.inf, false_alarm_rate=false_alarm_rate, level=level, mean=mean.float(), precision=precision.float(),
                     n_train=len(train), shrinkage=shrinkage)
    reference, split = (calibration, "val") if calibration is not None and len(calibration) else (train, "train")
    scores = mahalanobis(reference.float(), gate.mean, gate.precision)
    gate.threshold = quantile_threshold(scores, false_alarm_rate)
    gate.n_calibration, gate.calibration_split = len(reference), split
    gate.calibration_flagged = float((scores > gate.threshold).double().mean())
    return gate


def read_gate(path: Path, where: str | None = None) -> InputGate:
    from corex.checkpoints import load_file

    where = where or f"input gate '{path}'"
    return InputGate.from_state(load_file(Path(path), where), where)


def save_gate(gate: InputGate, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    rundir.save_torch(out_dir / GATE_FILE, gate.state())
    rundir.write_json(out_dir / GATE_SUMMARY, gate.summary())
    return out_dir / GATE_FILE


# -- the evaluators ----------------------------------------------------------------------------------


class _Scored:
    """The scored split: per image its id, study, score and flags."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, batch: Mapping[str, Any], scores: Tensor, threshold: float) -> None:
        n = len(scores)
        meta = batch.get("meta") or {}
        fields = {field: list(meta.get(field) or [""] * n) for field in HEADER_FIELDS}
        ids = list(batch.get("image_id") or [str(len(self.rows) + i) for i in range(n)])
        studies = list(batch.get("study_id") or ids)
        for i, score in enumerate(scores.tolist()):
            header = header_flags({field: fields[field][i] for field in HEADER_FIELDS})
            ood = score_flag(score, threshold)
            self.rows.append({"image_id": str(ids[i]), "study_id": str(studies[i]), "score": float(score),
                              "ood": ood is not None, "header": bool(header), "flags": "; ".join([*header, *([ood] if ood else [])])})


class FittedGateEvaluator:
    """A fitted gate applied to a split (``corex evaluate`` of a model that carries one, e.g. on
    another data source): ``update`` only; nothing is refitted. See :class:`GateEvaluator` for the metrics."""

    needs_model = True

    def __init__(self, gate: InputGate) -> None:
        self.gate = gate
        self.reset()

    def reset(self) -> None:
        self._scored = _Scored()

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        if model is None:
            raise ValueError("the input_gate evaluator needs the model (it sets needs_model): call it as update(batch, outputs, model=model)")
        with torch.no_grad():
            scores = self.gate.score(model.encoder(batch["image"])).cpu()
        self._scored.add(batch, scores, self.gate.threshold)

    def compute(self) -> dict[str, float]:
        rows = self._scored.rows
        n = len(rows)

        def share(key: str) -> float:
            return sum(1 for r in rows if r[key]) / n if n else math.nan

        return {
            f"{PREFIX}/flagged": sum(1 for r in rows if r["flags"]) / n if n else math.nan,
            f"{PREFIX}/flagged_ood": share("ood"),
            f"{PREFIX}/flagged_header": share("header"),
            f"{PREFIX}/threshold": float(self.gate.threshold),
            f"{PREFIX}/false_alarm_rate": float(self.gate.false_alarm_rate),
            f"{PREFIX}/n": float(n),
        }

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% Wilson intervals of the flagged shares."""
        rows = self._scored.rows
        if not rows:
            return {}
        out = {}
        for name, key in (("flagged", "flags"), ("flagged_ood", "ood")):
            out[f"{PREFIX}/{name}"] = wilson(sum(1 for r in rows if r[key]), len(rows))
        return out

    def save(self, out_dir: Path) -> None:
        """``input_gate.csv``: per scored image its score and flags (and the gate, when it was fitted here)."""
        from corex_eval import write_csv

        write_csv(Path(out_dir) / GATE_SCORES, ["image_id", "study_id", "score", "flags"],
                  ([r["image_id"], r["study_id"], repr(r["score"]), r["flags"]] for r in self._scored.rows))


class GateEvaluator(FittedGateEvaluator):
    """The ``input_gate`` evaluator: fits the gate (training split, then the validation split's
    threshold) and reports on the scored split ``input_gate/flagged`` (the share of images with
    any flag: the header checks on ``batch["meta"]`` where the data carry it, and the score),
    ``input_gate/flagged_ood`` (the score alone: about ``false_alarm_rate`` on in-distribution
    data), ``input_gate/flagged_header``, ``input_gate/threshold``, ``input_gate/false_alarm_rate``
    and ``input_gate/n``; 95% Wilson intervals of the two shares. ``save`` writes the fitted gate
    (``input_gate.pt``, ``input_gate.json``) and ``input_gate.csv``.

    ``calibration_update`` may be called without ``model=``: the model of ``training_update`` is used.
    """

    needs_model = True

    def __init__(self, *, false_alarm_rate: float = 0.05, level: int = -1) -> None:
        if not 0.0 < false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self.false_alarm_rate = false_alarm_rate
        self.level = level
        self._train: list[Tensor] = []
        self._calibration: list[Tensor] = []
        self._model: Any = None
        self._fitted: InputGate | None = None
        self.reset()

    @property
    def gate(self) -> InputGate:  # type: ignore[override]
        if self._fitted is None:
            if not self._train:
                raise CorexError(
                    "input_gate: no training image reached the gate, so it has nothing to fit. List it in an evaluate stage "
                    "(the engine streams the training split through training_update, then the validation split), or call "
                    "training_update yourself from Python"
                )
            calibration = torch.cat(self._calibration) if self._calibration else None
            self._fitted = fit_gate(torch.cat(self._train), calibration, false_alarm_rate=self.false_alarm_rate, level=self.level)
        return self._fitted

    @gate.setter
    def gate(self, value: InputGate) -> None:
        self._fitted = value

    def _features(self, batch: Mapping[str, Any], model: Any) -> Tensor:
        model = model if model is not None else self._model
        if model is None:
            raise ValueError("the input_gate evaluator needs the model: call training_update(batch, outputs, model=model) first")
        self._model = model
        with torch.no_grad():
            return pooled(model.encoder(batch["image"]), self.level).cpu()

    def training_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        self._train.append(self._features(batch, model))
        self._fitted = None

    def calibration_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        self._calibration.append(self._features(batch, model))
        self._fitted = None

    def reset_training(self) -> None:
        self._train, self._calibration, self._fitted = [], [], None

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor], model: Any = None) -> None:
        super().update(batch, outputs, model=model if model is not None else self._model)

    def save(self, out_dir: Path) -> None:
        save_gate(self.gate, Path(out_dir))
        super().save(out_dir)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


__all__ = ["GATE_FILE", "GATE_FORMAT", "FittedGateEvaluator", "GateEvaluator", "InputGate", "fit_gate", "header_fields", "header_flags",
           "ledoit_wolf", "mahalanobis", "pooled", "quantile_threshold", "read_gate", "save_gate", "score_flag", "wilson"]
