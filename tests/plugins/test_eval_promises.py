"""The evaluators' numbers, checked against hand computations and reference implementations
(issue 23: the survivors of mutation testing in corex_eval's bootstrap, average precision and
calibration): cluster resampling, percentile intervals, VOC 2010 average precision with its
envelope and ties, ECE, Brier and temperature scaling."""

from __future__ import annotations

import warnings

import pytest
import torch
from corex_eval import average_precision as ap_module
from corex_eval import bootstrap, calibration
from corex_eval.average_precision import average_precision, average_precision_per_class, precision_recall_steps, study_map


# -- the cluster bootstrap ----------------------------------------------------------------------


def test_clusters_are_numbered_in_order_of_first_sight():
    assert bootstrap.cluster_index(["p2", "p1", "p2", "p3", "p1"]).tolist() == [0, 1, 0, 2, 1]
    assert bootstrap.cluster_index([]).tolist() == []


def test_one_unit_per_cluster_is_the_ordinary_bootstrap_with_randints_draws():
    counts = bootstrap.resample_counts(torch.arange(7), 5, torch.Generator().manual_seed(3))
    draws = torch.randint(7, (5, 7), generator=torch.Generator().manual_seed(3))
    expected = torch.stack([torch.bincount(row, minlength=7) for row in draws]).double()
    assert torch.equal(counts, expected)


def test_a_cluster_is_drawn_whole():
    clusters = torch.tensor([0, 0, 1, 2, 2, 2])
    counts = bootstrap.resample_counts(clusters, 200, torch.Generator().manual_seed(0))
    assert counts.shape == (200, 6) and counts.dtype == torch.float64
    assert torch.equal(counts[:, 0], counts[:, 1]) and torch.equal(counts[:, 3], counts[:, 5])
    assert torch.equal(counts[:, 0] + counts[:, 2] + counts[:, 3], torch.full((200,), 3.0))  # 3 clusters drawn per resample
    assert (counts[:, 0] == 0).any() and (counts[:, 0] >= 2).any()


def test_blocks_do_not_depend_on_the_block_size(monkeypatch):
    clusters = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    whole = torch.cat(list(bootstrap.resample_blocks(clusters, 50, seed=9)))
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 7 * 3)  # 3 resamples a block
    blocks = list(bootstrap.resample_blocks(clusters, 50, seed=9))
    assert [len(b) for b in blocks] == [3] * 16 + [2]
    assert torch.equal(torch.cat(blocks), whole) and whole.shape == (50, 7)
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 1)  # fewer elements than a row: one resample a block
    blocks = list(bootstrap.resample_blocks(clusters, 50, seed=9))
    assert [len(b) for b in blocks] == [1] * 50 and torch.equal(torch.cat(blocks), whole)


def test_a_block_of_resamples_holds_at_most_16_mib_of_counts():
    assert bootstrap.BLOCK_ELEMENTS * 8 == 16 * 2**20  # float64 counts
    clusters = torch.arange(1000) // 2  # 500 patients with two studies each
    first = next(bootstrap.resample_blocks(clusters, 10**6, seed=0))
    assert first.shape == (2**21 // 1000, 1000) and first.numel() * first.element_size() <= 16 * 2**20
    assert next(bootstrap.resample_blocks(torch.zeros(1, dtype=torch.long), 10**7, seed=0)).shape == (2**21, 1)


def test_no_units_give_empty_resamples():
    counts = bootstrap.resample_counts(torch.zeros(0, dtype=torch.long), 4, torch.Generator().manual_seed(0))
    assert counts.shape == (4, 0) and counts.dtype == torch.float64
    assert [b.shape for b in bootstrap.resample_blocks(torch.zeros(0, dtype=torch.long), 3, seed=0)] == [(3, 0)]


def test_percentile_intervals_ignore_nan_and_leave_out_metrics_never_defined():
    values = torch.arange(101, dtype=torch.float64)
    with_nan = torch.cat([values, torch.full((5,), torch.nan)])
    never = [torch.full((4,), torch.nan)]
    intervals = bootstrap.percentile_intervals({"never": never, "f1": [values[:50], values[50:]], "ap": [with_nan], "again": never})
    assert intervals["f1"] == pytest.approx((2.5, 97.5)) and intervals["ap"] == pytest.approx((2.5, 97.5))
    assert set(intervals) == {"f1", "ap"}



# -- average precision ----------------------------------------------------------------------------


def test_voc_average_precision_uses_the_precision_envelope():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    positive = torch.tensor([True, False, True, False])
    recall, precision, envelope = precision_recall_steps(scores, positive)
    assert recall.shape == precision.shape == envelope.shape == (1, 4)  # no weights: one weighting, every unit once
    assert recall[0].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert precision[0].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert envelope[0].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3, 0.5])
    # 0.5 x 1 + 0.5 x 2/3; scikit-learn (no envelope) says 0.5 x 1 + 0.5 x 2/3 too here, so a rising precision:
    assert average_precision(scores, positive).item() == pytest.approx(0.5 + 0.5 * 2 / 3)
    rising = torch.tensor([False, True, True, False])  # precision 0, 1/2, 2/3: the envelope lifts the first step
    assert average_precision(scores, rising).item() == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)


