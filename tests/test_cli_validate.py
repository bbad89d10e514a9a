"""`fairdeploy validate`: exit 0 when every tolerance holds, 1 naming the failure, 2/3 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairdeploy.cli.app import app
from fairdeploy.data.manifest import read_manifest, write_manifest
from fairdeploy.errors import (
    EXIT_GATE_FAILED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_USER_ERROR,
    FairdeployError,
    MissingDependencyError,
)
from fairdeploy.models import ModelSpec, create_model, read_spec, save_checkpoint

FAST = ["--device", "cpu", "--bootstrap", "0", "--no-latency", "--batch-size", "32"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "fairdeploy", "validate", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.numerics
def test_passing_candidate_exits_0_and_writes_validation_json(
    trained_checkpoint: Path, runtime_fp32_onnx: Path, synth_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "val"
    result = CliRunner().invoke(app, [
        "validate", "-r", str(trained_checkpoint), "-c", str(runtime_fp32_onnx), "-c", str(trained_checkpoint),
        "--data", str(synth_manifest), "--out", str(out), "--device", "cpu", "--bootstrap", "20",
        "--latency-batch", "4", "--latency-iterations", "2", "--latency-warmup", "1", "--min-agreement", "1.0",
    ])
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output
    for row in ("accuracy dark", "accuracy light", "agreement dark", "max |Δlogit|", "p50 ms, batch 4"):
        assert row in result.output
    d = json.loads((out / "validation.json").read_text())
    assert d["passed"] is True and d["failures"] == []
    assert [c["label"] for c in d["candidates"]] == [str(runtime_fp32_onnx), str(trained_checkpoint)]
    assert d["tolerances"]["min_agreement"] == 1.0
    assert [s["batch_size"] for s in d["candidates"][0]["latency"]] == [1, 4]
    assert d["config"]["latency"] == {"batch_sizes": [1, 4], "warmup": 1, "iterations": 2}
    assert [p.name for p in out.iterdir()] == ["validation.json"]  # no temporary file left behind


def test_failing_gate_exits_1_and_names_candidate_metric_group(
    trained_checkpoint: Path, synth_manifest: Path, tmp_path: Path
) -> None:
    spec = read_spec(trained_checkpoint)
    untrained = save_checkpoint(create_model(spec.arch, spec.num_classes),
                                ModelSpec(spec.arch, spec.classes, spec.groups, spec.image_size), tmp_path / "untrained")
    out = tmp_path / "val"
    proc = _cli("-r", str(trained_checkpoint), "-c", str(untrained), "--data", str(synth_manifest),
                "--out", str(out), "--max-accuracy-drop", "0.0", "--max-group-accuracy-drop", "0.0", *FAST)
    assert proc.returncode == EXIT_GATE_FAILED, proc.stdout + proc.stderr
    d = json.loads((out / "validation.json").read_text())
    assert d["passed"] is False and d["failures"]
    failing_groups = {c["group"] for c in d["candidates"][0]["checks"] if not c["passed"]}
    assert failing_groups & {"dark", "light"}  # an untrained model loses accuracy in at least one group
    flat = " ".join(proc.stdout.split())
    for line in d["failures"]:
        assert f"FAIL {line}" in flat
        assert line.startswith(f"{untrained}: ")
    assert any("(group 'dark')" in ln or "(group 'light')" in ln for ln in d["failures"])
    assert "gate failed" in flat


def test_class_mismatch_exits_2_with_one_line_and_no_output(
    trained_checkpoint: Path, synth_manifest: Path, tmp_path: Path
) -> None:
    spec = read_spec(trained_checkpoint)
    other = save_checkpoint(create_model("resnet18", 2), ModelSpec("resnet18", ("benign", "malignant"), spec.groups,
                                                                    image_size=spec.image_size), tmp_path / "two")
    out = tmp_path / "val"
    proc = _cli("-r", str(trained_checkpoint), "-c", str(other), "--data", str(synth_manifest), "--out", str(out), *FAST)
    assert proc.returncode == EXIT_USER_ERROR
    line = _error_line(proc)
    assert "classes benign, malignant do not match the reference's cross, disc, ring" in line
    assert not out.exists()


def test_absent_group_is_a_user_error(trained_checkpoint: Path, synth_manifest: Path, tmp_path: Path) -> None:
    """In process (CliRunner skips main(), so the FairdeployError itself arrives; main() makes it exit 2)."""
    manifest = read_manifest(synth_manifest)
    path = synth_manifest.parent / "cli_no_light_test.csv"
    write_manifest([r for r in manifest.records if not (r.split == "test" and r.group == "light")], path)
    out = tmp_path / "val"
    try:
        result = CliRunner().invoke(app, ["validate", "-r", str(trained_checkpoint), "-c", str(trained_checkpoint),
                                          "--data", str(path), "--out", str(out), *FAST])
    finally:
        path.unlink()
    assert isinstance(result.exception, FairdeployError)
    assert result.exception.exit_code == EXIT_USER_ERROR
    assert str(result.exception) == (f"{path}: split 'test' has no images of group(s) light of the reference model "
                                     "(model groups: dark, light)")
    assert not out.exists()


def test_provider_fallback_is_refused_unless_allowed(
    trained_checkpoint: Path, runtime_fp32_onnx: Path, synth_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "val"
    args = ["validate", "-r", str(trained_checkpoint), "-c", str(runtime_fp32_onnx), "--data", str(synth_manifest),
            "--out", str(out), "--backend", "ort-cuda", *FAST]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, MissingDependencyError)
    assert refused.exception.exit_code == EXIT_MISSING_DEPENDENCY
    msg = str(refused.exception)
    assert "requested providers CUDAExecutionProvider, CPUExecutionProvider" in msg
    assert "runs on CPUExecutionProvider" in msg and "\n" not in msg
    assert not out.exists()
    allowed = CliRunner().invoke(app, [*args, "--allow-fallback"])
    assert allowed.exit_code == 0, allowed.output
    assert "fell back" in allowed.output
    d = json.loads((out / "validation.json").read_text())
    runtime = d["candidates"][0]["runtime"]
    assert runtime["fallback"] is True and runtime["providers_missing"] == ["CUDAExecutionProvider"]
    assert d["config"]["allow_fallback"] is True
    assert d["fingerprint"]["runners"][f"ort-cuda:{runtime_fp32_onnx}"]["fallback"] is True


@pytest.mark.parametrize(("option", "value"), [("--latency-batch", "0"), ("--bootstrap", "-1")])
def test_bad_option_values_are_usage_errors(option: str, value: str, trained_checkpoint: Path,
                                            synth_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "val"
    result = CliRunner().invoke(app, ["validate", "-r", str(trained_checkpoint), "-c", str(trained_checkpoint),
                                      "--data", str(synth_manifest), "--out", str(out), option, value])
    assert result.exit_code == 2
    assert option in result.output
    assert not out.exists()
