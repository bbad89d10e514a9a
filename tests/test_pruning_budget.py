"""Budget compression: criteria against brute-force computations, removal == zeroing, the budget met and tight,
the paired comparison, distillation and group weights by hand, control and candidate on the same data order."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pruning_oracles import zero_channels
from torch import nn
from torch.utils.data import TensorDataset

from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.criteria import ScoreData, fair_share_order, prepare_importance
from fairdeploy.pruning.curvature import group_gradient
from fairdeploy.pruning.removal import remove_channels, remove_to_budget
from fairdeploy.pruning.structured import dependency_graph


class Tiny(nn.Module):
    """conv1 (3->8) -> relu -> conv2 (8->8) -> relu -> pool -> fc (8->3), no BatchNorm: every coupled weight is a
    conv/linear weight, so the brute-force sums below are the whole story."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    groups = torch.arange(n) % 2
    return TensorDataset(x, y, groups)


def _tiny() -> tuple[Tiny, object]:
    torch.manual_seed(0)
    m = Tiny().eval()
    return m, dependency_graph(m, 8)


def _score_data(ds: TensorDataset) -> ScoreData:
    idx = torch.arange(len(ds))
    a = TensorDataset(*(t[idx % 2 == 0] for t in ds.tensors))
    b = TensorDataset(*(t[idx % 2 == 1] for t in ds.tensors))
    return ScoreData(blind=ds, per_group={"a": a, "b": b}, unprivileged="a", privileged="b", snnl_batches=ds,
                     snnl_batch_size=len(ds), batch_size=5, beta=0.5)


def _mean_norm(v: torch.Tensor) -> torch.Tensor:
    return v / v.abs().mean()


def test_score_gradients_equal_the_mean_of_per_sample_gradients() -> None:
    """The gradients the Taylor criteria read (curvature.group_gradient, every conv/linear weight)."""
    m, _ = _tiny()
    ds = _data()
    got = group_gradient(m, ds, torch.device("cpu"), batch_size=5)
    total = {k: torch.zeros_like(p) for k, p in m.named_parameters() if k.endswith(".weight")}
    for x, y, _g in ds:  # brute force: one backward per sample
        m.zero_grad()
        F.cross_entropy(m(x[None]), y[None]).backward()
        for k, p in m.named_parameters():
            if k in total:
                total[k] += p.grad / len(ds)
    for k, expected in total.items():
        assert torch.allclose(got[k], expected, atol=1e-6), k


def test_taylor_and_magnitude_scores_match_brute_force_sums() -> None:
    m, dg = _tiny()
    ds = _data()
    table, _ = prepare_importance("taylor", m, dg, [m.fc], _score_data(ds), torch.device("cpu"))
    grads = group_gradient(m, ds, torch.device("cpu"), batch_size=24)
    w1, g1 = m.conv1.weight.detach(), grads["conv1.weight"]
    w2, g2 = m.conv2.weight.detach(), grads["conv2.weight"]
    # conv1's channel c: its output row in conv1 and its input column in conv2, averaged, then mean-normalised
    own = (w1 * g1).abs().flatten(1).sum(1)
    nxt = (w2 * g2).abs().transpose(0, 1).flatten(1).sum(1)
    assert torch.allclose(table["conv1"].float(), _mean_norm((own + nxt) / 2), rtol=1e-4)
    mag, _ = prepare_importance("magnitude", m, dg, [m.fc], _score_data(ds), torch.device("cpu"))
    own = w1.square().flatten(1).sum(1)
    nxt = w2.square().transpose(0, 1).flatten(1).sum(1)
    assert torch.allclose(mag["conv1"].float(), _mean_norm((own + nxt) / 2), rtol=1e-4)
    # conv2 is coupled to the head's input columns; the head is ignored as a root but still scored as a consumer
    assert set(table) == {"conv1", "conv2"}