def test_tied_scores_are_one_threshold_whatever_their_order():
    scores = torch.tensor([0.9, 0.9, 0.1])
    for positive in ([True, False, True], [False, True, True]):
        assert average_precision(scores, torch.tensor(positive)).item() == pytest.approx(2 / 3)


def test_average_precision_under_weights_equals_it_on_the_repeated_samples():
    scores = torch.tensor([0.9, 0.2, 0.7, 0.4, 0.5])
    positive = torch.tensor([True, False, False, True, True])
    weights = torch.tensor([[1.0, 1, 1, 1, 1], [2, 0, 1, 0, 3], [0, 1, 1, 0, 0]])
    out = average_precision(scores, positive, weights)
    assert out.shape == (3,)
    assert out[0].item() == pytest.approx(average_precision(scores, positive).item())
    repeated = torch.tensor([0, 0, 2, 4, 4, 4])
    assert out[1].item() == pytest.approx(average_precision(scores[repeated], positive[repeated]).item())
    assert out[2].isnan()  # no positive drawn: no AP


def test_study_map_averages_the_classes_that_have_a_positive():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])  # class 2 has no positive study
    per_class = average_precision_per_class(probabilities, labels)
    assert per_class[:2].tolist() == pytest.approx([0.5 * 1 + 0.5 * 2 / 4, 1.0]) and per_class[2].isnan()
    assert study_map(probabilities, labels).item() == pytest.approx(per_class[:2].mean().item())
    assert ap_module.study_map(probabilities, torch.tensor([2, 2, 2, 2])).item() == pytest.approx(
        average_precision(probabilities[:, 2], torch.ones(4, dtype=torch.bool)).item())


# -- calibration ----------------------------------------------------------------------------------


def test_unit_probabilities_average_the_images_of_each_unit():
    logits = torch.tensor([[2.0, 0.0], [1.0, 2.0], [3.0, 1.0]])  # no unit's mean is the same at every temperature
    unit = torch.tensor([0, 0, 1])
    out = calibration.unit_probabilities(logits, unit, 2, temperature=2.0)
    tempered = torch.softmax(logits / 2.0, 1)
    assert torch.allclose(out, torch.stack([tempered[:2].mean(0), tempered[2]]))
    plain = torch.softmax(logits, 1)  # the default temperature is 1: the model's own probabilities
    assert torch.allclose(calibration.unit_probabilities(logits, unit, 2), torch.stack([plain[:2].mean(0), plain[2]]))


def test_ece_and_brier_match_their_definitions_and_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(200, 4) * 2, 1)
    labels = torch.randint(4, (200,))
    ones = torch.ones(1, 200)
    ece = calibration.weighted_ece(probabilities, labels, ones, 15)
    reference = multiclass_calibration_error(probabilities, labels, num_classes=4, n_bins=15, norm="l1")
    assert ece.item() == pytest.approx(reference.item(), abs=1e-6)
    brier = calibration.weighted_brier(probabilities, labels, ones)
    assert brier.item() == pytest.approx(((probabilities - torch.eye(4)[labels]) ** 2).sum(1).mean().item())
    # Weights are draw counts: weight 2 is the sample twice.
    weights = torch.ones(1, 200)
    weights[0, :50] = 2
    doubled = torch.cat([probabilities[:50], probabilities]), torch.cat([labels[:50], labels])
    assert calibration.weighted_brier(probabilities, labels, weights).item() == pytest.approx(
        calibration.weighted_brier(*doubled, torch.ones(1, 250)).item())
    assert calibration.weighted_ece(probabilities, labels, weights, 15).item() == pytest.approx(
        calibration.weighted_ece(*doubled, torch.ones(1, 250), 15).item())


