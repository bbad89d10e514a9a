"""Issue 20 §4: what a command prints can be planned with. One file-size unit (MB = 10^6 bytes) in `validate` and
the report; `evaluate` reports parameters and MACs; the calibration warning names the smallest group x class
cell; `export` checks on the validation split unless asked for test."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from fairdeploy.data.manifest import Manifest, Record

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- one size unit: the same file's size in `validate` and in the report ----

def test_validate_and_the_report_print_the_same_file_size_in_mb(tiny, tmp_path: Path, run_main) -> None:
    manifest, ckpt = tiny
    cand = tmp_path / "cand"
    shutil.copytree(ckpt, cand)
    size = (ckpt / "model.safetensors").stat().st_size
    hundredths = (size + 5_000) // 10_000  # MB = 10^6 bytes, to two decimals, in integers
    mb = f"{hundredths // 100}.{hundredths % 100:02d} MB"
    mib = f"{size / 2**20:.2f} MB"
    assert mb != mib  # the control: the unit the CLI printed before
    out = tmp_path / "val"
    code, stdout, err = run_main("validate", "-r", str(ckpt), "-c", str(cand), "--data", str(manifest), "--device",
                                 "cpu", "--bootstrap", "0", "--no-latency", "--out", str(out))
    assert code in (0, 1), err
    printed = re.findall(r"fp32, ([0-9.]+ MB)", stdout)
    assert printed == [mb, mb], stdout
    code, _, err = run_main("report", str(out))
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert mb in md and mib not in md
    assert re.search(rf"\| {re.escape(mb[:-3])} \|", md)  # the artifact table's "size MB" column


# ---- evaluate: parameters and MACs (fairdeploy.models.size) ----

def test_evaluate_reports_parameters_and_macs(tiny, tmp_path: Path, run_main) -> None:
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size

    manifest, ckpt = tiny
    out = tmp_path / "metrics.json"
    code, stdout, err = run_main("evaluate", "--model", str(ckpt), "--data", str(manifest), "--bootstrap", "0",
                                 "--device", "cpu", "--out", str(out))
    assert code == 0, err
    net, _ = load_checkpoint(ckpt)
    params = sum(p.numel() for p in net.parameters())  # the oracles for the parameter counts
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    assert nonzero < params  # a fresh resnet18: BatchNorm biases start at 0
    macs = model_size(net, 16).macs
    assert macs > params  # a convolution network at 16 px: more MACs than weights
    got = json.loads(out.read_text())["size"]
    assert got == {"params": params, "nonzero_params": nonzero, "macs": macs, "image_size": 16}
    flat = " ".join(stdout.split())
    assert f"{params:,} parameters ({nonzero:,} non-zero), {macs / 1e6:.1f} M MACs per 16x16 image" in flat


# ---- the calibration warning names the smallest cell ----

def _manifest(counts: dict[tuple[str, str], int]) -> Manifest:
    records = [Record(f"{g}-{c}-{i}.png", c, g, "train") for (g, c), n in counts.items() for i in range(n)]
    return Manifest(tuple(records), Path("."), source="hand.csv")


def test_calibration_warning_names_the_smallest_cell() -> None:
    from fairdeploy.export.calibration import CalibrationRecipe, fit_calibration_size
    from fairdeploy.models.checkpoint import ModelSpec

    spec = ModelSpec("resnet18", ("df", "nv"), ("female", "male"), image_size=16)
    # 80 images over 4 cells: 20 each; female/df (the first cell) has 19, male/df 13: both short, male/df smallest
    counts = {("female", "df"): 19, ("female", "nv"): 50, ("male", "df"): 13, ("male", "nv"): 50}
    recipe = CalibrationRecipe(size=80, fit_size=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_calibration_size(_manifest(counts), spec, recipe)
    (w,) = caught
    text = str(w.message)
    assert "group 'male', class 'df'" in text and ": 13, need 20" in text and "'female'" not in text, text
    # the largest balanced size: 4 cells of 13, and one more for each of the first two cells (19 and 50): 54
    assert fitted.size == 54 and "calibrating on 54 images" in text
    from fairdeploy.errors import FairdeployError

    with pytest.raises(FairdeployError, match=r"group 'male', class 'df'.*: 13, need 20.*--calib-size 52 or less"):
        fit_calibration_size(_manifest(counts), spec, CalibrationRecipe(size=80))


# ---- export: the self-check uses the validation split unless asked for test ----

def test_export_checks_on_val_by_default_and_on_test_when_asked(tiny, tmp_path: Path, run_main) -> None:
    import inspect

    from fairdeploy.export.exporter import run_export

    assert inspect.signature(run_export).parameters["check_split"].default == "val"
    manifest, ckpt = tiny
    n = {s: sum(1 for line in manifest.read_text().splitlines()[1:] if line.split(",")[3] == s)
         for s in ("val", "test")}
    for asked, split in ((None, "val"), ("test", "test")):
        out = tmp_path / split
        code, stdout, err = run_main("export", "--model", str(ckpt), "--data", str(manifest), "--out", str(out),
                                     *(("--check-split", asked) if asked else ()))
        assert code == 0, err
        check = json.loads((out / "export.json").read_text())["check_data"]
        assert check["source"] == f"{manifest}:{split}" and check["n"] == n[split]
        assert f"checked on {manifest}:{split} (n={n[split]})" in " ".join(stdout.split())
    code, stdout, _ = run_main("export", "--help")
    assert "(default: val;" in " ".join(stdout.split())
