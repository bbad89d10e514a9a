"""validate(): an equal candidate passes; a candidate that flips one group's predictions fails naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import read_manifest, write_manifest
from fairdeploy.errors import FairdeployError
from fairdeploy.files.hashing import sha256_file
from fairdeploy.metrics import compute_metrics
from fairdeploy.metrics.fairness import DEFAULT_CONFIDENCE
from fairdeploy.models import ModelSpec, create_model, read_spec, save_checkpoint
from fairdeploy.runtime import runner_from_artifact
from fairdeploy.training.train import evaluate_checkpoint
from fairdeploy.validation import LatencyConfig, Tolerances, ValidationConfig, validate
from fairdeploy.validation.compare import flip_stats

FAST = LatencyConfig(batch_sizes=(1, 4), warmup=1, iterations=3)

pytestmark = pytest.mark.numerics  # the candidates are ONNX Runtime's FP32 kernels, compared with PyTorch's


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """2 shared cores: torch's intra-op threads contend with other processes' (10x slower); use one here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FlipGroupRunner:
    """A real runner's logits, with the classes rotated by one for the chosen images (recognised by their
    exact preprocessed bytes): a candidate whose predictions are perturbed on purpose, for one group."""

    def __init__(self, inner: Any, flip: set[bytes], name: str = "flip-dark") -> None:
        self.inner, self.flip, self.name, self.info = inner, flip, name, inner.info
        self.flipped = 0

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def __enter__(self) -> FlipGroupRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def input_spec(self):
        return self.inner.input_spec()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "perturbed": "classes rotated for some images of one group"}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.inner.infer(batch).copy()
        for i, row in enumerate(batch):
            if row.tobytes() in self.flip:
                out[i] = np.roll(out[i], 1)
                self.flipped += 1
        return out


def _test_images(checkpoint: Path, manifest_path: Path):
    spec = read_spec(checkpoint)
    ds = split_dataset(read_manifest(manifest_path), "test", Encoding(spec.classes, spec.groups),
                       eval_transform(spec.image_size, spec.mean, spec.std))
    x = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    return spec, x, np.asarray(ds.labels), np.asarray(spec.groups)[np.asarray(ds.groups)]


@pytest.fixture(scope="module")
def flip_case(trained_checkpoint: Path, synth_manifest: Path):
    """k correctly-predicted dark test images to flip, and the group sizes (the oracle)."""
    spec, x, y, g = _test_images(trained_checkpoint, synth_manifest)
    with runner_from_artifact(trained_checkpoint, device="cpu") as ref:
        pred = ref.infer(x).argmax(1)
    dark_right = np.flatnonzero((g == "dark") & (pred == y))
    assert len(dark_right) >= 2, "the fixture model should get a few dark images right"
    chosen = dark_right[:2]
    return {
        "keys": {x[i].tobytes() for i in chosen},
        "k": len(chosen),
        "n": len(y),
        "n_dark": int((g == "dark").sum()),
        "true": [spec.classes[y[i]] for i in chosen],
        "to": [spec.classes[(pred[i] + 1) % len(spec.classes)] for i in chosen],
    }


@pytest.fixture(scope="module")
def result(trained_checkpoint: Path, runtime_fp32_onnx: Path, synth_manifest: Path, flip_case: dict):
    """One validation: the ONNX export and the flipped runner (over real ONNX Runtime output)."""
    flip = FlipGroupRunner(runner_from_artifact(runtime_fp32_onnx, device="cpu"), flip_case["keys"])
    cfg = ValidationConfig(bootstrap=50, latency=FAST, batch_size=16,
                           tolerances=Tolerances(max_eodd_drift=1.0, max_accuracy_drop=0.05,
                                                 max_group_accuracy_drop=0.02))
    res = validate(trained_checkpoint, [runtime_fp32_onnx, flip], read_manifest(synth_manifest), cfg, device="cpu")
    return res, flip


