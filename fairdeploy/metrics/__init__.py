"""Per-group accuracy, macro P/R/F1 and the fairness gaps (Eopp0, Eopp1, Eodd, DP), FATE, bootstrap CIs."""

from fairdeploy.metrics.bootstrap import bootstrap_difference_intervals, bootstrap_intervals
from fairdeploy.metrics.fairness import (
    METRIC_DEFINITIONS,
    GroupMetrics,
    MetricsReport,
    compute_metrics,
    fate,
)

__all__ = [
    "METRIC_DEFINITIONS",
    "GroupMetrics",
    "MetricsReport",
    "bootstrap_difference_intervals",
    "bootstrap_intervals",
    "compute_metrics",
    "fate",
]
