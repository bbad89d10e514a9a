"""Compression to a tolerance: the search's rounds, stop, reach, the control forced to the candidate's budget and the
comparison there, on a constructed case (the validation figures are a known function of the MACs a model keeps,
so the oracle is computed by hand); plus the round schedule and the CLI's configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fairdeploy.metrics import compute_metrics


def _report(dark: float, light: float):
    """A validation report with 100 images per group (2 classes) and the given per-group accuracies."""
    y = np.array([0, 1] * 100)
    g = np.array(["dark"] * 100 + ["light"] * 100)
    p = y.copy()
    for start, acc in ((0, dark), (100, light)):
        wrong = 100 - round(acc * 100)
        p[start:start + wrong] = 1 - p[start:start + wrong]
    return compute_metrics(y, p, g, 2, group_order=["dark", "light"])


@pytest.fixture()
def constructed(monkeypatch: pytest.MonkeyPatch):
    """Patch the run so that validation accuracy depends only on the MACs kept and the run's criterion: `dark`
    keeps 0.80 while the model keeps more than `knee[criterion]` of the input's MACs, then falls to 0.70 (past any
    tolerance below 0.1); fine-tuning changes nothing. Returns the knees and the evaluation log.

    Each knee sits half a round (in log MACs) below a round's target, at 0.75 ** (r + 0.5) for step 0.75: round r
    keeps at most 0.75 ** r (the removal's guarantee) and passes as long as the removal, whose channels come from
    a trained model and differ by CPU, does not undershoot its target by more than 13 % of it; the test checks
    that margin first, so an undershoot fails with its own message rather than as a wrong round."""
    import fairdeploy.pruning.budget as budget
    from fairdeploy.models.size import model_size
    from fairdeploy.training.loop import FitResult

    knee = {"fairprune": 0.75 ** 3.5, "magnitude": 0.75 ** 1.5}  # 0.365 (past round 3), 0.650 (past round 1)
    state: dict[str, object] = {"criterion": None, "base": None, "log": []}
    real_prepare = budget.prepare_importance

    def prepare(criterion, model, dg, ignored, data, device):
        state["criterion"] = criterion
        return real_prepare("magnitude", model, dg, ignored, data, device)  # cheap real scores, real removal

    def evaluate(model, dataset, spec, device, batch_size=0, progress=None, **kw):
        macs = model_size(model, spec.image_size).macs
        if state["base"] is None:
            state["base"] = macs
        frac = macs / state["base"]
        crit = state["criterion"]
        dark = 0.80 if crit is None or frac > knee[crit] else 0.70
        state["log"].append((crit, frac))
        return _report(dark, 0.90)

    def finetune(model, spec, train_ds, val_ds, cfg, scratch, device, masks=None, progress=None, task="", teacher=None):
        return model, FitResult(best_epoch=1, best_score=0.0,
                                history=({"data_order": "fixed", "train_samples_per_s": 1.0},), best_dir=scratch)

    real_remove = budget.remove_to_budget
    monkeypatch.setattr(budget, "remove_to_budget",  # fewer bisection steps: the search, not the removal, is tested
                        lambda *a, **kw: real_remove(*a, **{**kw, "iterations": 6}))
    monkeypatch.setattr(budget, "prepare_importance", prepare)
    monkeypatch.setattr(budget, "evaluate_model", evaluate)
    monkeypatch.setattr(budget, "finetune_model", finetune)
    return knee, state


def test_round_fractions_are_geometric() -> None:
    from fairdeploy.pruning.budget import BudgetConfig, round_fraction

    search = BudgetConfig(step=0.75)
    assert [round_fraction(search, r) for r in (1, 2, 3)] == pytest.approx([0.75, 0.5625, 0.421875])
    budget = BudgetConfig(target=0.25, rounds=2)
    assert [round_fraction(budget, r) for r in (1, 2)] == pytest.approx([0.5, 0.25])


def test_search_stops_at_the_first_failing_round_and_hands_on_the_last_passing_one(
        constructed, biased_checkpoint, synth_manifest, tmp_path, one_thread) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint

    knee, state = constructed
    cfg = BudgetConfig(criterion="fairprune", control="magnitude", step=0.75, max_group_drop=0.05,
                       score_samples=4, bootstrap=20, keep_rounds=False)
    rec = compress_checkpoint(biased_checkpoint, read_manifest(synth_manifest), tmp_path / "out", cfg, "cpu").record
    # the oracle: round r keeps at most 0.75**r of the MACs and, by the fixture's margin, more than 0.75**(r+0.5);
    # fairprune passes while > 0.365 (rounds 1-3: 0.75, 0.56, 0.42), fails at round 4 (<= 0.32) and stops
    # (patience 1)
    cand = rec.runs["candidate"]
    fracs = [r.finetuned.size.macs / rec.input_size.macs for r in cand.rounds]
    assert len(cand.rounds) == 4
    for r, f in enumerate(fracs, start=1):
        assert 0.75 ** (r + 0.5) < f <= 0.75 ** r + 1e-9, f"round {r} kept {f:.4f}: the removal undershot its target"
    assert [r.passed for r in cand.rounds] == [f > knee["fairprune"] for f in fracs] == [True, True, True, False]
    assert cand.reached is not None and cand.reached.round == 3
    assert cand.reached.macs_fraction == pytest.approx(fracs[2])
    assert "round 4" in cand.stopped_because and "failed the guard" in cand.stopped_because
    # the control (magnitude: passes while > 0.650) fails at round 2 but is forced on to the candidate's round 3
    ctrl = rec.runs["control"]
    cfracs = [r.finetuned.size.macs / rec.input_size.macs for r in ctrl.rounds]
    for r, f in enumerate(cfracs, start=1):
        assert 0.75 ** (r + 0.5) < f <= 0.75 ** r + 1e-9, f"control round {r} kept {f:.4f}: the removal undershot"
    assert [r.passed for r in ctrl.rounds] == [f > knee["magnitude"] for f in cfracs] == [True, False, False]
    assert [r.forced for r in ctrl.rounds] == [False, False, True]
    assert ctrl.reached.round == 1 and ctrl.reached.macs_fraction == pytest.approx(cfracs[0])
    # reach comparison: ratio of MAC reductions, and the paired comparison at the candidate's budget (round 3)
    assert rec.reach.reduction_ratio == pytest.approx(cfracs[0] / fracs[2])
    assert rec.reach.at_candidate_budget == cand.reached.model
    assert rec.comparison is not None
    assert "compression reached at max group drop 0.05" in rec.verdict and f"{rec.reach.reduction_ratio:.2f}x" in rec.verdict
    # the output is the reached model: its MACs are round 3's
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size

    m, spec = load_checkpoint(tmp_path / "out")
    assert model_size(m, spec.image_size).macs == cand.rounds[2].finetuned.size.macs
    c, _ = load_checkpoint(tmp_path / "out" / "control")
    assert model_size(c, spec.image_size).macs == ctrl.rounds[0].finetuned.size.macs
    saved = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert saved["mode"] == "tolerance" and saved["budget"] is None
    assert saved["runs"]["candidate"]["reached"]["round"] == 3
    assert saved["comparison"]["reach"]["at_candidate_budget"] == cand.reached.model


def test_search_that_reaches_nothing_hands_on_the_input_model(constructed, biased_checkpoint, synth_manifest, tmp_path,
                                                               one_thread) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint

    knee, _ = constructed
    knee["fairprune"] = 0.99  # every round fails
    cfg = BudgetConfig(criterion="fairprune", control="none", step=0.75, max_group_drop=0.05, score_samples=4,
                       keep_rounds=False)
    rec = compress_checkpoint(biased_checkpoint, read_manifest(synth_manifest), tmp_path / "out", cfg, "cpu").record
    assert len(rec.runs["candidate"].rounds) == 1
    assert rec.selected.model == "input" and rec.selected.macs_fraction == 1.0
    assert "uncompressed" in rec.selected.note
    assert rec.verdict.startswith("no control was run")


def test_search_stops_at_the_floor(constructed, biased_checkpoint, synth_manifest, tmp_path, one_thread) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint

    knee, _ = constructed
    knee["fairprune"] = 0.0  # never fails: the floor ends it
    cfg = BudgetConfig(criterion="fairprune", control="none", step=0.5, min_fraction=0.2, max_group_drop=0.05,
                       score_samples=4, keep_rounds=False)
    rec = compress_checkpoint(biased_checkpoint, read_manifest(synth_manifest), tmp_path / "out", cfg, "cpu").record
    # 0.5, 0.25 are above the floor 0.2; 0.125 is not
    assert len(rec.runs["candidate"].rounds) == math.floor(math.log(0.2) / math.log(0.5))
    assert "below the floor" in rec.runs["candidate"].stopped_because
    assert rec.runs["candidate"].reached.round == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"control": "finetune-only"}, "fine-tuning alone does not compress"),
    ({"step": 1.0}, "search step"),
    ({"min_fraction": 0.0}, "floor"),
    ({"patience": 0}, "patience must be >= 1"),
    ({"criterion": "magnitude", "control": "plain-recovery"}, "needs constrained recovery"),
])
def test_search_settings_are_checked(kwargs, message) -> None:
    from fairdeploy.errors import FairdeployError
    from fairdeploy.pruning.budget import BudgetConfig

    with pytest.raises(FairdeployError, match=message):
        BudgetConfig(**kwargs).validate()


def test_default_control_follows_criterion_budget_and_recovery() -> None:
    from fairdeploy.pruning.budget import BudgetConfig

    assert BudgetConfig(criterion="fairprune").control_run == "magnitude"
    assert BudgetConfig(criterion="magnitude").control_run == "none"  # a blind search is its own reference
    assert BudgetConfig(criterion="magnitude", target=0.5).control_run == "finetune-only"
    assert BudgetConfig(criterion="fairprune", control="taylor").control_run == "taylor"


def test_cli_compress_builds_the_config_it_was_given(run_main, monkeypatch, tmp_path: Path, synth_manifest) -> None:
    """Each option lands on its BudgetConfig field; a budget flag sets metric/target; no budget: a search."""
    import fairdeploy.pruning.budget as budget

    seen = {}

    def stop(model, manifest, out, cfg, device, progress):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(budget, "compress_checkpoint", stop)
    base = ["compress", "--model", str(tmp_path), "--data", str(synth_manifest), "--out", str(tmp_path / "o")]
    run_main(*base, "--criterion", "fairprune", "--max-group-drop", "0.03", "--step", "0.6", "--epochs", "2",
             "--seed", "3")
    cfg = seen["cfg"]
    assert (cfg.criterion, cfg.max_group_drop, cfg.step, cfg.finetune.epochs, cfg.seed, cfg.finetune.seed) == \
        ("fairprune", 0.03, 0.6, 2, 3, 3)
    assert cfg.is_search and cfg.control_run == "magnitude"
    run_main(*base, "--speedup", "4")
    assert seen["cfg"].target == 0.25 and seen["cfg"].metric == "macs" and not seen["cfg"].is_search
    run_main(*base, "--criterion", "magnitude", "--recovery", "constrained")
    from fairdeploy.training.constrained import ConstrainedRecovery

    assert seen["cfg"].finetune.constrained == ConstrainedRecovery()
    assert seen["cfg"].control_run == "plain-recovery"
    (tmp_path / "c.toml").write_text("criterion = 'snnl'\nmin_fraction = 0.2\n[finetune]\nepochs = 3\n")
    run_main(*base, "--config", str(tmp_path / "c.toml"), "--epochs", "4")
    assert (seen["cfg"].criterion, seen["cfg"].min_fraction, seen["cfg"].finetune.epochs) == ("snnl", 0.2, 4)


@pytest.mark.parametrize(("args", "message"), [
    (["--recovery", "tight"], "unknown --recovery 'tight'; choose one of plain, constrained"),
    (["--speedup", "2", "--target-macs", "0.5"], "give exactly one budget"),
    (["--step", "1.5"], "--step: the search step must keep a fraction in (0, 1)"),
])
def test_cli_compress_refuses_bad_options_in_one_line(run_main, tmp_path: Path, synth_manifest, args, message):
    code, _out, err = run_main("compress", "--model", str(tmp_path), "--data", str(synth_manifest), "--out",
                               str(tmp_path / "o"), *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_compress_help_shows_each_default_from_the_config() -> None:
    import typer

    from fairdeploy.cli import app
    from fairdeploy.pruning.budget import BudgetConfig

    command = typer.main.get_command(app).commands["compress"]
    helps = {opt: p.help for p in command.params for opt in p.opts}
    d = BudgetConfig()
    for flag, value in (("--criterion", d.criterion), ("--max-group-drop", d.max_group_drop), ("--step", d.step),
                        ("--rounds", d.rounds), ("--epochs", d.finetune.epochs), ("--distill", d.finetune.distill)):
        assert helps[flag].endswith(f"(default: {value}).")
    assert len({p.name for p in command.params}) <= 20


def test_constrained_recovery_in_a_compression_run_against_its_plain_twin(biased_checkpoint, synth_manifest,
                                                                           tmp_path, one_thread) -> None:
    """--recovery constrained with a blind criterion: the control is the same criterion with plain recovery (same
    removal, schedule and seed), the constraint's epsilon is the guard's, and the candidate records its multipliers."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint
    from fairdeploy.training.constrained import ConstrainedRecovery
    from fairdeploy.training.loop import FitConfig

    cfg = BudgetConfig(criterion="magnitude", target=0.7, rounds=1, max_group_drop=0.04, score_samples=4, bootstrap=20,
                       keep_rounds=False, finetune=FitConfig(epochs=1, lr=3e-4, batch_size=32,
                                                             constrained=ConstrainedRecovery(buffer=8)))
    assert cfg.control_run == "plain-recovery"
    rec = compress_checkpoint(biased_checkpoint, read_manifest(synth_manifest), tmp_path / "out", cfg, "cpu").record
    assert rec.config.finetune.constrained.max_group_drop == 0.04  # unset epsilon: the guard's tolerance
    cand, ctrl = rec.runs["candidate"], rec.runs["control"]
    assert cand.criterion == ctrl.criterion == "magnitude"
    # the same removal: magnitude scores of the same input model, the same budget
    assert cand.rounds[0].pruning.removed == ctrl.rounds[0].pruning.removed
    assert set(cand.rounds[0].finetune.multipliers) == {"dark", "light"}
    assert all(v >= 0 for v in cand.rounds[0].finetune.multipliers.values())
    assert ctrl.rounds[0].finetune.multipliers is None
    assert "the plain-recovery control" in rec.verdict


def test_frontier_plot_takes_compression_runs_and_leaves_step_runs_to_the_trajectory_plot() -> None:
    from fairdeploy.report import plots
    from fairdeploy.report.stages import Trajectory

    def pt(step: int, macs: float | None, wga: float, passed: bool = True) -> dict:
        p = {"step": step, "accuracy": wga, "f1_macro": wga, "eodd": 0.1, "worst_group_accuracy": wga, "passed": passed}
        return p if macs is None else {**p, "macs": macs}

    search = Trajectory("fairprune", (pt(0, 100, 0.9), pt(1, 70, 0.9), pt(2, 49, 0.8, passed=False)))
    control = Trajectory("fairprune-control (magnitude)", (pt(0, 100, 0.9), pt(1, 70, 0.7, passed=False)))
    steps = Trajectory("snnl", (pt(0, None, 0.9), pt(1, None, 0.88)))
    assert plots.is_frontier(search) and plots.is_frontier(control) and not plots.is_frontier(steps)
    assert plots.frontier([steps]) is None and plots.trajectories([search, control]) is None
    png = plots.frontier([search, control, steps])
    assert png is not None and png.startswith(b"\x89PNG")
    assert plots.trajectories([search, steps]) is not None


def test_rounds_table_names_no_control_when_none_ran(constructed, biased_checkpoint, synth_manifest, tmp_path,
                                                      one_thread) -> None:
    from fairdeploy.cli.compress import rounds_table
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint

    knee, _ = constructed
    knee["fairprune"] = 0.99
    cfg = BudgetConfig(criterion="fairprune", control="none", score_samples=4, keep_rounds=False)
    rec = compress_checkpoint(biased_checkpoint, read_manifest(synth_manifest), tmp_path / "out", cfg, "cpu").record
    title = rounds_table(rec).title
    assert "none control" not in title and "no control run" in title and title.startswith("fairprune on validation")
