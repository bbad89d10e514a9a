"""Score sets: the same number of samples per group, stratified by class; group-balanced batch orders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fairdeploy.errors import FairdeployError

DEFAULT_SCORE_SAMPLES = 64  # images per group (class-stratified) that a criterion scores on
DEFAULT_SCORE_BATCH_SIZE = 32  # the batch of the gradient / curvature passes over the score sets


def stratified_sample(labels: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """`n` positions of `labels`, spread over its classes as evenly as their sizes allow (round robin over
    classes in random order, random samples inside each class), without replacement."""
    labels = np.asarray(labels)
    by_class = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    order = [int(c) for c in rng.permutation(sorted(by_class))]
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for c in order:
            if by_class[c] and len(out) < n:
                out.append(int(by_class[c].pop()))
    return sorted(out)


def group_score_sets(labels: Sequence[int], groups: Sequence[int], group_ids: Sequence[int], n_per_group: int,
                     seed: int) -> dict[int, list[int]]:
    """Dataset indices per group: the same count for each of `group_ids` (the smaller of `n_per_group` and
    the smallest group), class-stratified inside each group."""
    if n_per_group < 1:
        raise FairdeployError(f"score samples per group must be >= 1, got {n_per_group}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    members = {g: np.flatnonzero(groups == g) for g in group_ids}
    n = min([n_per_group, *(len(m) for m in members.values())])
    if n == 0:
        raise FairdeployError("a group has no samples to score with")
    rng = np.random.default_rng(seed)
    return {g: sorted(int(members[g][i]) for i in stratified_sample(labels[members[g]], n, rng)) for g in group_ids}


def balanced_batch_order(groups: Sequence[int], group_ids: Sequence[int], batch_size: int, n_batches: int,
                         seed: int) -> tuple[list[int], int]:
    """Dataset indices forming `n_batches` consecutive, equally sized batches with the same count of each
    group in every batch (a group's samples are reshuffled and reused when it runs out). Returns the order
    and the batch size actually used (at most `batch_size`, a multiple of the number of groups)."""
    groups = np.asarray(groups)
    pools = {g: np.flatnonzero(groups == g) for g in group_ids}
    per = min([batch_size // len(group_ids), *(len(p) for p in pools.values())])
    if per < 2:
        raise FairdeployError(
            f"balanced batches need at least 2 samples of each of {len(group_ids)} groups per batch "
            f"(batch size {batch_size}, smallest group {min(len(p) for p in pools.values())})"
        )
    rng = np.random.default_rng(seed)
    queues: dict[int, list[int]] = {g: [] for g in group_ids}
    order: list[int] = []
    for _ in range(n_batches):
        for g in group_ids:
            if len(queues[g]) < per:
                queues[g].extend(int(i) for i in rng.permutation(pools[g]))
            order.extend(queues[g][:per])
            del queues[g][:per]
    return order, per * len(group_ids)