def test_equal_candidate_passes(result, trained_checkpoint: Path, runtime_fp32_onnx: Path) -> None:
    res, _ = result
    onnx = res.candidate(str(runtime_fp32_onnx))
    assert onnx.passed and onnx.failures() == []
    assert onnx.agreement.overall == 1.0 and set(onnx.agreement.groups.values()) == {1.0}
    assert onnx.logit_diff.max_abs < 1e-4
    assert onnx.run.metrics.to_dict() == res.reference.metrics.to_dict()  # identical predictions, same seed
    assert all(f.changed == 0 for f in onnx.flips.values())
    assert onnx.source_matches_reference is True
    assert onnx.run.artifact.size_bytes == runtime_fp32_onnx.stat().st_size
    assert onnx.run.runtime["providers_active"] == ["CPUExecutionProvider"]


def test_reference_size_is_that_of_the_checkpoint(result, trained_checkpoint: Path) -> None:
    from fairdeploy.models import load_checkpoint
    from fairdeploy.models.size import model_size

    res, _ = result
    model, spec = load_checkpoint(trained_checkpoint)
    assert res.model_size == model_size(model, spec.image_size)
    assert res.model_size.macs > 0


def test_reference_metrics_equal_the_evaluate_path(result, trained_checkpoint: Path, synth_manifest: Path) -> None:
    res, _ = result
    expected = evaluate_checkpoint(trained_checkpoint, read_manifest(synth_manifest), "test", "cpu", bootstrap=0)
    got = res.reference.metrics
    assert got.overall_accuracy == expected.overall_accuracy
    assert [(g, m.accuracy, m.confusion) for g, m in got.groups] == \
        [(g, m.accuracy, m.confusion) for g, m in expected.groups]


def test_reference_intervals_equal_a_brute_force_bootstrap(result, trained_checkpoint: Path,
                                                           synth_manifest: Path) -> None:
    """The reference's Eodd / accuracy intervals are the percentile bootstrap of its own test predictions with the
    run's seed and resample count: redrawn here resample by resample (each group to its own size, in the RNG's
    order) and recomputed with compute_metrics on the repeated rows. (A point estimate need not lie inside a
    percentile interval, so that is not what is checked.)"""
    res, _ = result
    spec, x, y, g = _test_images(trained_checkpoint, synth_manifest)
    with runner_from_artifact(trained_checkpoint, device="cpu") as ref:
        pred = ref.infer(x).argmax(1)
    cfg = res.config
    rng = np.random.default_rng(cfg.seed)
    draws = {}
    for name in spec.groups:
        rows = np.flatnonzero(g == name)
        draws[name] = [np.repeat(rows, rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows))))
                       for _ in range(cfg.bootstrap)]
    values: dict[str, list[float]] = {"eodd": [], "accuracy[dark]": []}
    for i in range(cfg.bootstrap):
        idx = np.concatenate([draws[name][i] for name in spec.groups])
        again = compute_metrics(y[idx], pred[idx], g[idx], len(spec.classes), group_order=spec.groups)
        values["eodd"].append(again.gap("eodd"))
        values["accuracy[dark]"].append(again.group("dark").accuracy)
    tail = (1 - DEFAULT_CONFIDENCE) / 2
    intervals = dict(res.reference.metrics.intervals)
    for key, v in values.items():
        assert intervals[key] == pytest.approx((np.quantile(v, tail), np.quantile(v, 1 - tail))), key
    assert cfg.bootstrap == 50 and intervals["eodd"][1] > intervals["eodd"][0]  # a real spread, not a point


def test_perturbed_group_fails_the_per_group_check_and_is_named(result, flip_case: dict) -> None:
    res, flip = result
    cand = res.candidate("flip-dark")
    k, n, n_dark = flip_case["k"], flip_case["n"], flip_case["n_dark"]
    assert flip.flipped == k  # every chosen image was recognised once, no other
    assert not cand.passed and not res.passed
    failing = [(c.check, c.group) for c in cand.checks if not c.passed]
    assert failing == [("max_group_accuracy_drop", "dark")]  # overall (k/n < 0.05) and light still pass
    dark = next(c for c in cand.checks if c.group == "dark")
    assert dark.drift == pytest.approx(-k / n_dark)
    assert cand.deltas.accuracy == pytest.approx(-k / n)
    assert cand.deltas.groups["light"].accuracy == 0.0
    assert res.failures() == [f"flip-dark: accuracy (group 'dark') dropped by {k / n_dark:.4f} "
                              f"({dark.reference:.4f} -> {dark.candidate:.4f}), maximum drop 0.0200"]
    assert cand.agreement.groups == {"dark": pytest.approx(1 - k / n_dark), "light": 1.0}
    assert cand.flips["dark"].changed == k and cand.flips["dark"].broken == k
    assert cand.flips["dark"].fixed == 0 and cand.flips["light"].changed == 0
    # Predictions were right, so each flip goes from its true class to the next one.
    expected = {}
    for a, b in zip(flip_case["true"], flip_case["to"]):
        expected[(a, b)] = expected.get((a, b), 0) + 1
    assert {(t.source, t.target): t.count for t in cand.flips["dark"].transitions} == expected
    delta = np.asarray(cand.confusion_delta["dark"])
    assert delta.sum(1).tolist() == [0, 0, 0]  # the true-class counts do not change
    assert -np.trace(delta) == k and not np.any(cand.confusion_delta["light"])


