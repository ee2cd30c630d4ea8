"""Predict new radiographs: per image, then per study as the classification evaluator combines them.

A record is a flat dict (the rows of ``predictions.csv``, the ``records`` of ``predictions.json``):

* ``level``: ``"image"`` or ``"study"``; ``file`` (images) and ``study_id`` (both);
* ``prob_<class>`` for every class (``<class>`` as in the evaluators' metric names, e.g.
  ``prob_typical``), summing to 1, and ``predicted``, the most probable class;
* ``opacity_fraction`` when the model has a segmentation head: the share of the image (air
  padding excluded) whose opacity probability exceeds 0.5;
* studies also carry ``n_images`` (and ``files`` in JSON); with ``saliency`` images carry the
  path of their overlay PNG;
* ``flags``: what the input gate (:mod:`corex_predict.gate`) found, ``"; "``-joined, empty when the
  input passes (``modality=MR; body_part=KNEE; view=LL; out_of_distribution score 123.4 > 56.7``);
  a study's says how many of its images were flagged; ``ood_score`` when the model carries a fitted gate.

A flagged input is still predicted, and marked; ``gate="strict"`` refuses it instead (it goes to
``refused`` with its flags, and the command exits 2); ``gate="off"`` checks nothing.

A study's probabilities are the mean of its images' probabilities, each study counting once, as
:class:`corex_eval.classification.ClassificationEvaluator` scores at ``level: study``; its opacity
fraction is the mean of its images'.

Files are decoded in a streaming :class:`~torch.utils.data.DataLoader` (``workers`` processes),
``batch_size`` at a time, so a folder of thousands of files never sits in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from corex_eval import slug, write_csv
from torch.utils.data import DataLoader

from corex import rundir
from corex.errors import CorexError
from corex.progress import Progress
from corex.progress import progress as progress_bar
from corex_predict.gate import header_flags, score_flag
from corex_predict.inputs import (
    ImageFiles,
    collate,
    display_name,
    find_images,
    image_region,
    read_study_csv,
)
from corex_predict.model import SYNTHETIC_SOURCES, LoadedModel, load_model
from corex_predict.saliency import crop, grad_cam, overlay_name, save_overlay
from corex_predict.tta import TTAModel, parse_tta

OPACITY_THRESHOLD = 0.5
GATE_MODES = ("warn", "strict", "off")


class Predictions(list):
    """The records (image records in input order, then one per study); ``skipped`` lists the
    files that could not be read as ``{"file", "reason"}``; ``info`` says which model and views."""

    def __init__(self, records: Iterable[dict[str, Any]], skipped: list[dict[str, str]], info: dict[str, Any],
                 refused: list[dict[str, str]] | None = None):
        super().__init__(records)
        self.skipped = skipped
        self.info = info
        self.refused = list(refused or [])  # gate="strict": the flagged inputs, {"file", "flags"}

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """The image records the input gate flagged (predicted anyway)."""
        return [r for r in self.images if r.get("flags")]

    @property
    def images(self) -> list[dict[str, Any]]:
        return [r for r in self if r["level"] == "image"]

    @property
    def studies(self) -> list[dict[str, Any]]:
        return [r for r in self if r["level"] == "study"]


def predict(
    model: LoadedModel | str | Path,
    files: str | Path | Iterable[str | Path],
    *,
    batch_size: int = 16,
    tta: str | Sequence[str] | None = None,
    study_csv: str | Path | None = None,
    studies: Mapping[str, str] | None = None,
    saliency: str | Path | None = None,
    saliency_level: int | None = None,
    device: str | None = None,
    workers: int = 0,
    progress: bool = False,
    gate: str = "warn",
) -> Predictions:
    """Predict ``files`` (files or folders; DICOM, PNG, JPEG) with ``model`` (a :func:`load_model`
    result, a run directory or an exported file). Unreadable files are skipped and listed in the
    result's ``skipped``. ``studies`` maps file paths (or names) to study ids, like ``study_csv``;
    ``saliency`` is a folder for Grad-CAM (and opacity) overlay PNGs; ``tta`` e.g. ``"hflip,scale"``;
    ``gate``: ``"warn"`` (flagged inputs predicted and marked), ``"strict"`` (refused) or ``"off"``."""
    if gate not in GATE_MODES:
        raise CorexError(f"--gate must be one of {', '.join(GATE_MODES)}, got {gate!r}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device or "cpu")
    if device is not None:
        loaded.to(device)
    if batch_size < 1:
        raise CorexError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise CorexError(f"--workers must be 0 (decode in this process) or more, got {workers}")
    paths, skipped = find_images([files] if isinstance(files, (str, Path)) else files)
    if not paths:
        named = ", ".join(s["file"] for s in skipped) or "nothing"
        raise CorexError(f"no image files to predict (given: {named}); give DICOM, PNG or JPEG files or folders holding them")
    study_map = dict(studies or {})
    if study_csv is not None:
        study_map.update(read_study_csv(study_csv))

    predictor = _Predictor(loaded, parse_tta(tta), Path(saliency) if saliency is not None else None, saliency_level, gate != "off")
    loader = DataLoader(ImageFiles(paths, loaded.image_size, study_map), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate)
    images: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    probabilities: dict[str, list[torch.Tensor]] = {}  # per study, its images' class probabilities
    with _progress(len(paths), progress) as bar:
        for items in loader:
            skipped += [{"file": item["file"], "reason": item["error"]} for item in items if "error" in item]
            good = [item for item in items if "error" not in item]
            if good:
                for record, row in predictor.predict(good):
                    if gate == "strict" and record["flags"]:
                        refused.append({"file": record["file"], "flags": record["flags"]})
                        continue
                    images.append(record)
                    if row is not None:
                        probabilities.setdefault(record["study_id"], []).append(row)
            bar.update(len(items), skipped=len(skipped))

    info = {
        "model": str(loaded.source),
        "stage": loaded.meta.get("stage"),
        "recipe": loaded.meta.get("recipe"),
        "recipe_digest": loaded.meta.get("recipe_digest"),
        "class_names": loaded.class_names,
        "image_size": loaded.image_size,
        "tta": [view.name for view in predictor.views],
        "device": str(loaded.device),
        "format": loaded.kind,
        "gate": {"mode": gate, "header_checks": gate != "off",
                 **({"out_of_distribution": loaded.gate.summary()} if loaded.gate is not None and gate != "off" else {})},
        "warnings": model_warnings(loaded),
    }
    return Predictions([*images, *_studies(images, probabilities, predictor.columns, loaded.class_names)], skipped, info, refused)


def model_warnings(loaded: LoadedModel) -> list[str]:
    """What a user must know about the model before reading its predictions (trained on synthetic data)."""
    data = loaded.meta.get("training_data")
    name = data.get("source") if isinstance(data, Mapping) else loaded.meta.get("data")
    synthetic = data.get("synthetic") if isinstance(data, Mapping) else name in SYNTHETIC_SOURCES
    if not synthetic:
        return []
    note = (data.get("synthetic_note") if isinstance(data, Mapping) else None) or SYNTHETIC_SOURCES.get(str(name), "synthetic images")
    return [(f"this model was trained on synthetic data (data source '{name}': {note}); it must not be used on patients, "
            "and its probabilities for real radiographs mean nothing")]


class _Predictor:
    """One batch of decoded items to image records (and their class probabilities)."""

    def __init__(self, loaded: LoadedModel, views: list, saliency_dir: Path | None, saliency_level: int | None, checks: bool = True):
        self.loaded, self.views, self.checks = loaded, views, checks
        if saliency_dir is not None:
            loaded.require_torch("--saliency (Grad-CAM takes gradients inside the network)")
        self.network = TTAModel(loaded.network, views).eval()
        self.class_head, self.mask_head = loaded.head_for("classification"), loaded.head_for("segmentation")
        self.heads = [h for h in (self.class_head, self.mask_head) if h is not None]
        if not self.heads:
            raise CorexError(f"model '{loaded.source}' has neither a classification nor a segmentation head; nothing to predict")
        if saliency_dir is not None and self.class_head is None:
            raise CorexError("--saliency: Grad-CAM needs a classification head, and this model has none")
        self.saliency_dir, self.saliency_level = saliency_dir, saliency_level
        self.columns = [f"prob_{slug(name)}" for name in loaded.class_names]

    @torch.no_grad()
    def predict(self, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], torch.Tensor | None]]:
        loaded = self.loaded
        batch = torch.stack([item["image"] for item in items]).to(loaded.device)
        if loaded.channels_last and loaded.model is not None:
            batch = batch.contiguous(memory_format=torch.channels_last)
        scores = None
        if self.views:
            outputs = self.network(batch, self.heads)
            if self.checks:
                scores = loaded.score(batch)  # on the image as it is
        elif loaded.model is not None:  # the model's forward, keeping the pyramid for the gate
            features = loaded.model.encoder(batch)
            outputs = {name: loaded.model.heads[name](features) for name in self.heads}
            if self.checks:
                scores = loaded.score(batch, features)
        else:
            outputs = loaded.runtime(batch, self.heads)
            if self.checks:
                scores = loaded.score(batch)
        scores = scores.float().cpu() if scores is not None else None
        probabilities = torch.softmax(outputs[self.class_head].float(), dim=1).cpu() if self.class_head else None
        masks = torch.sigmoid(outputs[self.mask_head].float()).cpu() if self.mask_head else None
        cams = None
        if self.saliency_dir is not None:  # of the predicted class, on the plain model
            classes = probabilities.argmax(1).to(loaded.device)
            cams = grad_cam(loaded.model, self.class_head, loaded.class_names, batch, classes, self.saliency_level).cpu()
        results = []
        for i, item in enumerate(items):
            record: dict[str, Any] = {"level": "image", "file": item["file"], "study_id": item["study_id"]}
            flags = header_flags(item.get("header") or {}) if self.checks else []
            if scores is not None:
                record["ood_score"] = float(scores[i])
                flagged = score_flag(float(scores[i]), loaded.gate.threshold)
                flags += [flagged] if flagged else []
            record["flags"] = "; ".join(flags)
            region = image_region(item["geometry"], loaded.image_size)
            if probabilities is not None:
                record.update(zip(self.columns, map(float, probabilities[i])))
                record["predicted"] = loaded.class_names[int(probabilities[i].argmax())]
            if masks is not None:
                record["opacity_fraction"] = float((masks[i, 0][region] > OPACITY_THRESHOLD).float().mean())
            if cams is not None:
                path = self.saliency_dir / overlay_name(item["index"], item["file"])
                probability = float(probabilities[i].max())
                empty = "\n(zero everywhere: no positive evidence)" if not bool(cams[i].any()) else ""
                save_overlay(
                    path, crop(batch[i, 0], region),
                    title=f"{Path(item['file']).name}: {record['predicted']} (p = {probability:.2f})",
                    cam=crop(cams[i, 0], region), cam_title=f"Grad-CAM of '{record['predicted']}', p = {probability:.2f}{empty}",
                    opacity=crop(masks[i, 0], region) if masks is not None else None,
                    opacity_title=f"predicted opacity: {record.get('opacity_fraction', 0):.1%} of the image",
                )
                record["saliency"] = str(path)
            results.append((record, probabilities[i] if probabilities is not None else None))
        return results


def _studies(images, study_probabilities, columns, class_names):
    by_study: dict[str, list[dict[str, Any]]] = {}
    for record in images:
        by_study.setdefault(record["study_id"], []).append(record)
    studies = []
    for study_id, members in by_study.items():
        record: dict[str, Any] = {"level": "study", "study_id": study_id, "n_images": len(members),
                                  "files": [m["file"] for m in members]}
        rows = study_probabilities.get(study_id, [])
        if rows:
            mean = torch.stack(rows).sum(0) / len(rows)  # float32, as the evaluator averages
            record.update(zip(columns, map(float, mean)))
            record["predicted"] = class_names[int(mean.argmax())]
        if "opacity_fraction" in members[0]:
            record["opacity_fraction"] = sum(m["opacity_fraction"] for m in members) / len(members)
        flagged = sum(1 for m in members if m.get("flags"))
        record["flags"] = f"{flagged} of {len(members)} image(s) flagged" if flagged else ""
        studies.append(record)
    return studies


def write_predictions(predictions: Predictions, out: str | Path) -> tuple[Path, Path]:
    """``out/predictions.json`` (model, views, gate, records, skipped, refused) and ``out/predictions.csv``.
    Both are made in memory first, so a value one of them cannot hold fails before either is written."""
    out = Path(out)
    check_out(out)
    json_path, csv_path = out / "predictions.json", out / "predictions.csv"
    document = _safe({**predictions.info, "records": list(predictions), "skipped": predictions.skipped, "refused": predictions.refused})
    header = list(dict.fromkeys(key for record in document["records"] for key in record if key != "files")) or ["level", "file", "study_id", "flags"]
    rows = [[_cell(record.get(key)) for key in header] for record in document["records"]]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, header, rows)
    rundir.write_json(json_path, document)
    return json_path, csv_path


def check_out(out: Path) -> None:
    """``--out`` must be a folder, or not exist yet."""
    if out.exists() and not out.is_dir():
        raise CorexError(f"--out: '{display_name(out)}' is a file; give a folder for predictions.json and predictions.csv")


def _safe(value: Any) -> Any:
    """Text that UTF-8 files take: a string with undecodable file-name bytes (lone surrogates) shows them escaped."""
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, Mapping):
        return {_safe(k): _safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value]
    return value


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value  # repr: every digit, so the CSV loses nothing


def _progress(total: int, enabled: bool):
    return progress_bar(total, "predict", unit="img") if enabled else Progress(total, "predict", mode="off")
