"""Seeded stratified splits: exact per-stratum counts, determinism, lesions kept in one split."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fairdeploy.data.adapters import from_ham10000
from fairdeploy.data.manifest import Record
from fairdeploy.data.splits import assign_splits, check_fractions, split_counts
from fairdeploy.errors import FairdeployError


def _records(sizes: dict[tuple[str, str], int]) -> list[Record]:
    out = []
    for (label, group), n in sizes.items():
        out += [Record(f"{label}_{group}_{i}.jpg", label, group, "") for i in range(n)]
    return out


SIZES = {("mel", "light"): 1, ("mel", "dark"): 2, ("nv", "light"): 3, ("nv", "dark"): 5, ("bcc", "light"): 40,
         ("bcc", "dark"): 101}


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (2, 1, 0)), (4, (3, 1, 0)), (5, (3, 1, 1)),
     (7, (5, 1, 1)), (20, (14, 3, 3)), (100, (70, 15, 15)), (101, (71, 15, 15))],
)
def test_split_counts_hand_computed(n: int, expected: tuple[int, int, int]) -> None:
    assert split_counts(n, (0.7, 0.15, 0.15)) == expected


def test_split_counts_within_rounding_for_any_size() -> None:
    for fractions in [(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.6, 0.4, 0.0)]:
        for n in range(300):
            counts = split_counts(n, fractions)
            assert sum(counts) == n
            for c, f in zip(counts, fractions):
                assert abs(c - n * f) < 1 + 1e-9, (n, fractions, counts)
            if fractions[2] == 0:
                assert counts[2] == 0


def test_split_counts_train_first_even_with_small_train_fraction() -> None:
    assert split_counts(1, (0.1, 0.45, 0.45)) == (1, 0, 0)
    assert split_counts(1, (0.0, 0.5, 0.5)) == (0, 1, 0)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.15, 0.15), r"must sum to 1 \(got train=0.8, val=0.15, test=0.15, sum 1.1\)"),
        ((1.2, -0.1, -0.1), r"must be non-negative numbers \(got train=1.2, val=-0.1, test=-0.1\)"),
        ((0.7, 0.3), r"one value for each of train, val, test \(got 2\)"),
        ((math.nan, 0.5, 0.5), r"non-negative numbers"),
    ],
)
def test_bad_fractions_are_user_errors(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(FairdeployError, match=message):
        check_fractions(fractions)
    with pytest.raises(FairdeployError, match=message):
        assign_splits(_records(SIZES), fractions=fractions)


def test_fractions_within_tolerance_are_accepted() -> None:
    assert check_fractions((0.7, 0.15, 0.1500000001)) == (0.7, 0.15, 0.1500000001)


def test_each_stratum_is_cut_by_split_counts() -> None:
    records = _records(SIZES)
    out = assign_splits(records, seed=0)
    assert [r.image for r in out] == [r.image for r in records]  # order kept, only split changes
    assert [(r.label, r.group) for r in out] == [(r.label, r.group) for r in records]
    got = Counter((r.label, r.group, r.split) for r in out)
    for (label, group), n in SIZES.items():
        expected = split_counts(n, (0.7, 0.15, 0.15))
        assert tuple(got[(label, group, s)] for s in ("train", "val", "test")) == expected


def test_deterministic_for_a_seed_and_independent_of_input_order() -> None:
    records = _records(SIZES)
    a = {r.image: r.split for r in assign_splits(records, seed=7)}
    b = {r.image: r.split for r in assign_splits(list(reversed(records)), seed=7)}
    c = {r.image: r.split for r in assign_splits(records, seed=8)}
    assert a == b
    assert a != c
    assert Counter(a.values()) == Counter(c.values())  # same counts, different members


@pytest.fixture(scope="module")
def ham_records(shared_data: Path) -> list[Record]:
    path = shared_data / "metadata" / "HAM10000_metadata.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return list(from_ham10000(path).records)


def test_no_lesion_in_two_splits_on_real_ham10000(ham_records: list[Record]) -> None:
    out = assign_splits(ham_records, seed=0, id_column="lesion_id")
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in out:
        splits_of[r.get("lesion_id")].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert len(splits_of) < len(out)  # lesions with several images exist, so this is a real check

    # per stratum, the *lesions* are cut by split_counts (stratum = label x group of the first image)
    first: dict[str, Record] = {}
    for r in out:
        first.setdefault(r.get("lesion_id"), r)
    per_stratum: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in first.values():
        per_stratum[(r.label, r.group)][r.split] += 1
    for counter in per_stratum.values():
        n = sum(counter.values())
        assert tuple(counter[s] for s in ("train", "val", "test")) == split_counts(n, (0.7, 0.15, 0.15))

    # image fractions stay close to the target overall
    share = Counter(r.split for r in out)
    assert abs(share["train"] / len(out) - 0.7) < 0.02

    # without the id column, some lesion does cross splits: the grouping is doing work
    loose = assign_splits(ham_records, seed=0)
    crossing: dict[str, set[str]] = defaultdict(set)
    for r in loose:
        crossing[r.get("lesion_id")].add(r.split)
    assert any(len(s) > 1 for s in crossing.values())


def test_empty_id_is_its_own_unit() -> None:
    records = [
        Record(f"{i}.jpg", "a", "g", "", extra=(("lesion_id", "L1" if i < 5 else ""),))
        for i in range(20)
    ]
    out = assign_splits(records, seed=1, id_column="lesion_id")
    assert len({r.split for r in out if r.get("lesion_id") == "L1"}) == 1
    # 16 units (L1 + 15 singles) -> split_counts(16) over units
    units = Counter(r.split for r in out if r.get("lesion_id") == "")
    l1 = next(r.split for r in out if r.get("lesion_id") == "L1")
    units[l1] += 1
    assert tuple(units[s] for s in ("train", "val", "test")) == split_counts(16, (0.7, 0.15, 0.15))
