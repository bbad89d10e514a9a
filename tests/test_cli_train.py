"""`fairdeploy train` / `evaluate` from the command line, and their bad-input behaviour."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fairdeploy", *args], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(result, *needles: str) -> None:
    """`result` is a CompletedProcess or run_main's (code, out, err)."""
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else (result[0], result[2])
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_exactly_the_registered_commands():
    import re

    from fairdeploy.cli.app import app

    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    proc = run_cli("--help")
    assert proc.returncode == 0
    # the rows of the Commands panel: "│ name   help text │"
    panel = proc.stdout[proc.stdout.index("Commands"):]
    listed = set(re.findall(r"^│ (\w[\w-]*) ", panel, flags=re.MULTILINE))
    assert listed == registered and {"train", "prune", "export", "validate", "pipeline"} <= listed


def test_evaluate_writes_metrics_json(trained_checkpoint, synth_manifest, tmp_path):
    out = tmp_path / "metrics.json"
    proc = run_cli("evaluate", "--model", str(trained_checkpoint), "--data", str(synth_manifest), "--split", "test",
                   "--bootstrap", "50", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert set(d["groups"]) == {"dark", "light"}
    assert d["groups"]["dark"]["n"] + d["groups"]["light"]["n"] == d["n"]
    assert d["fairness"]["eodd"] == pytest.approx(_eodd_by_hand(trained_checkpoint, synth_manifest), abs=1e-6)
    assert "eodd" in d["intervals"]
    assert "dark" in proc.stdout and "eodd" in proc.stdout


def _eodd_by_hand(model_dir: Path, manifest_path: Path) -> float:
    """Oracle: run the model on the test split with plain torch, build each group's confusion matrix with
    scikit-learn, and take Eodd = sum_k |dTPR_k + dFPR_k| / (2K) between the two groups."""
    import numpy as np
    import torch
    from sklearn.metrics import confusion_matrix

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models import load_checkpoint

    model, spec = load_checkpoint(model_dir)
    ds = split_dataset(read_manifest(manifest_path), "test", Encoding(spec.classes, spec.groups),
                       eval_transform(spec.image_size, spec.mean, spec.std))
    ys, ps, gs = [], [], []
    with torch.no_grad():
        for i in range(len(ds)):
            x, y, g = ds[i][:3]
            ps.append(int(model(x[None]).argmax(1)))
            ys.append(int(y))
            gs.append(int(g))
    ys, ps, gs = map(np.array, (ys, ps, gs))
    k = len(spec.classes)
    rates = []
    for g in sorted(set(gs.tolist())):
        cm = confusion_matrix(ys[gs == g], ps[gs == g], labels=list(range(k)))
        tp = np.diag(cm)
        pos, predpos, n = cm.sum(1), cm.sum(0), cm.sum()
        rates.append((tp / np.maximum(pos, 1), (predpos - tp) / np.maximum(n - pos, 1)))
    (tpr_a, fpr_a), (tpr_b, fpr_b) = rates
    return float(np.abs((tpr_a - tpr_b) + (fpr_a - fpr_b)).sum() / (2 * k))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    rows = list(csv.DictReader(open(src)))
    rows = edit(rows)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_label_not_seen_in_training_is_named(trained_checkpoint, synth_manifest, tmp_path, run_main):
    def edit(rows):
        for r in rows:
            if r["split"] == "test":
                r["label"] = "melanoma"
                break
        return rows

    m = _rewrite(synth_manifest, synth_manifest.parent / "bad_label.csv", edit)
    out = tmp_path / "m.json"
    proc = run_main("evaluate", "--model", str(trained_checkpoint), "--data", str(m), "--device", "cpu", "--out", str(out))
    assert_one_line_error(proc, "label 'melanoma' was not seen in training", "row")
    assert not out.exists()


def test_group_not_seen_in_training_and_empty_split(trained_checkpoint, synth_manifest, tmp_path, run_main):
    def edit_group(rows):
        for r in rows:
            if r["split"] == "test":
                r["group"] = "medium"
        return rows

    m = _rewrite(synth_manifest, synth_manifest.parent / "bad_group.csv", edit_group)
    proc = run_main("evaluate", "--model", str(trained_checkpoint), "--data", str(m), "--device", "cpu")
    assert_one_line_error(proc, "group 'medium' was not seen in training")

    m2 = _rewrite(synth_manifest, synth_manifest.parent / "no_test.csv", lambda rows: [r for r in rows if r["split"] != "test"])
    proc = run_main("evaluate", "--model", str(trained_checkpoint), "--data", str(m2), "--device", "cpu")
    assert_one_line_error(proc, "split 'test' is empty")


def test_missing_and_unreadable_images(trained_checkpoint, synth_manifest, tmp_path, run_main):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_manifest.parent, root)
    test_rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["split"] == "test"]
    (root / test_rows[0]["image"]).write_bytes(b"\x89PNG garbage")
    out = tmp_path / "m.json"
    proc = run_cli("evaluate", "--model", str(trained_checkpoint), "--data", str(root / "manifest.csv"),
                   "--device", "cpu", "--out", str(out))
    assert_one_line_error(proc, test_rows[0]["image"], "could not be read")
    assert not out.exists()
    (root / test_rows[0]["image"]).unlink()
    proc = run_main("evaluate", "--model", str(trained_checkpoint), "--data", str(root / "manifest.csv"), "--device", "cpu")
    assert_one_line_error(proc, "not found", test_rows[0]["image"])


def test_missing_column_unknown_arch_and_bad_checkpoint(synth_manifest, tmp_path, run_main):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label,split\na.png,disc,train\n")
    proc = run_main("train", "--data", str(bad), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "missing required column(s) group")
    proc = run_main("train", "--data", str(synth_manifest), "--out", str(tmp_path / "run"), "--arch", "resnet9",
                   "--device", "cpu")
    assert_one_line_error(proc, "unknown architecture 'resnet9'", "resnet18")
    assert not (tmp_path / "run").exists()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.json").write_text('{"arch": "resnet18", "classes": ["a", "b"]}')
    proc = run_main("evaluate", "--model", str(ck), "--data", str(synth_manifest), "--device", "cpu")
    assert_one_line_error(proc, "model.safetensors not found")
    proc = run_main("train", "--data", str(synth_manifest), "--out", str(tmp_path / "run"), "--device", "cuda:3")
    assert_one_line_error(proc, "CUDA")
