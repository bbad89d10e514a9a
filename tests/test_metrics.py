"""compute_metrics against hand-computed cases and scikit-learn on manual masks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import compute_metrics, fate


def test_hand_computed_two_groups():
    # group a: true [0,1] pred [0,1]; group b: true [2,0] pred [1,0]; K = 3
    r = compute_metrics([0, 1, 2, 0], [0, 1, 1, 0], ["a", "a", "b", "b"], num_classes=3)
    # TNR: a = [1,1,1]; b = [1, 0.5, 1]  -> Eopp0 = 0.5/3
    assert r.gap("eopp0") == pytest.approx(0.5 / 3)
    # TPR: a = [1,1,0 (0/0)]; b = [1, 0 (0/0), 0] -> Eopp1 = 1/3
    assert r.gap("eopp1") == pytest.approx(1 / 3)
    # class 1: (TPR_a - TPR_b) + (FPR_a - FPR_b) = (1 - 0) + (0 - 0.5) = 0.5 -> Eodd = 0.5 / (2*3)
    assert r.gap("eodd") == pytest.approx(0.5 / 6)
    # P(yhat=k|a) = [.5,.5,0] = P(yhat=k|b)
    assert r.gap("dp") == pytest.approx(0.0)
    assert r.group("a").accuracy == 1.0 and r.group("b").accuracy == 0.5
    # undefined cells: a has no positives of class 2; b has no positives of class 1
    assert r.undefined_cells == 2
    assert r.overall_accuracy == pytest.approx(0.75)


def test_eodd_takes_absolute_value_of_the_sum():
    # Group a: class 0 TPR 1, FPR 0.  Group b: class 0 TPR 0.5, FPR 0.5 (gaps of opposite sign cancel).
    y_true = [0, 1, 0, 0, 1, 1]
    y_pred = [0, 1, 0, 1, 0, 1]
    groups = ["a", "a", "b", "b", "b", "b"]
    r = compute_metrics(y_true, y_pred, groups, num_classes=2)
    # class 0: (1 - .5) + (0 - .5) = 0 ; class 1: TPR_a=1, TPR_b=.5, FPR_a=0, FPR_b=.5 -> 0
    assert r.gap("eodd") == pytest.approx(0.0)
    assert r.gap("eopp1") == pytest.approx(0.5)  # sum |.5|+|.5| over K=2


def test_matches_sklearn_on_manual_masks():
    rng = np.random.default_rng(0)
    n, K = 400, 5
    y_true = rng.integers(0, K, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, K, n))
    groups = rng.choice(["f", "m", "x"], n, p=[0.5, 0.3, 0.2])
    r = compute_metrics(y_true, y_pred, groups, num_classes=K)
    for g in ("f", "m", "x"):
        mask = groups == g
        m = r.group(g)
        assert m.n == mask.sum()
        assert m.accuracy == pytest.approx(accuracy_score(y_true[mask], y_pred[mask]))
        assert m.precision_macro == pytest.approx(precision_score(y_true[mask], y_pred[mask], average="macro", zero_division=0))
        assert m.recall_macro == pytest.approx(recall_score(y_true[mask], y_pred[mask], average="macro", zero_division=0))
        assert m.f1_macro == pytest.approx(f1_score(y_true[mask], y_pred[mask], average="macro", zero_division=0))
    assert r.overall_f1_macro == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))

    # Eodd (G > 2) = max over pairs of the brute-force definition
    def rates(mask):
        t, p = y_true[mask], y_pred[mask]
        out = []
        for k in range(K):
            tp = np.sum((t == k) & (p == k)); fn = np.sum((t == k) & (p != k))
            fp = np.sum((t != k) & (p == k)); tn = np.sum((t != k) & (p != k))
            out.append((tp / (tp + fn) if tp + fn else 0.0, fp / (fp + tn) if fp + tn else 0.0,
                        tn / (tn + fp) if tn + fp else 0.0, np.mean(p == k)))
        return np.array(out)

    worst = {"eodd": 0.0, "eopp0": 0.0, "eopp1": 0.0, "dp": 0.0}
    for a, b in itertools.combinations(["f", "m", "x"], 2):
        ra, rb = rates(groups == a), rates(groups == b)
        worst["eodd"] = max(worst["eodd"], np.mean(np.abs((ra[:, 0] - rb[:, 0]) + (ra[:, 1] - rb[:, 1]))) / 2)
        worst["eopp1"] = max(worst["eopp1"], np.mean(np.abs(ra[:, 0] - rb[:, 0])))
        worst["eopp0"] = max(worst["eopp0"], np.mean(np.abs(ra[:, 2] - rb[:, 2])))
        worst["dp"] = max(worst["dp"], np.sum(np.abs(ra[:, 3] - rb[:, 3])))
    for k, v in worst.items():
        assert r.gap(k) == pytest.approx(v), k


def test_group_without_samples_of_a_class_uses_zero_and_is_counted():
    # group b has no class-2 samples and never predicts it: TPR_2^b is 0/0 -> 0, counted as undefined.
    r = compute_metrics([0, 1, 2, 0, 1], [0, 1, 2, 0, 1], ["a", "a", "a", "b", "b"], num_classes=3)
    assert r.group("b").tpr[2] == 0.0
    assert r.gap("eopp1") == pytest.approx(1 / 3)  # |1 - 0| on class 2 only, a "gap" made by the 0/0 rule
    assert r.undefined_cells == 1


def test_num_classes_larger_than_present_divides_by_K():
    r2 = compute_metrics([0, 1, 0, 1], [0, 1, 1, 1], ["a", "a", "b", "b"], num_classes=2)
    r4 = compute_metrics([0, 1, 0, 1], [0, 1, 1, 1], ["a", "a", "b", "b"], num_classes=4)
    assert r4.gap("eopp1") == pytest.approx(r2.gap("eopp1") * 2 / 4)
    assert r4.num_classes == 4 and len(r4.group("a").tpr) == 4
    # classes 2 and 3 have no positives in either group: 2 classes x 2 groups undefined TPR cells
    assert r4.undefined_cells == 4


def test_single_group_has_no_gaps():
    r = compute_metrics([0, 1, 1], [0, 1, 0], ["only"] * 3, num_classes=2)
    assert all(v is None for _, v in r.fairness)
    assert r.group("only").accuracy == pytest.approx(2 / 3)
    json.dumps(r.to_dict())  # the documented JSON shape holds None for the gaps
    assert r.to_dict()["fairness"]["eodd"] is None


def test_int_groups_are_reported_as_strings_and_shape_is_stable():
    r = compute_metrics(np.array([0, 1]), np.array([0, 0]), np.array([0, 1]), num_classes=2)
    d = r.to_dict()
    assert set(d["groups"]) == {"0", "1"}
    assert set(d) >= {"n", "num_classes", "overall", "groups", "fairness"}
    assert set(d["overall"]) == {"accuracy", "f1_macro"}
    assert set(d["groups"]["0"]) >= {"n", "accuracy", "precision_macro", "recall_macro", "f1_macro"}
    assert set(d["fairness"]) == {"eopp0", "eopp1", "eodd", "dp"}


def test_fate_hand_computed():
    base = compute_metrics([0, 1, 0, 1], [0, 1, 1, 1], ["a", "a", "b", "b"], num_classes=2)
    fixed = compute_metrics([0, 1, 0, 1], [0, 1, 0, 1], ["a", "a", "b", "b"], num_classes=2)
    f = fate(fixed, base)
    # F1 rises from base to 1.0 and Eodd falls to 0: FATE = (1 - F1_b)/F1_b - (0 - Eodd_b)/Eodd_b
    expect = (1 - base.overall_f1_macro) / base.overall_f1_macro + 1
    assert f["eodd"] == pytest.approx(expect)
    assert fate(base, base)["eodd"] == pytest.approx(0.0)


def test_bootstrap_intervals_bracket_the_point_and_are_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    g = rng.choice(["a", "b"], 300)
    r1 = compute_metrics(y, p, g, 3, bootstrap=300, seed=5)
    r2 = compute_metrics(y, p, g, 3, bootstrap=300, seed=5)
    assert r1.intervals == r2.intervals
    ci = dict(r1.intervals)
    lo, hi = ci["accuracy[a]"]
    assert lo <= r1.group("a").accuracy <= hi
    assert hi - lo < 0.25


def test_bootstrap_resamples_within_groups_brute_force():
    # With one resample the vectorised bootstrap must equal a brute-force recomputation on the same counts.
    from fairdeploy.metrics.bootstrap import bootstrap_intervals

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    p = np.where(rng.random(60) < 0.6, y, rng.integers(0, 3, 60))
    g = np.array(["a"] * 25 + ["b"] * 35)
    ci = bootstrap_intervals(y, p, g, ["a", "b"], 3, n_boot=1, seed=11, confidence=0.0)
    # reproduce the multinomial draw and recompute with compute_metrics on the repeated rows
    r = np.random.default_rng(11)
    idx = []
    for name in ["a", "b"]:
        rows = np.flatnonzero(g == name)
        counts = r.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)))
        idx.extend(np.repeat(rows, counts))
    idx = np.array(idx)
    ref = compute_metrics(y[idx], p[idx], g[idx], 3)
    for key in ("eodd", "eopp0", "eopp1", "dp"):
        assert ci[key][0] == pytest.approx(ref.gap(key))


def test_bootstrap_quantiles_equal_a_brute_force_loop_over_resamples():
    # Oracle for the whole interval (not only one resample): redraw every resample in the same RNG order,
    # recompute each with compute_metrics on the repeated rows, and take the same percentiles.
    from fairdeploy.metrics.bootstrap import bootstrap_intervals

    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 80)
    p = np.where(rng.random(80) < 0.65, y, rng.integers(0, 3, 80))
    g = np.array(["a"] * 30 + ["b"] * 50)
    n_boot = 40
    ci = bootstrap_intervals(y, p, g, ["a", "b"], 3, n_boot=n_boot, seed=4, confidence=0.9)
    r = np.random.default_rng(4)
    draws = {}
    for name in ["a", "b"]:
        rows = np.flatnonzero(g == name)
        draws[name] = [np.repeat(rows, r.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows))))
                       for _ in range(n_boot)]
    per_key: dict[str, list[float]] = {k: [] for k in ("eodd", "eopp0", "eopp1", "dp", "accuracy[b]")}
    for i in range(n_boot):
        idx = np.concatenate([draws["a"][i], draws["b"][i]])
        ref = compute_metrics(y[idx], p[idx], g[idx], 3)
        for key in ("eodd", "eopp0", "eopp1", "dp"):
            per_key[key].append(ref.gap(key))
        per_key["accuracy[b]"].append(ref.group("b").accuracy)
    for key, values in per_key.items():
        want = (np.quantile(values, 0.05), np.quantile(values, 0.95))
        assert ci[key] == pytest.approx(want), key
    assert ci["eodd"][1] - ci["eodd"][0] > 0.01  # a real spread, so the comparison above is not trivial


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(y_true=[0, 1], y_pred=[0], groups=["a", "a"], num_classes=2), "same length"),
        (dict(y_true=[0, 5], y_pred=[0, 1], groups=["a", "b"], num_classes=2), "class index 5"),
        (dict(y_true=[], y_pred=[], groups=[], num_classes=2), "zero samples"),
        (dict(y_true=[0, 1], y_pred=[0, 1], groups=["a", "a"], num_classes=2, group_order=["a", "b"]), "group 'b' has no samples"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(FairdeployError, match=message):
        compute_metrics(**kwargs)