@pytest.mark.parametrize("bins", [2, 3, 15])
def test_ece_matches_torchmetrics_when_the_gaps_of_the_bins_differ_in_sign(bins):
    # Labels drawn from the probabilities: calibrated on average, so some bins are over- and others
    # under-confident, and the binning decides the ECE (with every gap of one sign it would not).
    from torchmetrics.functional.classification import multiclass_calibration_error

    generator = torch.Generator().manual_seed(5)
    probabilities = torch.softmax(torch.randn(400, 4, generator=generator) * 1.5, 1)
    labels = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
    gaps = probabilities.max(1).values - (probabilities.argmax(1) == labels).double()
    assert (gaps > 0).any() and (gaps < 0).any()
    ece = calibration.weighted_ece(probabilities, labels, torch.ones(1, 400), bins).item()
    reference = multiclass_calibration_error(probabilities, labels, num_classes=4, n_bins=bins, norm="l1").item()
    assert ece == pytest.approx(reference, abs=1e-6)
    overall = abs(gaps.sum().item()) / 400  # one bin for all: what a binning-blind ECE would give
    assert abs(ece - overall) > 1e-3


def test_a_confidence_of_exactly_one_has_a_bin_of_its_own():
    probabilities = torch.tensor([[1.0, 0.0], [0.95, 0.05]])
    labels = torch.tensor([1, 0])
    # bins of width 0.1: [0.9, 1) holds the 0.95 (gap 0.05), the extra bin the 1.0 (gap 1.0)
    assert calibration.weighted_ece(probabilities, labels, torch.ones(1, 2), 10).item() == pytest.approx((0.05 + 1.0) / 2)


def test_temperature_softens_an_overconfident_model_and_sharpens_a_timid_one():
    torch.manual_seed(1)
    labels = torch.randint(3, (400,))
    logits = torch.randn(400, 3)
    logits[torch.arange(400), labels] += 1.5  # right about 70% of the time
    unit = torch.arange(400)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = calibration.fit_temperature(logits, unit, labels)
        assert calibration.fit_temperature(logits * 8, unit, labels) == pytest.approx(8 * fitted, rel=1e-3)
        assert calibration.fit_temperature(logits / 4, unit, labels) == pytest.approx(fitted / 4, rel=1e-3)
    assert 0.5 < fitted < 2.0
    nll = lambda t: torch.nn.functional.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert nll(fitted) <= min(nll(fitted * 1.05), nll(fitted / 1.05))


def test_the_sane_temperature_range_includes_its_ends_and_the_warning_points_at_the_caller(monkeypatch):
    torch.manual_seed(2)
    labels = torch.randint(2, (200,))
    logits = torch.randn(200, 2) * 50
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = calibration.fit_temperature(logits, torch.arange(200), labels)
    assert len(caught) == 1 and caught[0].filename == __file__  # stacklevel: the caller's line, not calibration.py
    for ends in ((fitted, 10 * fitted), (fitted / 10, fitted)):  # the fitted value at either end is inside
        monkeypatch.setattr(calibration, "EXTREME", ends)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert calibration.fit_temperature(logits, torch.arange(200), labels) == fitted
    perfect = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibration.fit_temperature(perfect, torch.arange(2), torch.tensor([0, 1]))
    assert len(caught) == 1 and caught[0].filename == __file__


def test_temperature_scaling_warns_when_no_temperature_is_best_or_the_fit_is_extreme():
    labels = torch.tensor([0, 1, 0, 1])
    perfect = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 2.0]])
    with pytest.warns(UserWarning, match="every validation image is classified correctly"):
        calibration.fit_temperature(perfect, torch.arange(4), labels)
    torch.manual_seed(2)
    noise_labels = torch.randint(2, (200,))
    confident_noise = torch.randn(200, 2) * 50  # right half the time, sure every time: T far above the sane range
    with pytest.warns(UserWarning, match=r"temperature scaling fitted T = .*, outside"):
        calibration.fit_temperature(confident_noise, torch.arange(200), noise_labels)
    with pytest.raises(ValueError, match="diverged"):
        calibration.fit_temperature(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.arange(2), torch.tensor([0, 1]))
