"""Percentile bootstrap intervals for the fairness gaps and per-group accuracy (resampling within groups), of one
model's predictions or of the paired difference between two models' predictions on the same images."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from fairdeploy.metrics.fairness import DEFAULT_CONFIDENCE, pair_gaps, rates_from_counts

DEFAULT_N_BOOT = 1000  # resamples per interval


def _resample_weights(groups: np.ndarray, group_order: Sequence[str], n_boot: int,
                      seed: int) -> dict[str, np.ndarray]:
    """Per group, (n_boot, n_g) multinomial counts: each resample draws the group's own size with replacement.
    They depend only on the group sizes and the seed, so two models scored on the same images share them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in group_order:
        n_g = int((groups == name).sum())
        out[name] = rng.multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot).astype(np.float64)
    return out


def _resampled_stats(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, group_order: Sequence[str],
                     num_classes: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """eopp0/eopp1/eodd/dp (worst pair), accuracy_diff and accuracy[g] of every resample: one value per row."""
    eye = np.eye(num_classes)
    rates: dict[str, dict[str, np.ndarray]] = {}
    for name in group_order:
        mask = groups == name
        t, p, w = eye[y_true[mask]], eye[y_pred[mask]], weights[name]
        rates[name] = rates_from_counts(w @ (t * p), w @ t, w @ p, np.full(len(w), int(mask.sum())))
    samples: dict[str, np.ndarray] = {}
    for a, b in itertools.combinations(group_order, 2):
        for k, v in pair_gaps(rates[a], rates[b], num_classes).items():
            samples[k] = np.maximum(samples[k], v) if k in samples else v
    accs = np.stack([rates[n]["accuracy"] for n in group_order])
    samples["accuracy_diff"] = accs.max(0) - accs.min(0)
    for i, n in enumerate(group_order):
        samples[f"accuracy[{n}]"] = accs[i]
    return samples


def _quantiles(samples: dict[str, np.ndarray], confidence: float) -> dict[str, tuple[float, float]]:
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return {k: (float(np.quantile(v, lo_q)), float(np.quantile(v, hi_q))) for k, v in samples.items()}


def _intervals(y_true: np.ndarray, preds: Sequence[np.ndarray], groups: np.ndarray, group_order: Sequence[str],
               num_classes: int, n_boot: int, seed: int, confidence: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of one model's statistics over the within-group resamples (`preds` = (y_pred,)), or of
    the second model's minus the first's, both scored on the very same resamples (`preds` = (reference, candidate))."""
    weights = _resample_weights(groups, group_order, n_boot, seed)
    stats = [_resampled_stats(y_true, pred, groups, group_order, num_classes, weights) for pred in preds]
    samples = stats[0] if len(stats) == 1 else {k: stats[1][k] - stats[0][k] for k in stats[0]}
    return _quantiles(samples, confidence)


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, group_order: Sequence[str],
                        num_classes: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                        confidence: float = DEFAULT_CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Intervals for eopp0/eopp1/eodd/dp (worst pair), accuracy_diff and each group's accuracy.

    Each group is resampled with replacement to its own size, so group sizes stay fixed. Vectorised:
    a resample is a row of multinomial counts, and the confusion counts are one matrix product.
    """
    return _intervals(y_true, (y_pred,), groups, group_order, num_classes, n_boot, seed, confidence)


def bootstrap_difference_intervals(y_true: np.ndarray, reference_pred: np.ndarray, candidate_pred: np.ndarray,
                                   groups: np.ndarray, group_order: Sequence[str], num_classes: int,
                                   n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                                   confidence: float = DEFAULT_CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Paired intervals of candidate minus reference for the same keys as bootstrap_intervals: both models are
    scored on the very same resamples (the images are shared), so the interval is that of the difference.
    An interval that contains 0 means the two models are not distinguishable on that quantity."""
    return _intervals(y_true, (reference_pred, candidate_pred), groups, group_order, num_classes, n_boot, seed,
                      confidence)
