"""Issue 21 §5, choosing across runs (fairdeploy.pruning.choose, `fairdeploy rank`). The rule is checked on
hand-made predictions whose outcome is constructed (the oracles: a sort done by hand with numpy and scikit-learn,
paired_comparison on the same predictions, the guard's drops by hand, and intervals whose sign follows from how
the predictions were built); the command on real checkpoints (the trained session model and a copy whose head is
set by hand to predict one class), its JSON against predictions recomputed here; and the error lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fairdeploy.data.synth import CLASSES as SYNTH_CLASSES
from fairdeploy.models.checkpoint import ModelSpec
from fairdeploy.models.size import ModelSize
from fairdeploy.pruning.choose import RankConfig, rank_predictions
from fairdeploy.pruning.paired import paired_comparison
from fairdeploy.training.predict import Predictions

GROUPS = ("dark", "light")
CLASSES = ("c0", "c1", "c2")
SPEC = ModelSpec("resnet18", CLASSES, GROUPS, image_size=32)
N_DARK, N_LIGHT = 40, 60
CFG = RankConfig(bootstrap=200, seed=3)


def _images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (every class in both groups) and group indices: 40 dark images, then 60 light ones."""
    labels = np.random.default_rng(seed).permutation(np.arange(N_DARK + N_LIGHT) % len(CLASSES))
    return labels.astype(np.int64), np.array([0] * N_DARK + [1] * N_LIGHT, dtype=np.int64)


LABELS, GROUP_IDX = _images()


def _pred(wrong: np.ndarray | list[int], labels: np.ndarray = LABELS) -> Predictions:
    """Predictions right on every image except the indices in `wrong` (there: the next class)."""
    predicted = labels.copy()
    idx = np.asarray(wrong, dtype=int)
    predicted[idx] = (labels[idx] + 1) % len(CLASSES)
    logits = np.eye(len(CLASSES), dtype=np.float32)[predicted]
    return Predictions(logits=logits, labels=labels, groups=GROUP_IDX)


