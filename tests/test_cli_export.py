"""`fairdeploy export`: a real run with a profile and overriding flags, and bad input: one clear line on
stderr, a non-zero exit, no traceback, and no ONNX or engine left behind."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairdeploy.cli.app import app
from fairdeploy.models import ModelSpec, create_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained MobileNetV3-small with the synthetic data's classes and groups (fast to export)."""
    spec = ModelSpec(arch="mobilenet_v3_small", classes=("cross", "disc", "ring"), groups=("dark", "light"),
                     image_size=32)
    return save_checkpoint(create_model("mobilenet_v3_small", 3), spec, tmp_path_factory.mktemp("ckpt") / "best")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fairdeploy", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, check=False)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """fairdeploy.cli.main in this process (its error handling included, unlike CliRunner)."""
    from fairdeploy.cli import main

    monkeypatch.setattr(sys, "argv", ["fairdeploy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code), capsys.readouterr().err


def assert_one_clear_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def no_artifacts(out: Path) -> bool:
    return not out.exists() or not [p for p in out.iterdir() if p.suffix in (".onnx", ".engine", ".json")]


def test_export_with_profile_and_overriding_flags(small_ckpt: Path, synth_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # an earlier export's folder (export.json is its record: a folder without one is refused, see test_out_policy)
    for stale in ("model.int8.onnx", "model.fp16.engine", "model.fp16.engine.json", "calibration.json", "export.json"):
        (out / stale).write_text("from an earlier export")
    result = CliRunner().invoke(app, [
        "export", "--model", str(small_ckpt), "--out", str(out), "--profile", "jetson-orin-nano-fp16",
        "--profiles-dir", str(REPO / "export"), "--no-trt", "--max-batch", "1", "--opset", "18",
        "--data", str(synth_manifest),
    ])
    assert result.exit_code == 0, result.output
    assert "model.fp16.onnx" in result.output and f"wrote {out}" in result.output
    summary = json.loads((out / "export.json").read_text())
    assert summary["options"]["precisions"] == ["fp32", "fp16"]  # from the profile
    assert summary["options"]["onnx"]["opset"] == 18 and summary["options"]["tensorrt"]["enabled"] is False  # flags win
    assert summary["options"]["profile"].endswith("jetson-orin-nano-fp16.toml")
    assert summary["check_data"]["n"] == 97 and summary["onnx"]["fp32"]["self_check"]["max_abs_logit_diff"] < 1e-4
    assert summary["check_data"]["source"].endswith(":val")  # 97 val images: the self-check's default split
    # Only this export's files: the earlier int8 ONNX, engine and calibration list were removed.
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.fp16.onnx", "model.fp32.onnx"]


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: --trt would build engines")
def test_trt_without_tensorrt_writes_onnx_then_exits_3(small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("export", "--model", str(small_ckpt), "--out", str(out), "--trt")
    assert proc.returncode == 3
    assert_one_clear_line(proc.stderr, "no engine built", "pip install 'fairdeploy[trt]'")
    assert (out / "model.fp32.onnx").is_file() and (out / "export.json").is_file()
    assert not list(out.glob("*.engine*")) and not list(out.glob(".*"))


def test_checkpoint_that_fails_to_load(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((small_ckpt / "model.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(broken), "--out", str(out))
    assert code == 2
    assert_one_clear_line(err, "model.safetensors", "not a readable safetensors file")
    assert not out.exists()
    (broken / "model.json").write_text("{ not json")
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(broken), "--out", str(out))
    assert code == 2
    assert_one_clear_line(err, "model.json: not valid JSON")
    assert not out.exists()


def test_unknown_profile(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out),
                         "--profile", "jetson-xavier", "--profiles-dir", str(REPO / "export"))
    assert code == 2
    assert_one_clear_line(err, "unknown profile 'jetson-xavier'", "jetson-orin-nano-fp16", "workstation-int8")
    assert not out.exists()


def test_unsupported_opset(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out),
                         "--opset", "11")
    assert code == 2
    assert_one_clear_line(err, "unsupported opset 11; choose 17..20")
    assert not out.exists()


def test_unwritable_output_directory(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(blocker / "out"))
    assert code == 2
    assert_one_clear_line(err, "cannot create output directory", str(blocker / "out"))
    assert blocker.read_text() == "not a directory"


def test_calibration_manifest_with_too_few_images_of_a_group(small_ckpt: Path, synth_manifest: Path,
                                                             tmp_path: Path, monkeypatch, capsys) -> None:
    rows = list(csv.DictReader(synth_manifest.open()))
    kept, dark_train = [], Counter()
    for row in rows:  # keep only 2 dark training images per class
        if row["split"] == "train" and row["group"] == "dark":
            if dark_train[row["label"]] == 2:
                continue
            dark_train[row["label"]] += 1
        kept.append(row)
    calib = synth_manifest.parent / "calib_few_dark.csv"
    with calib.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    out = tmp_path / "out"
    try:
        code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out),
                             "-p", "fp16,int8", "--calib-data", str(calib), "--calib-size", "48")
    finally:
        calib.unlink()
    assert code == 2 and sum(dark_train.values()) == 6
    assert_one_clear_line(err, "too few train images of group 'dark'", "2, need 8", "--calib-size 12 or less")
    assert not out.exists()


def test_bad_precision_and_calibration_method(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out), "-p", "int4")
    assert code == 2
    assert_one_clear_line(err, "unknown precision 'int4'; choose one of fp32, fp16, int8")
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out),
                         "-p", "int8", "--calib-method", "kl")
    assert code == 2
    assert_one_clear_line(err, "--calib-method: method 'kl' is not one of minmax, entropy, percentile")
    code, err = run_main(monkeypatch, capsys, "export", "--model", str(small_ckpt), "--out", str(out), "-p", "int8")
    assert code == 2
    assert_one_clear_line(err, "--precision int8 needs a calibration manifest")
    assert no_artifacts(out)
