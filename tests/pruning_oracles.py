"""Oracles shared by the pruning tests (imported by them; not a test module)."""

from __future__ import annotations

from fairdeploy.pruning.selection import selection_value


def expected_selection(rec: dict) -> int:
    """Oracle for the selection rule: the first step with the highest selection value among the steps the
    guard accepted, step 0 (the unpruned model) being the baseline."""
    select, target = rec["selection"]["criterion"], rec["selection"]["target"]
    best, best_value = 0, selection_value(rec["steps"][0], select, target)
    for i, step in enumerate(rec["steps"][1:], start=1):
        if step["eligible"] and selection_value(step, select, target) > best_value:
            best, best_value = i, selection_value(step, select, target)
    return best