def _size(macs: int) -> ModelSize:
    return ModelSize(params=macs // 10, nonzero_params=macs // 10, macs=macs)


def _rank(models: dict[str, tuple[Predictions, int]], reference: Predictions | None = None, cfg: RankConfig = CFG):
    names = list(models)
    return rank_predictions(names, names, [SPEC] * len(names), [_size(models[n][1]) for n in names],
                            [models[n][0] for n in names], reference, cfg,
                            reference_name=None if reference is None else "dense")


DARK = np.arange(N_DARK)  # image indices of each group
LIGHT = np.arange(N_DARK, N_DARK + N_LIGHT)
# A: 4 dark errors, no light error (dark 0.90 is its worst group, light 1.0)
A_WRONG = list(DARK[:4])


# ---- the order ----

def _by_hand(pred: Predictions) -> tuple[float, float]:
    """(worst-group accuracy, macro-F1) with numpy and scikit-learn."""
    right = pred.predicted == pred.labels
    worst = min(right[pred.groups == g].mean() for g in range(len(GROUPS)))
    return float(worst), float(f1_score(pred.labels, pred.predicted, average="macro", zero_division=0))


def test_order_is_worst_group_then_macro_f1_then_fewer_macs_as_sorted_by_hand() -> None:
    rng = np.random.default_rng(7)
    models = {f"r{i}": (_pred(np.flatnonzero(rng.random(N_DARK + N_LIGHT) < rate)), int(rng.integers(10, 99)) * 10**6)
              for i, rate in enumerate((0.05, 0.1, 0.15, 0.2, 0.3))}
    models["a"] = (_pred(A_WRONG), 300 * 10**6)
    models["a-same-smaller"] = (_pred(A_WRONG), 200 * 10**6)  # a tie on both metrics: fewer MACs first
    models["a-light-error"] = (_pred([*A_WRONG, LIGHT[0]]), 100 * 10**6)  # the same worst group, lower macro-F1
    ranking = _rank(models)
    keys = {n: (*_by_hand(p), macs) for n, (p, macs) in models.items()}
    expected = sorted(models, key=lambda n: (-keys[n][0], -keys[n][1], keys[n][2]))
    assert [m.name for m in ranking.models] == expected
    position = {n: i for i, n in enumerate(expected)}
    assert position["a-same-smaller"] + 1 == position["a"] and position["a"] < position["a-light-error"]
    for m in ranking.models:  # the figures the table prints are the hand-computed ones
        assert m.val.worst_group_accuracy == pytest.approx(keys[m.name][0], abs=1e-12)
        assert m.val.f1_macro == pytest.approx(keys[m.name][1], abs=1e-12)
    assert ranking.best == expected[0] and ranking.model(expected[0]).vs_best is None


def test_each_verdict_prints_the_paired_comparison_of_the_same_predictions() -> None:
    rng = np.random.default_rng(11)
    models = {f"m{i}": (_pred(np.flatnonzero(rng.random(N_DARK + N_LIGHT) < rate)), (5 - i) * 10**6)
              for i, rate in enumerate((0.05, 0.12, 0.25, 0.4))}
    ranking = _rank(models)
    best = models[ranking.best][0]
    for m in ranking.models:
        if m.name == ranking.best:
            assert m.verdict.startswith(f"{m.name}: the best on worst-group accuracy")
            continue
        oracle = paired_comparison(models[m.name][0], best, GROUPS, len(CLASSES), CFG.bootstrap, CFG.seed)
        assert m.vs_best == oracle
        wga = oracle.worst_group_accuracy
        outcome = "worse (interval below 0)" if wga.ci95[1] < 0 else "not shown worse"
        assert m.verdict == f"{m.name}: worst-group accuracy {wga.text()} vs {ranking.best} — {outcome}"
    # the last model errs on ~40 % of the images: a decision the intervals must make
    assert ranking.models[-1].shown_worse


# ---- the recommendation: the fewest MACs not shown worse ----

def test_the_smallest_model_clearly_worse_is_passed_over_for_the_next_smallest() -> None:
    """B = A plus one dark error: its worst-group difference is <= 0 in every resample and exactly 0 whenever
    that image is left out (in about (39/40)^40 = 36 % of them), so its interval's upper end is 0: not shown worse.
    C = A plus 16 dark errors (A's light group is perfect, so dark stays each model's worst group): the difference
    is 0 only when none of the 16 is drawn (probability 0.6^40 ~ 1e-9): worse."""
    models = {"A": (_pred(A_WRONG), 300 * 10**6), "B": (_pred([*A_WRONG, DARK[4]]), 200 * 10**6),
              "C": (_pred([*A_WRONG, *DARK[4:20]]), 100 * 10**6)}
    ranking = _rank(models)
    assert [m.name for m in ranking.models] == ["A", "B", "C"] and ranking.best == "A"
    b, c = ranking.model("B"), ranking.model("C")
    assert b.vs_best.worst_group_accuracy.difference == pytest.approx(-1 / N_DARK)
    assert b.vs_best.worst_group_accuracy.ci95[1] == 0.0 and not b.shown_worse
    assert c.vs_best.worst_group_accuracy.difference == pytest.approx(-16 / N_DARK)
    assert c.vs_best.worst_group_accuracy.ci95[1] < 0 and c.shown_worse
    assert b.verdict.endswith("— not shown worse") and c.verdict.endswith("— worse (interval below 0)")
    assert ranking.recommended == "B"
    assert ranking.recommendation.startswith("recommended: B: 200.0 M MACs (x0.667 of A's), the fewest among")
    assert b.vs_best.worst_group_accuracy.text() in ranking.recommendation  # the interval that made it eligible


def test_the_smallest_model_that_ties_is_recommended() -> None:
    """D = A plus one light error: the same worst group (dark 0.90) and lower macro-F1, so it ranks second; its
    difference is <= 0 in every resample and 0 whenever that light image is left out: not shown worse."""
    models = {"A": (_pred(A_WRONG), 300 * 10**6), "B": (_pred([*A_WRONG, DARK[4]]), 200 * 10**6),
              "D": (_pred([*A_WRONG, LIGHT[0]]), 100 * 10**6)}
    ranking = _rank(models)
    assert [m.name for m in ranking.models] == ["A", "D", "B"]
    d = ranking.model("D")
    assert d.vs_best.worst_group_accuracy.difference == 0.0 and d.vs_best.worst_group_accuracy.ci95[1] == 0.0
    assert ranking.recommended == "D"
    assert ranking.recommendation.startswith("recommended: D: 100.0 M MACs (x0.333 of A's), the fewest among")


def test_the_best_is_recommended_when_every_smaller_model_is_shown_worse() -> None:
    models = {"A": (_pred(A_WRONG), 300 * 10**6), "C": (_pred([*A_WRONG, *DARK[4:20]]), 100 * 10**6)}
    ranking = _rank(models)
    assert ranking.recommended == "A"
    assert ranking.recommendation.startswith("recommended: A: 300.0 M MACs, the fewest among the models")


def test_a_one_class_model_is_never_recommended_even_ranked_first() -> None:
    """Labels mostly c0 (38 of 40 dark, 57 of 60 light): predicting c0 everywhere scores 0.95 in both groups, above
    A's 0.90, with the fewest MACs. It ranks first, but A is the best the others are compared with and the
    recommendation."""
    labels = np.array([1, 2] + [0] * 38 + [1, 2, 1] + [0] * 57, dtype=np.int64)
    constant = Predictions(logits=np.eye(3, dtype=np.float32)[np.zeros(100, dtype=int)], labels=labels,
                           groups=GROUP_IDX)
    a = _pred([0, 1, 2, 3], labels)  # wrong on both rare dark images and two c0 ones: dark 0.90, light 1.0
    ranking = _rank({"A": (a, 300 * 10**6), "S": (constant, 10**6)})
    assert [m.name for m in ranking.models] == ["S", "A"]
    s = ranking.model("S")
    assert s.degenerate == "predicts a single class (c0)" and "never recommended" in s.verdict
    assert ranking.best == "A" and s.vs_best == paired_comparison(constant, a, GROUPS, 3, CFG.bootstrap, CFG.seed)
    assert not s.shown_worse  # without the one-class rule it would win on MACs
    assert ranking.recommended == "A"


# ---- the guard against a reference ----

def test_guard_verdicts_equal_the_drops_computed_by_hand() -> None:
    dense = _pred(A_WRONG)
    models = {"A": (_pred(A_WRONG), 300 * 10**6), "B": (_pred([*A_WRONG, DARK[4]]), 200 * 10**6),
              "D": (_pred([*A_WRONG, LIGHT[0]]), 100 * 10**6), "E": (_pred([*A_WRONG, *LIGHT[:8]]), 50 * 10**6)}
    for max_group_drop in (0.01, 0.02, 0.03):
        cfg = RankConfig(max_group_drop=max_group_drop, bootstrap=CFG.bootstrap, seed=CFG.seed)
        ranking = _rank(models, reference=dense, cfg=cfg)
        ref_right = dense.predicted == dense.labels
        for name, (pred, _) in models.items():
            right = pred.predicted == pred.labels
            drops = {g: ref_right[pred.groups == i].mean() - right[pred.groups == i].mean()
                     for i, g in enumerate(GROUPS)}
            f1_drop = (f1_score(dense.labels, dense.predicted, average="macro")
                       - f1_score(pred.labels, pred.predicted, average="macro"))
            failed = sorted(g for g, d in drops.items() if d > max_group_drop)
            expected_pass = not failed and f1_drop <= cfg.max_f1_drop
            guard = ranking.model(name).guard
            assert guard.passed == expected_pass, (name, max_group_drop)
            assert guard.group_accuracy_change == pytest.approx({g: -d for g, d in drops.items()}, abs=1e-12)
            for g in failed:  # the group and its drop are named in the model's line
                line = f"group {g} lost {drops[g]:.4f} accuracy (> {max_group_drop})"
                assert line in guard.failed_because and line in ranking.model(name).verdict
        passing = [n for n in models if ranking.model(n).guard.passed]
        # the fewest MACs among those that pass (none of B, D, E is shown worse: each differs from A by errors
        # that leave the worst-group difference 0 whenever they are not drawn)
        assert ranking.recommended == min(passing, key=lambda n: models[n][1])
    # E loses 8 light images, so light becomes its worst group, below A's dark (0.90): not the dark-vs-dark case
    # of the comment above; under the seeded bootstrap the worst-group difference's interval still reaches 0, so
    # E is not shown worse and only the guard excludes it
    assert not _rank(models, reference=dense).model("E").shown_worse


def test_no_recommendation_when_no_model_passes_the_guard() -> None:
    dense = _pred([])
    models = {"A": (_pred(A_WRONG), 300 * 10**6), "B": (_pred([*A_WRONG, DARK[4]]), 200 * 10**6)}
    ranking = _rank(models, reference=dense)
    assert ranking.recommended is None
    assert ranking.recommendation.startswith("no recommendation: no model passes the guard")


def test_the_default_tolerances_are_the_compression_guards() -> None:
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.selection import Guard

    assert RankConfig().max_group_drop == Guard().max_group_drop
    assert RankConfig().max_f1_drop == BudgetConfig().max_f1_drop


# ---- the command on real checkpoints ----

@pytest.fixture(scope="module")
def one_class_copy(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model with its head set by hand: weights 0, bias +5 on the last class (it predicts it
    everywhere)."""
    import torch

    from fairdeploy.models.checkpoint import load_checkpoint, save_checkpoint

    net, spec = load_checkpoint(trained_checkpoint)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.bias[-1] = 5.0
    return save_checkpoint(net, spec, tmp_path_factory.mktemp("rank") / "one-class")


def test_rank_command_on_real_checkpoints(run_main, trained_checkpoint: Path, one_class_copy: Path,
                                          synth_manifest: Path, tmp_path: Path) -> None:
    import torch

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size
    from fairdeploy.training.predict import predict

    out = tmp_path / "rank.json"
    code, stdout, err = run_main("rank", "--data", str(synth_manifest), "--model", str(trained_checkpoint),
                                 "--model", str(one_class_copy), "--reference", str(trained_checkpoint),
                                 "--device", "cpu", "--out", str(out))
    assert code == 0, err
    got = json.loads(out.read_text())
    manifest = read_manifest(synth_manifest)
    preds, sizes = {}, {}
    for path in (trained_checkpoint, one_class_copy):
        net, spec = load_checkpoint(path)
        val = split_dataset(manifest, "val", Encoding(spec.classes, spec.groups),
                            eval_transform(spec.image_size, spec.mean, spec.std))
        preds[str(path)], sizes[str(path)] = predict(net, val, torch.device("cpu")), model_size(net, spec.image_size)
    assert len(set(preds[str(one_class_copy)].predicted.tolist())) == 1  # the head does what it was set to
    # the precondition of "the only model with two classes" below, checked on its own so a failure names it
    assert len(set(preds[str(trained_checkpoint)].predicted.tolist())) > 1
    assert got["split"] == "val" and got["val_images"] == len(manifest.split("val"))
    for m in got["models"]:
        p = preds[m["name"]]
        report = compute_metrics(p.labels, p.predicted, np.asarray(spec.groups)[p.groups], spec.num_classes,
                                 group_order=list(spec.groups))
        assert m["val"]["group_accuracy"] == pytest.approx({g: r.accuracy for g, r in report.groups}, abs=1e-12)
        assert m["val"]["fairness"]["eodd"] == pytest.approx(report.gap("eodd"), abs=1e-12)
        assert m["size"] == sizes[m["name"]].to_dict()
    one = next(m for m in got["models"] if m["name"] == str(one_class_copy))
    assert one["degenerate"] == f"predicts a single class ({spec.classes[-1]})"
    assert got["best"] == got["recommended"] == str(trained_checkpoint)  # the only model with two classes
    best = next(m for m in got["models"] if m["name"] == got["best"])
    assert best["guard"]["passed"] and best["guard"]["group_accuracy_change"] == {g: 0.0 for g in spec.groups}
    oracle = paired_comparison(preds[one["name"]], preds[best["name"]], spec.groups, spec.num_classes,
                               RankConfig().bootstrap, RankConfig().seed)
    assert one["vs_best"] == oracle.to_dict()
    flat = " ".join(stdout.split())
    assert f"worst-group accuracy {oracle.worst_group_accuracy.text()} vs {best['name']}" in flat
    assert stdout.strip().splitlines()[-1].startswith(f"recommended: {best['name']}")
    # a second run replaces its own JSON; a file that is not a ranking is refused, one line, kept
    assert run_main("rank", "--data", str(synth_manifest), "--model", str(trained_checkpoint), "--model",
                    str(one_class_copy), "--device", "cpu", "--out", str(out))[0] == 0
    assert json.loads(out.read_text())["reference"] is None
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code, _, err = run_main("rank", "--data", str(synth_manifest), "--model", str(trained_checkpoint), "--model",
                            str(one_class_copy), "--device", "cpu", "--out", str(notes))
    assert code == 2 and len(err.strip().splitlines()) == 1 and notes.read_text() == '{"mine": 1}\n'


# ---- bad input: one line, exit 2, before any model is loaded ----

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained mobilenet_v3_small checkpoints (16 px): two of the synthetic task, one with another class list and
    one with other groups."""
    from fairdeploy.models.checkpoint import save_checkpoint
    from fairdeploy.models.registry import create_model

    root = tmp_path_factory.mktemp("rank_tiny")
    specs = {"a": SYNTH_CLASSES, "b": SYNTH_CLASSES, "classes": ("x", "y", "z")}
    out = {}
    for name, classes in specs.items():
        out[name] = save_checkpoint(create_model("mobilenet_v3_small", 3),
                                    ModelSpec("mobilenet_v3_small", classes, ("dark", "light"), image_size=16),
                                    root / name)
    out["groups"] = save_checkpoint(create_model("mobilenet_v3_small", 3),
                                    ModelSpec("mobilenet_v3_small", specs["a"], ("female", "male"), image_size=16),
                                    root / "groups")
    return out


def _no_val_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "no-val.csv"
    path.write_text("image,label,group,split\na.png,disc,dark,train\nb.png,ring,light,test\n")
    return path


def test_bad_input_is_one_line_exit_2(run_main, tiny_checkpoints: dict[str, Path], synth_manifest: Path,
                                      tmp_path: Path) -> None:
    a, b = str(tiny_checkpoints["a"]), str(tiny_checkpoints["b"])
    data = ("--data", str(synth_manifest))
    cases = [
        ((*data, "--model", a, "--model", str(tmp_path / "missing")), ["missing", "not a directory"]),
        ((*data, "--model", a), ["at least two models", "got 1"]),
        ((*data, "--model", a, "--model", a), ["given twice"]),
        ((*data, "--model", a, "--model", str(tiny_checkpoints["classes"])),
         [a, str(tiny_checkpoints["classes"]), "different classes", f"{', '.join(SYNTH_CLASSES)} vs x, y, z"]),
        ((*data, "--model", a, "--model", b, "--reference", str(tiny_checkpoints["groups"])),
         ["(the reference)", "different groups", "dark, light vs female, male"]),
        (("--data", str(_no_val_manifest(tmp_path)), "--model", a, "--model", b), ["no-val.csv", "no val split"]),
        ((*data, "--model", a, "--model", b, "--max-group-drop", "2"), ["--max-group-drop", "[0, 1]", "2"]),
    ]
    for args, needles in cases:
        code, _, err = run_main("rank", *args, "--device", "cpu")
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (args, err)
        assert "Traceback" not in err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
