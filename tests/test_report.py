"""The report: the answer first (which artifact passes, its size, latency, worst group with n and CI), per-group
intervals equal to the bootstrap's, paired fairness differences, Pareto points, figures, self-contained HTML,
a headless-Chromium screenshot, and a pipeline rerun that leaves the report alone."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import bootstrap_difference_intervals, bootstrap_intervals, compute_metrics
from fairdeploy.report import StageRecord, Trajectory, build_report, load_stages, plots, summary, write_stages
from fairdeploy.report.stages import RunStages

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("disc", "ring", "cross")


def _stages():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    g = rng.choice(["dark", "light"], 200)
    out = []
    for name, kind, noise in [("vanilla", "pytorch", 0.3), ("fairprune", "pytorch", 0.2), ("fairprune/int8", "onnx", 0.22)]:
        p = np.where(rng.random(200) < 1 - noise, y, rng.integers(0, 3, 200))
        m = compute_metrics(y, p, g, 3, CLASSES).to_dict()
        out.append(StageRecord(name=name, kind=kind, metrics=m, size_bytes=1_000_000, latency={"batch1_p50_ms": 1.5},
                               agreement=0.97 if kind == "onnx" else None, gate_passed=kind == "onnx" or None))
    return out


def _section(md: str, title: str) -> list[str]:
    """The table lines under `## title`."""
    lines = md.splitlines()
    start = lines.index(f"## {title}")
    out = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            out.append(line)
    return out


def _row(table: list[str], first_cell: str) -> list[str]:
    line = next(ln for ln in table if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


# ---- a validation.json made by hand: an FP32 export identical to the reference, an INT8 export whose Eodd
# looks lower, and an FP16 export that fails the gate; the reference checkpoint's MACs recorded ----

N_DARK, N_LIGHT = 88, 150
REF_MACS = 1_800_000_000


def _validation(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(3)
    groups = np.array(["dark"] * N_DARK + ["light"] * N_LIGHT)
    y = rng.integers(0, 3, len(groups))
    ref = np.where(rng.random(len(y)) < 0.75, y, rng.integers(0, 3, len(y)))
    int8 = ref.copy()
    flip = rng.choice(np.flatnonzero((groups == "dark") & (ref != y)), 6, replace=False)  # 6 dark errors fixed
    int8[flip] = y[flip]
    fp16 = ref.copy()
    preds = {"model.fp32.onnx": ref, "model.int8.onnx": int8, "model.fp16.onnx": fp16}

    def metrics(p):
        return compute_metrics(y, p, groups, 3, CLASSES, group_order=("dark", "light"), bootstrap=200, seed=0).to_dict()

    def artifact(path, kind, precision, size):
        return {"path": path, "kind": kind, "precision": precision, "size_bytes": size}

    sizes = {"model.fp32.onnx": 44_700_000, "model.int8.onnx": 11_300_000, "model.fp16.onnx": 22_400_000}
    lat = {"model.fp32.onnx": 4.0, "model.int8.onnx": 2.5, "model.fp16.onnx": 3.0}
    cands = []
    for label, p in preds.items():
        passed = label != "model.fp16.onnx"
        cands.append({
            "label": label, "artifact": artifact(label, "onnx", label.split(".")[1], sizes[label]),
            "metrics": metrics(p),
            "latency": [{"batch_size": 1, "p50_ms": lat[label], "p95_ms": lat[label] * 1.2,
                         "throughput_ips": 1000 / lat[label]}],
            "source_matches_reference": True,
            "deltas": {"intervals": {k: list(v) for k, v in bootstrap_difference_intervals(
                y, ref, p, groups, ("dark", "light"), 3, n_boot=200, seed=0).items()}},
            "agreement": {"overall": float((p == ref).mean())}, "logit_diff": {"max_abs": 0.01},
            "passed": passed,
            "failures": [] if passed else [f"{label}: agreement 0.9000 below 0.9900 (overall)"],
        })
    d = {"passed": False, "degenerate": [], "config": {"split": "test"}, "model_size": {"macs": REF_MACS, "params": 11_000_000},
         "data": {"group_counts": {"dark": N_DARK, "light": N_LIGHT}},
         "reference": {"label": "reference", "artifact": artifact("ckpt", "checkpoint", "fp32", 44_800_000),
                       "metrics": metrics(ref),
                       "latency": [{"batch_size": 1, "p50_ms": 9.0, "p95_ms": 10.0, "throughput_ips": 111.0}]},
         "candidates": cands}
    (tmp_path / "validation.json").write_text(json.dumps(d))
    return tmp_path, {"y": y, "groups": groups, "ref": ref, "int8": int8}


def test_headline_names_the_passing_artifact_with_the_best_worst_group_its_size_latency_and_ci(tmp_path):
    run_dir, _ = _validation(tmp_path)
    run = load_stages(run_dir)
    best = summary.best_passing(run)
    assert best is not None and best.name == "model.int8.onnx"  # worst group 0.833 (light) > 0.818 (dark, fp32)
    assert best.macs == REF_MACS and best.reference == "reference"
    md = build_report(run_dir).markdown.read_text()
    answer = md.split("## Answer", 1)[1].split("##", 1)[0]
    assert "2 of 3 artifacts pass every gate. Of these, model.int8.onnx does best on its worst group: 11.30 MB " \
           "file, 1800.0 M MACs per image, 2.50 ms median latency at batch 1." in answer
    wg = summary.worst_group(best)
    ci = best.metrics["intervals"][f"accuracy[{wg.name}]"]
    n = N_DARK if wg.name == "dark" else N_LIGHT
    assert f"Its worst group is {wg.name} (n = {n}): accuracy {wg.accuracy:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in answer
    assert "Also passing: model.fp32.onnx." in answer
    assert "Failing: model.fp16.onnx (agreement 0.9000 below 0.9900 (overall))." in answer  # label prefix dropped
    # the answer comes before every table
    assert md.index("## Answer") < md.index("## Artifacts") < md.index("## All metrics")


def test_headline_names_the_one_candidate_that_passes():
    s = _stages()
    base = s[2].__dict__

    def cand(name, passed, size, p50):
        return StageRecord(**{**base, "name": name, "gate_passed": passed, "size_bytes": size,
                              "latency": {"batch1_p50_ms": p50},
                              "gate_failures": () if passed else ("accuracy dropped (group dark)",)})

    run = RunStages((s[0], cand("a.onnx", False, 1_000, 0.5), cand("b.onnx", True, 3_000_000, 2.0),
                     cand("c.onnx", False, 2_000, 0.7)))
    lines = summary.headline(run)
    assert lines[0] == ("1 of 3 artifacts pass every gate. Of these, b.onnx does best on its worst group: "
                        "3.00 MB file, 2.00 ms median latency at batch 1.")
    assert not any(ln.startswith(("Also passing", "Smallest", "Fastest")) for ln in lines)
    # the same reasons are said once, with every artifact they apply to
    assert lines[-1] == "Failing: a.onnx, c.onnx (accuracy dropped (group dark))."
    run = RunStages((*run.stages, replace(cand("d.onnx", False, 5, 0.1), gate_failures=("Eodd drifted",))))
    assert summary.headline(run)[-1] == ("Failing: a.onnx, c.onnx (accuracy dropped (group dark)); "
                                         "d.onnx (Eodd drifted).")


def test_an_artifact_of_a_model_that_failed_its_pruning_guard_does_not_pass():
    s = _stages()
    guard = "pruning guard failed on validation: no model at the budget kept every group within 0.01"
    ok = StageRecord(**{**s[2].__dict__, "name": "big/onnx-fp32", "size_bytes": 9_000_000})
    flagged = StageRecord(**{**s[2].__dict__, "name": "pruned/onnx-int8", "size_bytes": 1_000, "guard_failure": guard})
    run = RunStages((s[0], ok, flagged))
    assert [summary.passes(x) for x in (ok, flagged)] == [True, False]
    assert summary.best_passing(run) is ok  # not the smaller, better-looking artifact of the flagged model
    lines = summary.headline(run)
    assert lines[0].startswith("1 of 2 artifacts pass every gate. Of these, big/onnx-fp32")
    assert lines[-1] == f"Failing: pruned/onnx-int8 ({guard})."
    assert [p.status for p in plots.pareto_points(run.stages)] == ["reference", "pass", "fail"]
    head, rows = summary.artifact_table(run)
    assert rows[2][1] == "FAIL (pruning guard failed)"


def test_headline_when_no_artifact_passes_names_each_failing_gate():
    s = _stages()
    stages = (s[0], StageRecord(**{**s[2].__dict__, "name": "a.onnx", "gate_passed": False,
                                   "gate_failures": ("a.onnx: accuracy dropped 0.05 (group dark)",)}),
              StageRecord(**{**s[2].__dict__, "name": "b.onnx", "gate_passed": False,
                             "gate_failures": ("b.onnx: exported from a different model",)}))
    lines = summary.headline(RunStages(stages))
    assert lines[0] == "No artifact passes every gate (2 checked)."
    assert lines[1:] == ["a.onnx fails: a.onnx: accuracy dropped 0.05 (group dark)",
                         "b.onnx fails: b.onnx: exported from a different model"]


def test_intervals_and_group_sizes_shown_equal_the_bootstrap_and_the_data(tmp_path):
    run_dir, data = _validation(tmp_path)
    y, groups = data["y"], data["groups"]
    md = build_report(run_dir).markdown.read_text()
    table = _section(md, "Per-group accuracy")
    head = [c.strip() for c in table[0].strip("|").split(" | ")]
    assert head == ["stage", f"dark (n = {N_DARK})", f"light (n = {N_LIGHT})"]  # = the split's group counts
    for stage, pred in (("reference", data["ref"]), ("model.int8.onnx", data["int8"])):
        ci = bootstrap_intervals(y, pred, groups, ("dark", "light"), 3, n_boot=200, seed=0)
        cells = _row(table, stage)
        for i, g in enumerate(("dark", "light"), start=1):
            acc = float((pred[groups == g] == y[groups == g]).mean())
            lo, hi = ci[f"accuracy[{g}]"]
            assert cells[i] == f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"
    # fairness: each gap's INT8 change against the reference with the paired interval of the difference
    fair = _section(md, "Fairness against the reference")
    assert [c.strip() for c in fair[0].strip("|").split(" | ")][2:6] == [
        "Eodd difference [95% CI]", "Eopp0 difference [95% CI]", "Eopp1 difference [95% CI]", "DP difference [95% CI]"]
    row = _row(fair, "model.int8.onnx")
    d = bootstrap_difference_intervals(y, data["ref"], data["int8"], groups, ("dark", "light"), 3, n_boot=200, seed=0)
    ref_m = compute_metrics(y, data["ref"], groups, 3, group_order=("dark", "light"))
    int8_m = compute_metrics(y, data["int8"], groups, 3, group_order=("dark", "light"))
    for i, key in enumerate(("eodd", "eopp0", "eopp1", "dp"), start=2):
        delta = int8_m.gap(key) - ref_m.gap(key)
        assert row[i] == summary.fmt_ci(delta, d[key], sign=True)
        assert row[i].endswith(f"[{d[key][0]:+.3f}, {d[key][1]:+.3f}]".replace("-0.000", "+0.000"))
    assert all(lo <= 0 <= hi for k, (lo, hi) in d.items() if k in ("eodd", "eopp0", "eopp1", "dp"))
    # 6 fixed errors among 88 images do not make INT8 distinguishably fairer: the report says so
    assert row[6] == "not distinguishable: every interval of the difference contains 0"
    # the FP32 export is identical: its paired difference intervals are exactly [0, 0]
    assert _row(fair, "model.fp32.onnx")[2] == "+0.000 [+0.000, +0.000]"


def test_a_difference_whose_interval_excludes_zero_is_named():
    rng = np.random.default_rng(0)
    g = np.array(["a"] * 200 + ["b"] * 200)
    y = rng.integers(0, 2, 400)
    ref = y.copy()  # perfect: every gap 0
    cand = np.where(g == "b", 1 - y, y)  # wrong on every image of group b: Eopp0 = Eopp1 = 1; Eodd's signed sum 0
    m_ref = compute_metrics(y, ref, g, 2, bootstrap=100).to_dict()
    m_cand = compute_metrics(y, cand, g, 2, bootstrap=100).to_dict()
    d = {k: list(v) for k, v in bootstrap_difference_intervals(y, ref, cand, g, ("a", "b"), 2, n_boot=100).items()}
    run = RunStages((StageRecord("ref", "pytorch", m_ref),
                     StageRecord("cand", "onnx", m_cand, reference="ref", gate_passed=False, delta_intervals=d)))
    head, rows = summary.fairness_table(run)
    assert rows[0][2] == "+0.000 [+0.000, +0.000]" and rows[0][4] == "+1.000 [+1.000, +1.000]"
    assert rows[0][6] == "Eopp0 higher (less fair); Eopp1 higher (less fair)"


def test_bootstrap_difference_equals_a_brute_force_loop_over_the_shared_resamples():
    from fairdeploy.metrics.bootstrap import _resample_weights

    rng = np.random.default_rng(1)
    g = np.array(["a"] * 30 + ["b"] * 20)
    y = rng.integers(0, 3, 50)
    p1 = rng.integers(0, 3, 50)
    p2 = np.where(rng.random(50) < 0.5, y, p1)
    order = ("a", "b")
    n_boot = 25
    weights = _resample_weights(g, order, n_boot, seed=4)
    members = {name: np.flatnonzero(g == name) for name in order}
    diffs = {"eodd": [], "dp": [], "accuracy[b]": []}
    for i in range(n_boot):
        idx = np.concatenate([np.repeat(members[n], weights[n][i].astype(int)) for n in order])
        r1 = compute_metrics(y[idx], p1[idx], g[idx], 3, group_order=order)
        r2 = compute_metrics(y[idx], p2[idx], g[idx], 3, group_order=order)
        diffs["eodd"].append(r2.gap("eodd") - r1.gap("eodd"))
        diffs["dp"].append(r2.gap("dp") - r1.gap("dp"))
        diffs["accuracy[b]"].append(r2.group("b").accuracy - r1.group("b").accuracy)
    got = bootstrap_difference_intervals(y, p1, p2, g, order, 3, n_boot=n_boot, seed=4)
    for k, v in diffs.items():
        assert got[k] == pytest.approx((np.quantile(v, 0.025), np.quantile(v, 0.975)), abs=1e-12)
    same = bootstrap_difference_intervals(y, p1, p1, g, order, 3, n_boot=n_boot, seed=4)
    assert all(v == (0.0, 0.0) for v in same.values())


def test_pareto_points_are_the_inputs_and_the_front_is_brute_force(tmp_path):
    run_dir, _ = _validation(tmp_path)
    run = load_stages(run_dir)
    pts = plots.pareto_points(run.stages)
    assert [p.name for p in pts] == [s.name for s in run.stages]
    for p, s in zip(pts, run.stages):
        assert p.macs == REF_MACS
        assert p.latency_ms == s.latency["batch1_p50_ms"]
        assert p.worst_group_accuracy == min(m["accuracy"] for m in s.metrics["groups"].values())
    assert [p.status for p in pts] == ["reference", "pass", "pass", "fail"]
    # cost, accuracy: (1, .5) and (2, .9) are on the front; (3, .8) is beaten by (2, .9); (2, .7) by (2, .9)
    assert plots.pareto_front([(1, .5), (2, .9), (3, .8), (2, .7)]) == [0, 1]


def test_tick_labels_are_short_and_confusion_panels_skip_unchanged_stages(tmp_path):
    for name in ("group-taylor-control/onnx-int8", "x" * 80, "a/b/c/d/e", "/tmp/run/export-a/model.int8.onnx"):
        lines = plots.tick_label(name).split("\n")
        assert len(lines) <= 3 and all(len(ln) <= 16 for ln in lines)
    assert plots.tick_label("group-taylor-control/onnx-int8") == "group-taylor-\ncontrol/\nonnx-int8"
    assert plots.tick_label("/tmp/run/export-a/model.int8.onnx") == "…run/\nexport-a/\nmodel.int8.onnx"
    run = load_stages(_validation(tmp_path)[0])
    panels, unchanged = plots.confusion_panels(run)
    assert unchanged == ["model.fp32.onnx", "model.fp16.onnx"]  # identical to the reference: not drawn
    assert {(p.stage, p.group) for p in panels} == {("model.int8.onnx", "dark")}  # light did not change
    ref = {g: np.array(m["confusion"]) for g, m in run.stages[0].metrics["groups"].items()}
    int8 = next(s for s in run.stages if s.name == "model.int8.onnx")
    for p in panels:
        assert (p.delta == np.array(int8.metrics["groups"][p.group]["confusion"]) - ref[p.group]).all()


def test_report_tables_figures_and_self_contained_html(tmp_path):
    stages = _stages()
    run = RunStages(tuple(stages), (Trajectory("fairprune", ({"step": 0, "accuracy": 0.7, "f1_macro": 0.7, "eodd": 0.1},
                                                             {"step": 1, "accuracy": 0.72, "f1_macro": 0.7, "eodd": 0.05})),))
    write_stages(tmp_path / "stages.json", run)
    paths = build_report(tmp_path)
    md = paths.markdown.read_text()
    table = _section(md, "All metrics")
    for s in stages:  # each stage's accuracy and Eodd appear in the full table with 4 decimals
        row = " | ".join(_row(table, s.name))
        assert f"{s.metrics['overall']['accuracy']:.4f}" in row
        assert f"{s.metrics['fairness']['eodd']:.4f}" in row
        assert f"{s.metrics['groups']['dark']['accuracy']:.4f}" in row
    assert "(1/K) * sum_k |(TPR_k^a - TPR_k^b) + (FPR_k^a - FPR_k^b)| / 2" in md  # the definition is stated
    names = [f.name for f in paths.figures]
    assert names == ["pareto.png", "accuracy_by_group.png", "fairness.png", "f1_by_group.png", "tradeoff.png",
                     "trajectory.png", "confusion_delta.png", "size_latency.png"]
    for f in paths.figures:
        assert f.read_bytes().startswith(PNG_MAGIC)
    html = paths.html.read_text()
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(imgs) == len(names) and all(base64.b64decode(b).startswith(PNG_MAGIC) for b in imgs)
    assert not re.search(r"src=['\"](?!data:)", html)  # nothing external
    # the validation split appears only in the trajectory figure's title; every other figure names the test split
    titles = re.findall(r"^## (.*)$", md, flags=re.MULTILINE)
    assert [t for t in titles if "validation split" in t] == ["Pruning steps: accuracy and Eodd (validation split)"]


def test_html_escapes_names_in_the_new_sections(tmp_path):
    evil_group, evil_label = "<img src=x onerror=alert(1)>", "<script>x</script>.onnx"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    g = rng.choice(["plain", evil_group], 60)
    m = compute_metrics(y, y, g, 3, CLASSES, bootstrap=20).to_dict()
    stages = (StageRecord(name="reference", kind="pytorch", metrics=m),
              StageRecord(name=evil_label, kind="onnx", metrics=m, reference="reference", gate_passed=True,
                          size_bytes=10))
    write_stages(tmp_path / "stages.json", RunStages(stages))
    paths = build_report(tmp_path)
    html, md = paths.html.read_text(), paths.markdown.read_text()
    assert "<img src=x" not in html and "<script>x" not in html
    assert "&lt;script&gt;x&lt;/script&gt;.onnx" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=x" not in md and "<script>" not in md


def test_report_cli_and_missing_inputs(tmp_path):
    write_stages(tmp_path / "stages.json", RunStages(tuple(_stages())))
    proc = subprocess.run([sys.executable, "-m", "fairdeploy", "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fairdeploy", "report", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "neither stages.json" in proc.stderr
    assert not (empty / "report.md").exists()
    with pytest.raises(FairdeployError, match="not found"):
        build_report(tmp_path / "nope")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_html_screenshot_in_headless_chromium(tmp_path):
    from PIL import Image

    (tmp_path / "run").mkdir()
    run_dir, _ = _validation(tmp_path / "run")
    paths = build_report(run_dir)
    png = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,2000",
           paths.html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 20_000, proc.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (2000, 1280)
    ink = (img.sum(axis=2) < 600)  # not white / near-white
    assert ink[:300].mean() > 0.01  # the title and the answer are drawn at the top
    # the answer box is green (an artifact passes) and sits in the top 600 pixels
    green = (np.abs(img[:600] - np.array([0xee, 0xf9, 0xf2])).sum(axis=2) < 6).mean()
    assert green > 0.02
    assert ink[1000:2000].mean() > 0.005  # the tables and the first figures fill the page below


def _pipeline_like_stages(models: int) -> list[StageRecord]:
    """3 stages per model with the long names a budget pipeline gives them."""
    s = _stages()
    names = [f"{m}{a}" for m in ("vanilla", "group-taylor", "group-taylor-control", "fairprune+ft-control",
                                 "group-taylor-second-try", "snnl-control")[:models]
             for a in ("", "/onnx-fp32", "/onnx-int8")]
    return [StageRecord(**{**s[i % 3].__dict__, "name": n, "macs": 10_000_000 * (3 - i // 3)})
            for i, n in enumerate(names)]


@pytest.mark.parametrize("models", [3, 6])  # 9 stages: level labels; 18: too wide, upright labels
@pytest.mark.parametrize("draw", [
    lambda st: plots.group_bars(st, "accuracy", "accuracy"),
    lambda st: plots.fairness_bars(st),
    lambda st: plots.size_latency(st),
])
def test_bar_figures_start_at_zero_and_their_tick_labels_do_not_overlap(monkeypatch, draw, models):
    figs = []
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or b"")
    draw(_pipeline_like_stages(models))
    (fig,) = figs
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0.0
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) == 3 * models
        for a, b in zip(boxes, boxes[1:]):  # neighbours, left to right
            assert a.x1 <= b.x0 or a.y1 <= b.y0 or b.y1 <= a.y0, "tick labels overprint"
    assert fig.get_figwidth() <= plots.MAX_WIDTH_IN
    plots._plt().close(fig)


def test_candidate_paths_are_shown_relative_to_their_shared_folder():
    from fairdeploy.report.from_validation import short_labels

    assert short_labels(["/r/exp/model.fp32.onnx", "/r/exp/model.int8.onnx"]) == ["model.fp32.onnx", "model.int8.onnx"]
    assert short_labels(["/r/a/model.onnx", "/r/b/model.onnx"]) == ["a/model.onnx", "b/model.onnx"]  # still unique
    assert short_labels(["/r/exp/model.onnx"]) == ["model.onnx"]
    assert short_labels(["my-runner", "/r/model.onnx"]) == ["my-runner", "/r/model.onnx"]  # not all paths: as given