def test_fairprune_channel_scores_match_the_per_sample_loop() -> None:
    from fairdeploy.pruning._reference import group_curvature_loop

    m, dg = _tiny()
    ds = _data()
    sd = _score_data(ds)
    sd.curvature = "empirical"  # deterministic, so the loop oracle sees the same targets
    table, notes = prepare_importance("fairprune", m, dg, [m.fc], sd, torch.device("cpu"))
    layers = ["conv1", "conv2", "fc"]
    hu = group_curvature_loop(m, sd.per_group["a"], "empirical", layers=layers)
    hp = group_curvature_loop(m, sd.per_group["b"], "empirical", layers=layers)
    s1 = 0.5 * m.conv1.weight.detach().square() * (hu["conv1.weight"] - 0.5 * hp["conv1.weight"])
    s2 = 0.5 * m.conv2.weight.detach().square() * (hu["conv2.weight"] - 0.5 * hp["conv2.weight"])
    expected = s1.flatten(1).sum(1) + s2.transpose(0, 1).flatten(1).sum(1)  # summed, not averaged (methods.md)
    assert torch.allclose(table["conv1"].float(), _mean_norm(expected), rtol=1e-3, atol=1e-6)
    assert notes["unprivileged"] == "a" and notes["privileged"] == "b"


def test_snnl_scores_match_a_pairwise_loop_and_ties_are_counted() -> None:
    m, dg = _tiny()
    with torch.no_grad():  # channel 5 of conv1 = 3 x channel 4: same cosine geometry, larger magnitude
        m.conv1.weight[5] = 3 * m.conv1.weight[4]
        m.conv1.bias[5] = 3 * m.conv1.bias[4]
    ds = _data()
    with pytest.warns(UserWarning, match="tied exactly"):
        table, notes = prepare_importance("snnl", m, dg, [m.fc], _score_data(ds), torch.device("cpu"))
    x, _y, g = ds.tensors
    with torch.no_grad():
        feats = m.conv1(x)
    for c in (0, 3):
        z = F.normalize(feats[:, c].flatten(1).double(), dim=1)
        terms = []
        for i in range(len(x)):
            num = sum(math.exp(-(1 - float(z[i] @ z[j]))) for j in range(len(x)) if j != i and g[j] == g[i])
            den = sum(math.exp(-(1 - float(z[i] @ z[j]))) for j in range(len(x)) if j != i)
            terms.append(-math.log(num / den))
        assert float(table["conv1"][c]) == pytest.approx(np.mean(terms), abs=1e-5)
    assert notes["snnl_tied_channels"] >= 1
    assert table["conv1"][4] < table["conv1"][5]  # the tie goes to magnitude: the smaller channel is removed first


def test_fair_share_order_by_hand() -> None:
    # totals 10 each. pick 1: max shares c0 .4, c1 .3, c2 .3, c3 .4 -> c1 (tie with c2, equal sums, lower index);
    # lost (.2, .3). pick 2: c0 max(.3,.7), c2 max(.5,.5), c3 max(.6,.4) -> c2; lost (.5,.5).
    # pick 3: c0 max(.6,.9), c3 max(.9,.6) -> tie at .9, equal sums -> c0; then c3.
    rank = fair_share_order([torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])])
    assert rank.tolist() == [2.0, 0.0, 1.0, 3.0]
    # one group: plain ascending importance
    imp = torch.tensor([5.0, 1, 4, 2, 3])
    assert torch.argsort(fair_share_order([imp])).tolist() == torch.argsort(imp).tolist()


def test_group_taylor_keeps_a_channel_only_one_group_needs() -> None:
    m, dg = _tiny()
    sd = _score_data(_data())
    table, notes = prepare_importance("group-taylor", m, dg, [m.fc], sd, torch.device("cpu"))
    assert notes["groups"] == ["a", "b"]
    ranks = torch.cat([table["conv1"], table["conv2"]])
    assert sorted(ranks.tolist()) == list(map(float, range(16)))  # one global removal order over all channels


