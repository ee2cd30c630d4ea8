"""The cluster bootstrap shared by the evaluators (and by anything that pairs runs on one test set).

A test set of chest radiographs is not a set of independent studies: one patient may have several
studies, and they look alike. Resampling studies one by one would treat them as independent and
give intervals that are too narrow, so a resample here draws *patients* with replacement and
takes all studies (or images) of each drawn patient, as many times as the patient was drawn.

A resample is represented by how often each unit was drawn (an ``(R, N)`` count matrix), so a
metric written as a weighted sum scores all ``R`` resamples at once by tensor algebra.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

# Caps each (resamples, units) float64 block at 16 MiB.
BLOCK_ELEMENTS = 2**21


def cluster_index(clusters: Sequence[Hashable]) -> Tensor:
    """Number the distinct clusters in order of first sight: ``["p2", "p1", "p2"]`` gives ``[0, 1, 0]``."""
    position: dict[Hashable, int] = {}
    return torch.tensor([position.setdefault(c, len(position)) for c in clusters], dtype=torch.long)


def resample_counts(clusters: Tensor, resamples: int, generator: torch.Generator) -> Tensor:
    """Draw counts ``(resamples, N)`` of a cluster bootstrap.

    ``clusters`` ``(N,)`` numbers each unit's cluster ``0..G-1``. Each resample draws ``G``
    clusters with replacement; a unit counts as often as its cluster was drawn, so all units of a
    cluster always count equally. When every unit is its own cluster this is the ordinary
    bootstrap, with exactly the draws of ``torch.randint(N, (resamples, N), generator=...)``.
    """
    if not len(clusters):
        return torch.zeros((resamples, 0), dtype=torch.float64)
    groups = int(clusters.max()) + 1
    draws = torch.randint(groups, (resamples, groups), generator=generator)
    ones = torch.ones(draws.shape, dtype=torch.float64)
    per_cluster = torch.zeros_like(ones).scatter_add_(1, draws, ones)
    return per_cluster[:, clusters]


def resample_blocks(clusters: Tensor, resamples: int, seed: int) -> Iterator[Tensor]:
    """:func:`resample_counts` in blocks small enough to hold in memory, from one seeded stream.

    The concatenated blocks do not depend on the block size, so the intervals are the same on
    any machine.
    """
    generator = torch.Generator().manual_seed(seed)
    # The largest tensors of a block are (rows, N); there are never more clusters than units.
    rows = max(1, BLOCK_ELEMENTS // max(1, len(clusters)))
    for start in range(0, resamples, rows):
        yield resample_counts(clusters, min(rows, resamples - start), generator)


def percentile_intervals(values: Mapping[str, Sequence[Tensor]]) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each metric's bootstrap values (blocks of ``(rows,)``), ignoring
    ``nan`` (a resample in which the metric is undefined, e.g. a class that was not drawn)."""
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    intervals = {}
    for name, blocks in values.items():
        samples = torch.cat([torch.as_tensor(b, dtype=torch.float64) for b in blocks])
        if samples.isnan().all():
            continue  # never defined: no interval rather than a (nan, nan) one
        intervals[name] = tuple(torch.nanquantile(samples, quantiles).tolist())
    return intervals
