"""The report: the answer first (which artifact passes, its size, latency, worst group with n and CI), per-group
intervals equal to the bootstrap's, paired fairness differences, Pareto points, figures, self-contained HTML,
the page as headless Chromium lays it out (answer shown, no overprinted labels, every plot with data),
and a pipeline rerun that leaves the report alone."""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import os
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


# ---- the report in a real browser: headless Chromium lays the page out; the checks read what it computed ----

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# .ci/run installs Chromium and sets this: there a missing browser fails the test instead of skipping it
REQUIRE_CHROMIUM = bool(os.environ.get("FAIRDEPLOY_REQUIRE_CHROMIUM"))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,2000")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not REQUIRE_CHROMIUM,
                                    reason="headless Chromium not installed (apt-get install chromium; CI installs it)")

# Run on the page's load event, after layout and image decoding: writes what the browser computed into
# <pre id="fd-layout"> as JSON, which `chromium --dump-dom` prints with the rest of the DOM.
_MEASURE_JS = """
window.addEventListener('load', () => {
  const box = r => [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY];
  const style = el => getComputedStyle(el);
  const opacity = el => { let o = 1; for (; el; el = el.parentElement) o *= Number(style(el).opacity); return o; };
  const background = el => {
    for (; el; el = el.parentElement) {
      const c = style(el).backgroundColor;
      if (c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c;
    }
    return 'rgb(255, 255, 255)';
  };
  const textNodes = root => {
    const out = [], walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode())
      if (n.textContent.trim() && !n.parentElement.closest('script, style')) out.push(n);
    return out;
  };
  const texts = [];
  for (const n of textNodes(document.body)) {
    const range = document.createRange();
    range.selectNodeContents(n);
    for (const r of range.getClientRects())
      if (r.width > 0 && r.height > 0) texts.push({text: n.textContent.trim().slice(0, 80), box: box(r)});
  }
  const answerBox = document.querySelector('.answer');
  const answer = [...document.querySelectorAll('.answer p')].map(p => ({
    text: p.innerText, box: box(p.getBoundingClientRect()), display: style(p).display,
    visibility: style(p).visibility, opacity: opacity(p),
    colours: textNodes(p).map(n => [style(n.parentElement).color, background(n.parentElement)])}));
  const images = [...document.images].map(img => {
    let colours = 0;
    if (img.complete && img.naturalWidth > 0) {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
      for (let i = 0; i < d.length && seen.size < 256; i += 4)
        seen.add(((d[i] * 256 + d[i + 1]) * 256 + d[i + 2]) * 256 + d[i + 3]);
      colours = seen.size;
    }
    return {alt: img.alt, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            box: box(img.getBoundingClientRect()), colours};
  });
  const tops = [...document.querySelectorAll('table, img')].map(el => el.getBoundingClientRect().top + scrollY);
  const pre = document.createElement('pre');
  pre.id = 'fd-layout';
  pre.textContent = JSON.stringify({texts, answer, images, answer_box: answerBox ? box(answerBox.getBoundingClientRect()) : null,
                                    first_table_or_figure_top: tops.length ? Math.min(...tops) : null});
  document.body.appendChild(pre);
});
"""


