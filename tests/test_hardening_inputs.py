"""Issue 9 §2 (last bullet) and §3 pipeline types: inputs that used to pass silently or end in a traceback."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.pipeline.config import load_pipeline_config

ISIC = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def _write_csv(path: Path, header: list[str], rows: list[list[str]], bom: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- a ground truth covering part of the metadata is counted and warned about ----

def test_isic2019_ground_truth_covering_part_of_the_metadata_warns_with_counts(tmp_path: Path) -> None:
    from fairdeploy.data.adapters import AdapterWarning, from_isic2019

    images = [f"ISIC_{i:07d}" for i in range(5)]
    meta = _write_csv(tmp_path / "meta.csv", ["image", "age_approx", "lesion_id", "sex"],
                      [[im, "50", "", "female" if i % 2 else "male"] for i, im in enumerate(images)])
    gt = _write_csv(tmp_path / "gt.csv", ["image", *ISIC],
                    [[im, *("1.0" if c == "NV" else "0.0" for c in ISIC)] for im in images[:2]])
    with pytest.warns(AdapterWarning, match=r"covers 2 of the 5 rows .*3 metadata rows have no ground-truth row "
                                            r".*'ISIC_0000002'"):
        result = from_isic2019(gt, meta)
    assert [r.image for r in result.records] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg"]
    assert result.report["metadata_rows"] == 5 and result.report["metadata_without_ground_truth"] == 3


# ---- a UTF-8 BOM is not part of the first column's name ----

def test_bom_in_a_manifest_header_is_stripped(tmp_path: Path) -> None:
    from fairdeploy.data.manifest import read_manifest

    (tmp_path / "a.png").write_bytes(b"")
    good = _write_csv(tmp_path / "m.csv", ["image", "label", "group", "split"], [["a.png", "x", "g", "train"]],
                      bom=True)
    assert good.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_manifest(good).records[0].image == "a.png"
    bad = _write_csv(tmp_path / "b.csv", ["image", "label", "split"], [["a.png", "x", "train"]], bom=True)
    with pytest.raises(FairdeployError) as info:
        read_manifest(bad)
    assert "missing required column(s) group" in str(info.value)
    assert "found: image, label, split" in str(info.value) and "\ufeff" not in str(info.value)


def test_bom_in_a_dataset_table_is_stripped(tmp_path: Path) -> None:
    from fairdeploy.data.adapters import from_csv

    table = _write_csv(tmp_path / "t.csv", ["image", "dx", "skin"], [["a.png", "x", "g"], ["b.png", "y", "h"]],
                       bom=True)
    result = from_csv(table, image_column="image", label_column="dx", group_column="skin")
    assert [r.image for r in result.records] == ["a.png", "b.png"]


# ---- the pipeline TOML: [model] required, a precision as one string, every value's type checked ----

BASE = '[data]\nsynth = { n_images = 60, image_size = 16 }\n[model]\narch = "resnet18"\n'


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_pipeline_without_model_table_is_refused(tmp_path: Path) -> None:
    p = _config(tmp_path, '[data]\nsynth = { n_images = 60 }\n')
    with pytest.raises(FairdeployError, match=r"p.toml: the \[model\] table is missing"):
        load_pipeline_config(p)
    p = _config(tmp_path, '[data]\nsynth = { n_images = 60 }\n[model]\nepochs = 2\n')
    with pytest.raises(FairdeployError, match=r"\[model\] needs exactly one of `arch"):
        load_pipeline_config(p)


def test_precision_may_be_one_string(tmp_path: Path) -> None:
    from fairdeploy.pipeline.resolve import _export_options

    cfg = load_pipeline_config(_config(tmp_path, BASE + '[export.onnx]\nprecision = "int8"\n'))
    assert _export_options(cfg).precisions == ("fp32", "int8")
    cfg = load_pipeline_config(_config(tmp_path, BASE + '[export.onnx]\nprecision = "fp16,int8"\n'))
    assert _export_options(cfg).precisions == ("fp32", "fp16", "int8")
    with pytest.raises(FairdeployError, match=r"p\.toml: \[export\.onnx\] precision: unknown precision '16'"):
        _export_options(load_pipeline_config(_config(tmp_path, BASE + '[export.onnx]\nprecision = 16\n')))


def test_model_table_keys_are_checked_against_what_they_feed(tmp_path: Path) -> None:
    from fairdeploy.pipeline.resolve import resolve_pipeline

    with pytest.raises(FairdeployError, match=r"p\.toml: unknown key 'epoch' in \[model\]; valid keys: arch, image_size, "
                                              r"epochs, batch_size"):
        resolve_pipeline(load_pipeline_config(_config(tmp_path, BASE + "epoch = 3\n")))
    given = '[data]\nsynth = { n_images = 60 }\n[model]\ncheckpoint = "ckpt"\nepochs = 3\n'
    with pytest.raises(FairdeployError, match=r"p\.toml: \[model\] epochs: a given checkpoint is used as it is"):
        resolve_pipeline(load_pipeline_config(_config(tmp_path, given)))


WRONG_TYPES = [
    # (table text, what the one line must say)
    ('seed = "zero"\n' + BASE, r"p.toml: seed must be an integer, got 'zero' \(a string\)"),
    (BASE + 'epochs = "10"\n', r"\[model\] epochs must be an integer, got '10' \(a string\)"),
    (BASE + 'lr = "fast"\n', r"\[model\] lr must be a number, got 'fast' \(a string\)"),
    (BASE + 'image_size = 32.5\n', r"\[model\] image_size must be an integer, got 32.5 \(a number\)"),
    ('threads = "1"\n' + BASE, r"p.toml: threads must be an integer, got '1' \(a string\)"),
    ('threads = 0\n' + BASE, r"p.toml: threads must be >= 1 \(torch CPU threads\), got 0"),
    (BASE + 'amp = "yes"\n', r"\[model\] amp must be true or false, got 'yes' \(a string\)"),
    (BASE + '[validate.latency]\nbatch_sizes = 8\n',
     r"p\.toml: \[validate\.latency\] batch_sizes must be a list of integers, got 8 \(an integer\)"),
    (BASE + '[validate.tolerances]\nmax_eodd_drift = "0.02"\n',
     r"p\.toml: \[validate\.tolerances\] max_eodd_drift must be a number, got '0.02' \(a string\)"),
    (BASE + '[[prune]]\ncriterion = "magnitude"\ntarget_macs = "half"\n',
     r"p\.toml: \[\[prune\]\] magnitude: target_macs must be a number, got 'half' \(a string\)"),
    (BASE + '[[prune]]\ncriterion = "magnitude"\ntarget_macs = 0.5\nrounds = 2.0\n',
     r"p\.toml: \[\[prune\]\] magnitude: rounds must be an integer, got 2.0 \(a number\)"),
    (BASE + '[[prune]]\nmethod = "fairprune"\nfairprune = { ratio = [0.1] }\n',
     r"p\.toml: \[\[prune\]\] fairprune: \[fairprune\] ratio must be a number, got \[0.1\] \(a list\)"),
    (BASE + '[[prune]]\nmethod = "fairprune"\nratio = 0.1\n',
     r"p\.toml: \[\[prune\]\] fairprune: unknown key 'ratio'; valid keys: method, fairprune, snnl, stop, guard"),
    (BASE + '[[prune]]\nmethod = "fairprune"\nfinetune_after = { epochs = "2" }\n',
     r"p\.toml: \[\[prune\]\] fairprune: \[finetune_after\] epochs must be an integer, got '2'"),
    (BASE + '[export.calibration]\nsize = "96"\n',
     r"p\.toml: \[export\.calibration\] size must be an integer, got '96' \(a string\)"),
    (BASE + '[export.tensorrt]\nenabled = "maybe"\n',
     r"p\.toml: \[export\.tensorrt\] enabled must be true or false or 'auto', got 'maybe'"),
    (BASE + '[export]\ntrt = true\n',
     r"p\.toml: unknown key 'trt' in \[export\]; valid keys: description, profile, onnx, calibration, tensorrt"),
    ('[data]\nsynth = { n_images = "many" }\n[model]\narch = "resnet18"\n',
     r"\[data\.synth\] n_images must be an integer, got 'many' \(a string\)"),
]


@pytest.mark.parametrize(("text", "message"), WRONG_TYPES)
def test_pipeline_value_of_the_wrong_type_names_key_table_type_and_value(tmp_path: Path, text: str,
                                                                          message: str) -> None:
    from fairdeploy.pipeline.run import run_pipeline

    with pytest.raises(FairdeployError, match=message):
        run_pipeline(load_pipeline_config(_config(tmp_path, text)), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_pipeline_wrong_type_is_one_line_exit_2_in_a_subprocess(tmp_path: Path) -> None:
    p = _config(tmp_path, BASE + 'epochs = "10"\n')
    proc = subprocess.run([sys.executable, "-m", "fairdeploy", "pipeline", str(p), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {p}: [model] epochs must be an integer, got '10' (a string)"]
    assert not (tmp_path / "run").exists()