def test_removal_equals_zeroing_the_same_channels() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    ref = copy.deepcopy(model)
    dg = dependency_graph(model, 32)
    table, _ = prepare_importance("magnitude", model, dg, [model.fc], None, torch.device("cpu"))  # type: ignore[arg-type]
    removal = remove_channels(model, table, 0.3, "fc", 32, round_to=8)
    assert removal.channels_removed > 0
    dg_ref = dependency_graph(ref, 32)
    modules = dict(ref.named_modules())
    for name, idxs in removal.removed.items():
        zero_channels(dg_ref, modules[name], idxs)
        # the lowest-scored channels went: every removed score <= every kept score's max within the layer
        kept = [i for i in range(len(table[name])) if i not in idxs]
        assert float(table[name][idxs].max()) <= float(table[name][kept].max())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4)
    for m in model.modules():  # aligned channel counts
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0


def test_budget_is_met_and_tight() -> None:
    from torchvision.models import resnet18

    from fairdeploy.models.size import model_size

    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    before = model_size(model, 32)
    dg = dependency_graph(model, 32)
    table, _ = prepare_importance("magnitude", model, dg, [model.fc], None, torch.device("cpu"))  # type: ignore[arg-type]
    trial = copy.deepcopy(model)
    got = remove_to_budget(model, table, 0.5 * before.macs, "macs", "fc", 32)
    assert got.size.macs <= 0.5 * before.macs
    assert model_size(model, 32).macs == got.size.macs
    less = remove_channels(trial, table, max(got.ratio - 0.02, 0.0), "fc", 32)
    assert less.size.macs > 0.5 * before.macs  # removing visibly less would miss the budget
    with pytest.raises(FairdeployError, match="cannot be reached"):
        remove_to_budget(copy.deepcopy(model), table, 0.001 * before.macs, "macs", "fc", 32, max_layer_ratio=0.5)
    with pytest.raises(FairdeployError, match="choose one of macs, params"):
        remove_to_budget(model, table, 1, "flops", "fc", 32)


def test_budget_reached_when_one_layer_scores_lowest_everywhere() -> None:
    """Torch-Pruning skips (does not cap) a group whose removal would empty a layer: scores that put a whole
    layer below the threshold must still shrink that layer to its floor, not leave it untouched."""
    from torchvision.models import resnet18

    from fairdeploy.models.size import model_size
    from fairdeploy.pruning.removal import protected

    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    before = model_size(model, 32)
    dg = dependency_graph(model, 32)
    table, _ = prepare_importance("magnitude", model, dg, [model.fc], None, torch.device("cpu"))  # type: ignore[arg-type]
    table = {k: (v * 1e-6 if k == "layer4.0.conv1" else v) for k, v in table.items()}
    prot = protected(table, 8, 0.9)
    assert int(torch.isinf(prot["layer4.0.conv1"]).sum()) == 56  # ceil(0.1 * 512 / 8) * 8 channels kept
    got = remove_to_budget(model, table, 0.5 * before.macs, "macs", "fc", 32)
    assert got.size.macs <= 0.5 * before.macs
    assert model.layer4[0].conv1.out_channels == 56