def _layout_in_chromium(page_html: str, work: Path) -> dict:
    """Open the page in headless Chromium (fresh profile) and return the layout the browser computed: every text
    fragment's box, the answer's paragraphs (rendered text, box, display, visibility, opacity, text and background
    colours), each image's load state, natural size and number of distinct pixel colours (up to 256)."""
    if CHROMIUM is None:
        pytest.fail("FAIRDEPLOY_REQUIRE_CHROMIUM is set but neither chromium nor chromium-browser is on PATH")
    work.mkdir(parents=True, exist_ok=True)
    page = work / "measured.html"
    page.write_text(page_html.replace("</body>", f"<script>{_MEASURE_JS}</script></body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom",
                           page.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="fd-layout">(.*?)</pre>', proc.stdout, flags=re.DOTALL)
    assert found, f"Chromium did not lay the page out (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html_lib.unescape(found.group(1)))


# Two text boxes overlap when they share more than half a CSS pixel both across and down: layout positions are
# fractional, and neighbours that merely touch (a bold run and the text after it) share a rounding error far
# below that, while two labels drawn over each other share whole glyphs (the broken page below: about 1 em).
OVERLAP_PX = 0.5


def overlapping_text(layout: dict) -> list[str]:
    """Every pair of rendered text fragments that overprint each other, and any fragment pushed off the page's top
    or left edge (where no scrolling reaches it)."""
    texts = layout["texts"]
    boxes = np.array([t["box"] for t in texts], dtype=float).reshape(-1, 4)
    across = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    down = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    first, second = np.nonzero(np.triu((across > OVERLAP_PX) & (down > OVERLAP_PX), k=1))
    problems = [f"{texts[i]['text']!r} overprints {texts[j]['text']!r} ({across[i, j]:.1f} x {down[i, j]:.1f} px)"
                for i, j in zip(first, second)]
    problems += [f"{t['text']!r} is off the page at {t['box'][:2]}" for t in texts if min(t["box"][:2]) < 0]
    return problems


def _rgba(css: str) -> tuple[np.ndarray, float]:
    """A CSS rgb() / rgba() colour as (r, g, b in 0..255, alpha)."""
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return np.array(values[:3]), values[3] if len(values) > 3 else 1.0


def contrast_ratio(fg: str, bg: str, opacity: float = 1.0) -> float:
    """WCAG 2 contrast ratio of text colour `fg` drawn at `opacity` (times its own alpha) over the opaque `bg`
    (1: the text is the background's colour, 21: black on white)."""
    def luminance(rgb: np.ndarray) -> float:
        c = rgb / 255.0
        lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(lin @ np.array([0.2126, 0.7152, 0.0722]))

    (text, alpha), (back, _) = _rgba(fg), _rgba(bg)
    drawn = alpha * opacity * text + (1 - alpha * opacity) * back
    hi, lo = sorted((luminance(drawn), luminance(back)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


WCAG_AA_CONTRAST = 4.5  # WCAG 2 level AA minimum for body text


def answer_problems(layout: dict, expected: list[str]) -> list[str]:
    """The answer box shows, before any table or figure, exactly the headline sentences the report computed,
    each one displayed, visible, on the page, in a colour readable on its background (opacity included)."""
    def words(text: str) -> str:
        return " ".join(text.split())

    shown = layout["answer"]
    problems = []
    if [words(p["text"]) for p in shown] != [words(line) for line in expected]:
        problems.append(f"the answer reads {[words(p['text']) for p in shown]}, the report computed {expected}")
    for p in shown:
        x0, y0, x1, y1 = p["box"]
        label = repr(words(p["text"])[:60])
        if p["display"] == "none" or p["visibility"] != "visible":
            problems.append(f"answer line {label} is hidden (display {p['display']}, visibility {p['visibility']})")
        if x1 <= x0 or y1 <= y0 or x0 < 0 or y0 < 0:
            problems.append(f"answer line {label} has no area on the page: {p['box']}")
        for fg, bg in p["colours"]:
            ratio = contrast_ratio(fg, bg, p["opacity"])
            if ratio < WCAG_AA_CONTRAST:
                problems.append(f"answer line {label}: text {fg} (opacity {p['opacity']:g}) on {bg}, contrast "
                                f"{ratio:.2f} < {WCAG_AA_CONTRAST}")
    box, first = layout["answer_box"], layout["first_table_or_figure_top"]
    if box is None:
        problems.append("no answer box")
    elif first is not None and box[3] > first:
        problems.append(f"the answer (bottom {box[3]:.0f} px) is not above the first table or figure ({first:.0f} px)")
    return problems


def plot_problems(layout: dict, figures: int) -> list[str]:
    """Each of the report's `figures` is an image the browser loaded and shows, and its pixels are not one colour."""
    images = layout["images"]
    problems = [] if len(images) == figures else [f"{len(images)} images on the page, the report drew {figures}"]
    for img in images:
        x0, y0, x1, y1 = img["box"]
        if not img["complete"] or min(img["natural"]) == 0:
            problems.append(f"plot {img['alt']!r} did not load")
        elif x1 <= x0 or y1 <= y0:
            problems.append(f"plot {img['alt']!r} is not shown (box {img['box']})")
        elif img["colours"] < 2:
            problems.append(f"plot {img['alt']!r} is one flat colour")
    return problems


def axes_without_data(fig) -> list[str]:
    """The axes of a matplotlib figure that show no data in their view: no bar of finite height, no finite line
    or scatter point, no image, inside the axes' limits (a panel switched off, e.g. an empty grid slot, is not
    drawn and is skipped)."""
    from matplotlib.patches import Rectangle

    problems = []
    for k, ax in enumerate(fig.axes):
        if not ax.axison:
            continue
        points = [(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height())
                  for p in ax.patches if isinstance(p, Rectangle) and p.get_visible()]
        for line in ax.lines:
            if line.get_visible():
                points += zip(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for coll in ax.collections:
            if coll.get_visible():
                points += [tuple(o) for o in np.ma.filled(np.ma.asarray(coll.get_offsets(), float), np.nan)]
        xy = np.array(points, dtype=float).reshape(-1, 2)
        (xlo, xhi), (ylo, yhi) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        inside = (xy[:, 0] >= xlo) & (xy[:, 0] <= xhi) & (xy[:, 1] >= ylo) & (xy[:, 1] <= yhi)
        images = [im for im in ax.images if np.isfinite(np.asarray(im.get_array(), float)).any()]
        if not inside.any() and not images:
            problems.append(f"axes {k} ({ax.get_ylabel() or ax.get_title() or 'untitled'}) shows no data")
    return problems


def _built_with_figures(monkeypatch, run_dir: Path) -> tuple[object, list[str]]:
    """build_report(run_dir), checking every matplotlib figure it draws before it becomes a PNG."""
    drawn, problems = [], []
    to_png = plots._png

    def checked(fig):
        drawn.append(fig)
        problems.extend(f"figure {len(drawn)}: {p}" for p in axes_without_data(fig))
        return to_png(fig)

    monkeypatch.setattr(plots, "_png", checked)
    paths = build_report(run_dir)
    assert len(drawn) == len(paths.figures)
    return paths, problems


def _failing_pipeline_run(tmp_path: Path) -> Path:
    """A run as a budget pipeline leaves it: 18 artifacts with long names, none passing its gate, notes, a control
    pair, a step run's trajectory and a compression run's rounds."""
    stages = [replace(s, gate_passed=False, gate_failures=(f"{s.name}: agreement 0.9000 below 0.9900 (overall)",))
              if s.gate_passed is not None else s for s in _pipeline_like_stages(6)]
    steps = Trajectory("fairprune", tuple({"step": i, "accuracy": 0.7 + 0.01 * i, "f1_macro": 0.7,
                                           "eodd": 0.1 - 0.02 * i} for i in range(4)))
    rounds = Trajectory("group-taylor", tuple({"step": i, "accuracy": 0.7, "f1_macro": 0.68 - 0.01 * i,
                                               "eodd": 0.05 + 0.01 * i, "worst_group_accuracy": 0.6 - 0.02 * i,
                                               "macs": 100_000_000 * 0.75 ** i, "passed": i < 3} for i in range(5)))
    write_stages(tmp_path / "stages.json", RunStages(tuple(stages), (steps, rounds), "test", "a pipeline's report",
                                                     ("group-taylor: no difference shown on validation",)))
    return tmp_path


@needs_chromium
@pytest.mark.parametrize("kind", ["validation", "pipeline"])
def test_report_reads_right_in_headless_chromium(tmp_path, monkeypatch, kind):
    """In the page Chromium lays out: the answer shows the headline the report computed, first and readable; no
    two text labels overprint; every figure loaded with more than one colour, and each of its axes drew data."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if kind == "validation":
        _validation(run_dir)
    else:
        _failing_pipeline_run(run_dir)
    paths, figure_problems = _built_with_figures(monkeypatch, run_dir)
    layout = _layout_in_chromium(paths.html.read_text(), tmp_path / "browser")
    run = load_stages(run_dir)
    assert (summary.best_passing(run) is None) == (kind == "pipeline")  # both answers: a pass and none passing
    assert answer_problems(layout, summary.headline(run)) == []
    assert overlapping_text(layout) == []
    assert len(layout["texts"]) > 100  # the tables' cells were measured too
    assert figure_problems == []
    assert plot_problems(layout, len(paths.figures)) == []


def _flat_png_like(b64_png: str) -> str:
    """A white PNG of the size of the given one (base64 in and out)."""
    from PIL import Image

    size = Image.open(io.BytesIO(base64.b64decode(b64_png))).size
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@needs_chromium
def test_the_browser_checks_fail_on_a_broken_report(tmp_path):
    """The same report, broken four ways, as a reader would meet them: section sentences pulled up over their
    headings, the answer in its box's background colour with its last line gone, one figure a flat white image
    and one that does not decode. Each check names what it found."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _validation(run_dir)
    page = build_report(run_dir).html.read_text()
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    broken = page.replace(imgs[0], _flat_png_like(imgs[0])).replace(imgs[1], "AAAA")
    broken = broken.replace("</style>", "h2+p{margin-top:-2.2em}.answer p{color:#eef9f2}</style>")
    answer_lines = re.findall(r"<div class='answer pass'>.*?</div>", broken, flags=re.DOTALL)[0]
    last = answer_lines.rsplit("<p>", 1)[1].split("</p>")[0]
    broken = broken.replace(f"<p>{last}</p>", "", 1)
    layout = _layout_in_chromium(broken, tmp_path / "browser")

    overprints = overlapping_text(layout)
    assert any("'Artifacts' overprints" in p or "overprints 'Artifacts'" in p for p in overprints), overprints
    answer = answer_problems(layout, summary.headline(load_stages(run_dir)))
    assert any(p.startswith("the answer reads") for p in answer), answer
    assert any("contrast 1.00" in p for p in answer), answer
    figures = plot_problems(layout, len(imgs))
    assert len(figures) == 2 and figures[0].endswith("is one flat colour") and figures[1].endswith("did not load"), \
        figures


def test_figure_data_check_finds_empty_axes():
    """axes_without_data flags axes with nothing drawn, with only NaN bars, and with data outside the limits; a
    drawn bar, a line point or an image is data."""
    plt = plots._plt()
    fig, axes = plt.subplots(1, 6)
    axes[1].bar([0, 1], [np.nan, np.nan])
    axes[2].plot([0, 1], [5, 6])
    axes[2].set_ylim(0, 1)
    axes[3].bar([0, 1], [0.2, 0.4])
    axes[4].plot([0.5], [0.5], "o")
    axes[5].imshow(np.eye(3))
    assert [p.split(" (")[0] for p in axes_without_data(fig)] == ["axes 0", "axes 1", "axes 2"]
    axes[0].axis("off")  # a switched-off panel is not drawn
    assert [p.split(" (")[0] for p in axes_without_data(fig)] == ["axes 1", "axes 2"]
    plt.close(fig)


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
