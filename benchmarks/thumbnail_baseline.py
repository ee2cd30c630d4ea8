"""How easy is the phantom? A logistic regression on 16x16 thumbnails, scored like the models (run by hand).

    python benchmarks/thumbnail_baseline.py recipes/phantom/classification_scratch.yaml [--set data.difficulty=0.6]
    python benchmarks/thumbnail_baseline.py recipes/phantom/classification_scratch.yaml --set data.label_fraction=0.1 --set seed=3

Builds the recipe's data exactly as a run would (same phantom, splits and decoded cache), shrinks
every image to 16x16 by area averaging, fits a standardised multinomial logistic regression
(scikit-learn, L2, C chosen on the validation split) on the training split, averages each study's
image probabilities like the classification evaluator does, and prints the test macro-F1. With
``data.label_fraction`` below 1 it fits on that fraction of the training labels and, as the study
does (``data.reduce_val``), chooses C on the same fraction of the validation split. When a
trained model's test macro-F1 is not well above this number, the data set is too easy for the
study to tell arms apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import corex
from corex.errors import CorexError
from corex.interfaces import Preparable

THUMBNAIL = 16


def thumbnails(dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Flattened 16x16 thumbnails, labels and study ids of every labelled image of ``dataset``."""
    features, labels, studies = [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if int(item["label"]) < 0:
            continue
        image = item["image"].float()[None]
        features.append(F.adaptive_avg_pool2d(image, THUMBNAIL).flatten().numpy())
        labels.append(int(item["label"]))
        studies.append(str(item["study_id"]))
    return np.stack(features), np.array(labels), studies


def study_level(probabilities: np.ndarray, labels: np.ndarray, studies: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean probabilities per study (one vote per study, as the evaluator scores)."""
    order = list(dict.fromkeys(studies))
    position = {s: i for i, s in enumerate(order)}
    index = np.array([position[s] for s in studies])
    mean = np.zeros((len(order), probabilities.shape[1]))
    np.add.at(mean, index, probabilities)
    mean /= np.bincount(index)[:, None]
    study_labels = np.zeros(len(order), dtype=int)
    study_labels[index] = labels
    return mean, study_labels


def measure(recipe_path: Path, overrides: list[str]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    recipe = corex.load_recipe(recipe_path, overrides)
    source = corex.build_data(recipe)
    if isinstance(source, Preparable):
        source.prepare()
    fraction = recipe.data.label_fraction
    fractions = {"train": fraction, "val": fraction if recipe.data.reduce_val else 1.0, "test": 1.0}
    splits = {name: thumbnails(source.split(name, label_fraction=f)) for name, f in fractions.items()}
    best = None
    for c in (0.01, 0.1, 1.0):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        model.fit(splits["train"][0], splits["train"][1])
        x, y, studies = splits["val"]
        probabilities, truth = study_level(model.predict_proba(x), y, studies)
        score = f1_score(truth, probabilities.argmax(1), average="macro")
        if best is None or score > best[0]:
            best = (score, c, model)
    _, c, model = best
    x, y, studies = splits["test"]
    probabilities, truth = study_level(model.predict_proba(x), y, studies)
    return {
        "recipe": str(recipe_path), "overrides": overrides, "difficulty": recipe.data.options.get("difficulty"),
        "label_fraction": fraction, "C": c, "train_images": len(splits["train"][1]), "test_studies": len(truth),
        "test_macro_f1": float(f1_score(truth, probabilities.argmax(1), average="macro")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        result = measure(args.recipe, args.overrides)
    except CorexError as error:  # a bad recipe value or data: the message, as `corex` prints it
        print(f"thumbnail_baseline: {error}", file=sys.stderr)
        raise SystemExit(getattr(error, "exit_code", 2)) from None
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    print(f"thumbnail logistic regression: test macro-F1 {result['test_macro_f1']:.3f} "
          f"({result['test_studies']} test studies, difficulty {result['difficulty']}, "
          f"{result['label_fraction']:g} of the labels: {result['train_images']} training images)")


if __name__ == "__main__":
    main()