def test_paired_comparison_by_hand() -> None:
    from fairdeploy.pruning.paired import paired_comparison, verdict
    from fairdeploy.training.predict import Predictions

    labels = np.tile([0, 1, 0, 1, 0, 1, 0, 1], 10)  # 40 images per group: intervals narrow enough to exclude 0
    groups = np.tile([0, 0, 0, 0, 1, 1, 1, 1], 10)

    def preds(p: list[int]) -> Predictions:
        return Predictions(logits=np.eye(2, dtype=np.float32)[p], labels=labels, groups=groups)

    same = paired_comparison(preds(list(labels)), preds(list(labels)), ("a", "b"), 2, 50, 0)
    assert same.worst_group_accuracy.to_dict() == {"difference": 0.0, "ci95": [0.0, 0.0]}
    # control: group a all right, group b half right (worst 0.5); candidate: all right (worst 1.0)
    control = preds([0, 1, 0, 1, 0, 0, 0, 0] * 10)
    cand = preds(list(labels))
    c = paired_comparison(cand, control, ("a", "b"), 2, 200, 0)
    assert c.worst_group_accuracy.difference == pytest.approx(0.5)
    # Eodd of the control: group b predicts class 0 always: TPR0 1, TPR1 0, FPR0 1, FPR1 0 vs perfect group a
    # class 0: |(1-1) + (0-1)|/2 = .5; class 1: |(1-0) + (0-0)|/2 = .5 -> mean .5; candidate 0
    assert c.eodd.difference == pytest.approx(-0.5)
    assert c.worst_group_accuracy.ci95[0] > 0
    assert "beat the magnitude control" in verdict("group-taylor", "magnitude", c)
    assert "no difference shown" in verdict("group-taylor", "magnitude", same)


def test_distillation_and_group_weights_by_hand() -> None:
    from fairdeploy.training.loop import _group_weights, distillation_loss

    s = torch.tensor([[1.0, 0.0]])
    assert float(distillation_loss(s, s, 4.0)) == pytest.approx(0.0, abs=1e-7)
    t = torch.tensor([[0.0, 1.0]])
    ps, pt = torch.softmax(s / 2, 1)[0], torch.softmax(t / 2, 1)[0]
    expected = 4 * float((pt * (pt / ps).log()).sum())
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(expected, rel=1e-5)
    w = _group_weights(SimpleNamespace(groups=[0, 0, 0, 1]), "balanced")
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    assert _group_weights(SimpleNamespace(groups=[0, 1]), "none").tolist() == [1.0, 1.0]


