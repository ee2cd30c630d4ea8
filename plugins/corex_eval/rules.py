"""The defaults of corex_eval's rules, in one light module (no torch): the evaluators write the values a
run used into their artefacts, and the findings read them back, falling back on these for older runs."""

from __future__ import annotations

READY_RECALL = 0.8  # deploy-readiness bar: every class's test recall must reach it
CONFIDENCE = 0.95  # level of the exact (Clopper-Pearson) recall intervals the verdict quotes
TARGET_ACCURACY = 0.95  # selective prediction: the coverage at which this accuracy is reached
COVERAGES = (0.9, 0.8)  # selective prediction: accuracy when only this share of studies is kept
# A fitted temperature outside this range is not a calibration: on the high side the validation
# split's best probabilities are nearly uniform (the scores carry little information there), on the
# low side the fit had (almost) no error to learn from and stopped at an arbitrary small value.
SANE_TEMPERATURE = (0.05, 20.0)
SETTINGS_FILE = "classification.json"  # the classification evaluator's settings, beside its artefacts


def subgroup_key(field: str, value: str) -> str:
    """The metric-name part of a subgroup: ``view=ap``, ``age_band=80plus``, ``view+portable=ap_yes``."""
    from corex.metrics import slug

    return f"{field}={slug(value[:-1] + 'plus' if value.endswith('+') else value)}"

__all__ = ["CONFIDENCE", "COVERAGES", "READY_RECALL", "SANE_TEMPERATURE", "SETTINGS_FILE", "TARGET_ACCURACY", "subgroup_key"]