def test_validation_json_is_complete(result, synth_manifest: Path, trained_checkpoint: Path,
                                     runtime_fp32_onnx: Path) -> None:
    res, _ = result
    d = json.loads(json.dumps(res.to_dict()))
    assert d["passed"] is False and d["schema_version"] == 1
    assert d["data"]["manifest_sha256"] == sha256_file(synth_manifest)
    assert d["data"]["n"] == sum(d["data"]["group_counts"].values()) == res.reference.metrics.n
    assert d["tolerances"] == {"max_eodd_drift": 1.0, "max_accuracy_drop": 0.05, "max_group_accuracy_drop": 0.02,
                               "min_agreement": None, "min_group_agreement": None}
    for c in d["candidates"]:
        for key in ("metrics", "deltas", "agreement", "flips", "confusion_delta", "logit_diff", "latency", "artifact",
                    "runtime", "checks", "passed", "failures", "input_spec"):
            assert key in c, key
        assert set(c["metrics"]["intervals"]) >= {"eodd", "eopp0", "eopp1", "dp", "accuracy_diff"}
        assert [s["batch_size"] for s in c["latency"]] == [1, 4]
        assert all(s["p50_ms"] > 0 and s["p95_ms"] >= s["p50_ms"] and s["throughput_ips"] > 0 for s in c["latency"])
    assert [s["batch_size"] for s in d["reference"]["latency"]] == [1, 4]
    assert d["fingerprint"]["packages"]["onnxruntime"]
    assert set(d["fingerprint"]["runners"]) == {f"torch:{trained_checkpoint}", f"onnxruntime:{runtime_fp32_onnx}",
                                                "flip-dark"}
    assert d["fingerprint"]["runners"]["flip-dark"]["perturbed"]
    assert "eodd" in d["definitions"]["metrics"] and "agreement" in d["definitions"]


def test_flip_stats_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    n, classes = 200, ("a", "b", "c", "d")
    y, r, c = (rng.integers(0, 4, n) for _ in range(3))
    g = rng.choice(["x", "y", "z"], n)
    stats = flip_stats(y, r, c, g, ["x", "y", "z"], classes)
    for group in "xyz":
        counts: dict[tuple[str, str], int] = {}
        broken = fixed = 0
        for i in range(n):
            if g[i] != group:
                continue
            if r[i] != c[i]:
                key = (classes[r[i]], classes[c[i]])
                counts[key] = counts.get(key, 0) + 1
            broken += int(r[i] == y[i] and c[i] != y[i])
            fixed += int(r[i] != y[i] and c[i] == y[i])
        s = stats[group]
        assert {(t.source, t.target): t.count for t in s.transitions} == counts
        assert (s.broken, s.fixed, s.changed) == (broken, fixed, sum(counts.values()))