def test_budget_options_are_checked_before_work() -> None:
    from fairdeploy.pruning.budget import BudgetConfig, budget_from

    assert budget_from(speedup=4) == ("macs", 0.25)
    assert budget_from(target_params=0.3) == ("params", 0.3)
    with pytest.raises(FairdeployError, match="exactly one budget"):
        budget_from(speedup=2, target_macs=0.5)
    with pytest.raises(FairdeployError, match="--speedup must be > 1"):
        budget_from(speedup=0.5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(FairdeployError, match=rf"--target-params must keep a fraction in \(0, 1\) of the model, got {bad}"):
            budget_from(target_params=bad)
    with pytest.raises(FairdeployError, match="unknown criterion 'l1'; choose one of magnitude, taylor"):
        BudgetConfig(criterion="l1").validate()
    with pytest.raises(FairdeployError, match="is the criterion itself"):
        BudgetConfig(criterion="magnitude", control="magnitude").validate()
    with pytest.raises(FairdeployError, match=r"fraction in \(0, 1\)"):
        BudgetConfig(target=1.5).validate()


def test_cli_budget_bad_input_is_one_line(run_main, tmp_path) -> None:
    code, _out, err = run_main("compress", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                               str(tmp_path / "o"), "--criterion", "bogus", "--target-macs", "0.5")
    assert code == 2 and "unknown criterion 'bogus'" in err and "Traceback" not in err
    code, _out, err = run_main("compress", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                               str(tmp_path / "o"), "--target-macs", "0.5", "--speedup", "2")
    assert code == 2 and "exactly one budget" in err


@pytest.mark.slow
def test_compress_run_meets_budget_with_control_on_the_same_data_order(biased_checkpoint, synth_manifest,
                                                                        small_synth_manifest, tmp_path) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint
    from fairdeploy.training.loop import FitConfig

    # the biased model's own images, fewer of them (96 train, 48 val): the budget, the shared order and the
    # records do not depend on how many images the fine-tuning epochs see
    data = read_manifest(small_synth_manifest, synth_manifest.parent)
    cfg = BudgetConfig(criterion="group-taylor", control="magnitude", target=0.5, rounds=1, score_samples=8,
                       bootstrap=20, finetune=FitConfig(epochs=1, lr=1e-3, distill=0.5, batch_size=32))
    res = compress_checkpoint(biased_checkpoint, data, tmp_path / "out", cfg, "cpu")
    rec = res.record.to_dict()
    dense, spec = load_checkpoint(biased_checkpoint)
    for path in (tmp_path / "out", tmp_path / "out" / "control"):
        m, _ = load_checkpoint(path)
        assert model_size(m, spec.image_size).macs <= 0.5 * model_size(dense, spec.image_size).macs
    cand, ctrl = rec["runs"]["candidate"]["rounds"], rec["runs"]["control"]["rounds"]
    assert [r["finetune"]["data_order"] for r in cand] == [r["finetune"]["data_order"] for r in ctrl]
    assert rec["data"]["test_split_used"] is False
    assert set(rec["comparison"]["candidate_minus_control"]) == {"worst_group_accuracy", "eodd", "f1_macro"}
    assert (tmp_path / "out" / "rounds" / "candidate-r1-finetuned" / "model.json").is_file()
    # a different seed draws a different fine-tuning order: the hash is not a constant
    other = compress_checkpoint(biased_checkpoint, data, tmp_path / "out2",
                                BudgetConfig(**{**cfg.__dict__, "seed": 1, "control": "none", "keep_rounds": False}),
                                "cpu")
    assert other.record.runs["candidate"].rounds[0].finetune.data_order != tuple(cand[0]["finetune"]["data_order"])


def test_verdict_does_not_call_levelling_down_a_win() -> None:
    from fairdeploy.pruning.paired import Difference, PairedComparison, verdict

    def diff(d: float, lo: float, hi: float) -> Difference:
        return Difference(d, (lo, hi))

    levelled = PairedComparison(worst_group_accuracy=diff(-0.05, -0.2, 0.1), eodd=diff(-0.08, -0.13, -0.02),
                                f1_macro=diff(-0.3, -0.4, -0.2))
    text = verdict("group-taylor", "magnitude", levelled)
    assert "beat" not in text and "levelling down" in text and "lower macro-F1" in text
    fair = PairedComparison(worst_group_accuracy=diff(0.01, -0.02, 0.04), eodd=diff(-0.08, -0.13, -0.02),
                            f1_macro=diff(0.0, -0.01, 0.01))
    assert verdict("group-taylor", "magnitude", fair).startswith("group-taylor beat the magnitude control")


def test_selection_without_an_eligible_model_prefers_the_closest_to_passing() -> None:
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.models.size import ModelSize
    from fairdeploy.pruning.budget import BudgetConfig, _RoundModel, _RunState, _select, guard_point
    from fairdeploy.training.loop import FitConfig

    def report(dark: int, light: int):  # 10 images per group, 2 classes; `dark`/`light` of them right
        y = np.array([0, 1] * 10)
        g = np.array(["dark"] * 10 + ["light"] * 10)
        p = y.copy()
        p[dark:10] = 1 - p[dark:10]
        p[10 + light:] = 1 - p[10 + light:]
        return compute_metrics(y, p, g, 2, group_order=["dark", "light"])

    cfg, base = BudgetConfig(), report(6, 10)
    size = ModelSize(params=1, nonzero_params=1, macs=1)
    levelled = guard_point(report(6, 5), size, base, cfg)  # worst group 0.5 (light fell by half)
    close = guard_point(report(5, 10), size, base, cfg)  # worst group 0.5 (dark lost one image)
    assert not levelled.eligible and not close.eligible
    run = _RunState("candidate", "group-taylor", FitConfig(),
               candidates=[_RoundModel("r1-pruned", None, levelled, 1), _RoundModel("r1-finetuned", None, close, 1)])
    assert _select(run, 10, "macs")[0] == "r1-finetuned"