def _comparison_as_dicts(y, r, c, rl, cl, g, order, classes, ref, cand, intervals):
    """validation.json's comparison parts (deltas, agreement, flips, logit_diff) as validate built them when they
    were dicts, before they became typed: the oracle of the file's layout (keys, order, values)."""
    K = len(classes)
    same = r == c
    agreement = {"overall": float(same.mean()), "groups": {x: float(same[g == x].mean()) for x in order}}
    flips = {}
    for x in order:
        m = g == x
        t, a, b = y[m], r[m], c[m]
        ch = a != b
        trans = np.bincount(a[ch] * K + b[ch], minlength=K * K).reshape(K, K)
        flips[x] = {"n": int(m.sum()), "changed": int(ch.sum()), "broken": int(((a == t) & (b != t)).sum()),
                    "fixed": int(((a != t) & (b == t)).sum()),
                    "transitions": [{"from": classes[i], "to": classes[j], "count": int(trans[i, j])}
                                    for i in range(K) for j in range(K) if trans[i, j]]}
    d = np.abs(cl.astype(np.float64) - rl.astype(np.float64))
    logit_diff = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                  "groups": {x: {"max_abs": float(d[g == x].max()), "mean_abs": float(d[g == x].mean())}
                             for x in order}}
    rs, cs = ref.summary(), cand.summary()
    deltas = {
        "overall": {"accuracy": cand.overall_accuracy - ref.overall_accuracy,
                    "f1_macro": cand.overall_f1_macro - ref.overall_f1_macro},
        "groups": {x: {k: getattr(cand.group(x), k) - getattr(m, k)
                       for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")} for x, m in ref.groups},
        "summary": {k: {s: cs[k][s] - rs[k][s] for s in ("avg", "diff")} for k in rs},
        "fairness": {k: None if ref.gap(k) is None or cand.gap(k) is None else cand.gap(k) - ref.gap(k)
                     for k in ("eopp0", "eopp1", "eodd", "dp")},
    }
    if intervals is not None:
        deltas["intervals"] = {k: list(v) for k, v in intervals.items()}
    return {"deltas": deltas, "agreement": agreement, "flips": flips, "logit_diff": logit_diff}


@pytest.mark.parametrize("order", [("x", "y", "z"), ("x",)])
def test_typed_comparison_writes_what_the_dicts_did(order: tuple[str, ...]) -> None:
    """The typed deltas / agreement / flips / |Δlogit| serialise to the very JSON text (same keys, same order,
    same values) the dict-building code wrote, with and without paired intervals, with one group (gaps None)."""
    from fairdeploy.metrics import bootstrap_difference_intervals, compute_metrics
    from fairdeploy.validation.compare import agreement_stats, logit_diff_stats, metric_deltas

    rng = np.random.default_rng(1)
    n, classes = 300, ("a", "b", "c")
    y = rng.integers(0, 3, n)
    rl, cl = rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)
    r, c = rl.argmax(1), cl.argmax(1)
    g = rng.choice(list(order), n)
    ref, cand = (compute_metrics(y, p, g, 3, classes, group_order=order) for p in (r, c))
    for intervals in (None, bootstrap_difference_intervals(y, r, c, g, order, 3, 20, 0)):
        typed = {"deltas": metric_deltas(ref, cand, intervals).to_dict(),
                 "agreement": agreement_stats(r, c, g, order).to_dict(),
                 "flips": {x: f.to_dict() for x, f in flip_stats(y, r, c, g, order, classes).items()},
                 "logit_diff": logit_diff_stats(rl, cl, g, order).to_dict()}
        assert json.dumps(typed) == json.dumps(_comparison_as_dicts(y, r, c, rl, cl, g, order, classes, ref, cand,
                                                                    intervals))
    if len(order) == 1:
        assert metric_deltas(ref, cand).fairness["eodd"] is None


def test_mismatched_candidates_are_refused_before_any_inference(trained_checkpoint: Path, synth_manifest: Path,
                                                                tmp_path: Path) -> None:
    manifest = read_manifest(synth_manifest)
    spec = read_spec(trained_checkpoint)
    other = save_checkpoint(create_model("resnet18", 2), ModelSpec("resnet18", ("benign", "malignant"), spec.groups,
                                                                    image_size=32), tmp_path / "two")
    with pytest.raises(FairdeployError) as err:
        validate(trained_checkpoint, [other], manifest, ValidationConfig(latency=None, bootstrap=0), device="cpu")
    assert str(err.value) == (f"candidate {other}: classes benign, malignant do not match the reference's "
                              "cross, disc, ring")
    bigger = save_checkpoint(create_model("resnet18", 3), ModelSpec("resnet18", spec.classes, spec.groups,
                                                                     image_size=48), tmp_path / "big")
    with pytest.raises(FairdeployError, match=r"input size 48 does not match the reference's 32"):
        validate(trained_checkpoint, [bigger], manifest, ValidationConfig(latency=None, bootstrap=0), device="cpu")
    with pytest.raises(FairdeployError, match=r"reference .* must be a PyTorch checkpoint directory"):
        validate(synth_manifest, [trained_checkpoint], manifest, ValidationConfig(latency=None), device="cpu")
    with pytest.raises(FairdeployError, match="no candidate to validate"):
        validate(trained_checkpoint, [], manifest, device="cpu")


def test_split_without_a_reference_group_is_refused(trained_checkpoint: Path, synth_manifest: Path,
                                                    tmp_path: Path) -> None:
    manifest = read_manifest(synth_manifest)
    rows = [r for r in manifest.records if not (r.split == "test" and r.group == "dark")]
    path = synth_manifest.parent / "no_dark_test.csv"  # beside the images, so the paths still resolve
    write_manifest(rows, path)
    try:
        with pytest.raises(FairdeployError) as err:
            validate(trained_checkpoint, [trained_checkpoint], read_manifest(path),
                     ValidationConfig(latency=None, bootstrap=0), device="cpu")
    finally:
        path.unlink()
    assert str(err.value) == (f"{path}: split 'test' has no images of group(s) dark of the reference model "
                              "(model groups: dark, light)")


class OpenLog:
    """Shared log of which recording runners are open, and who was open at each infer call."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.infers: list[tuple[str, frozenset[str], int]] = []  # (runner, runners open at the call, batch size)
        self.events: list[tuple[str, str]] = []


class RecordingRunner(FlipGroupRunner):
    """A real runner that logs its open/close and, per infer call, which runners were open."""

    def __init__(self, inner: Any, log: OpenLog, name: str) -> None:
        super().__init__(inner, set(), name)
        self.log = log

    def activate(self) -> None:
        self.log.open.add(self.name)
        self.log.events.append(("open", self.name))
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()
        self.log.open.discard(self.name)
        self.log.events.append(("close", self.name))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.log.infers.append((self.name, frozenset(self.log.open), len(batch)))
        return self.inner.infer(batch)


def test_each_runner_is_timed_with_the_others_closed(trained_checkpoint: Path, runtime_fp32_onnx: Path,
                                                     synth_manifest: Path) -> None:
    """Order-log oracle: accuracy batches run with all three runners open; every latency call (warm-up +
    timed, per batch size) runs with its runner the only one open, and only after the accuracy pass closed."""
    log = OpenLog()
    names = ["ref", "onnx-a", "onnx-b"]
    ref = RecordingRunner(runner_from_artifact(trained_checkpoint, device="cpu"), log, "ref")
    cands = [RecordingRunner(runner_from_artifact(runtime_fp32_onnx, device="cpu"), log, n) for n in names[1:]]
    latency = LatencyConfig(batch_sizes=(1, 3), warmup=1, iterations=2)
    manifest = read_manifest(synth_manifest)
    res = validate(ref, cands, manifest, ValidationConfig(bootstrap=0, latency=latency, batch_size=16),
                   device="cpu")
    n_test = len(manifest.split("test"))
    n_batches = -(-n_test // 16)
    everyone = frozenset(names)
    shared = [(who, n) for who, open_, n in log.infers if open_ == everyone]
    alone = [(who, n) for who, open_, n in log.infers if open_ == {who}]
    assert len(shared) + len(alone) == len(log.infers)  # no infer ran with some other subset open
    assert sorted(shared) == sorted((who, n) for who in names for n in [16] * (n_test // 16)
                                    + ([n_test % 16] if n_test % 16 else []))
    per_runner = [(1, 1 + 2), (3, 1 + 2)]  # (batch size, warm-up + timed calls)
    assert alone == [(who, bs) for who in names for bs, k in per_runner for _ in range(k)]
    # The accuracy pass closes everyone before the first timing window opens.
    first_alone = next(i for i, (_, open_, _) in enumerate(log.infers) if len(open_) == 1)
    assert first_alone == len(names) * n_batches
    assert log.open == set()
    assert [len(c.run.latency) for c in res.candidates] == [2, 2] and len(res.reference.latency) == 2
