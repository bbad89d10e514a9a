"""scripts/device-check.sh (issue 11 item 13): without CUDA it writes the JSON summary with the reason at once;
each part is time-boxed and a part that runs out of time is recorded, not fatal; the parts' own code runs here on
the CPU (a plumbing check: the GPU numbers need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device-check.sh"
sys.path.insert(0, str(REPO / "scripts"))

import device_check


def run_script(out: Path, *args: str, cuda_visible: str | None = "") -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("FAIRDEPLOY_WHEELHOUSE", None)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=180,
                          check=False)
    summary = out / "device-check.json"
    assert summary.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(summary.read_text())


def test_no_cuda_writes_the_reason_at_once(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc, summary = run_script(tmp_path / "out")  # CUDA_VISIBLE_DEVICES="" hides any GPU, so also true on one
    assert time.perf_counter() - start < 60
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(f"summary {tmp_path / 'out' / 'device-check.json'}")
    assert summary["status"] == "no-cuda"
    reason = "torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES='')"
    assert summary["cuda"]["available"] is False and summary["cuda"]["reason"].startswith(reason)
    assert set(summary["parts"]) == {"tests", "curvature", "steps", "ort_cuda", "tensorrt"}
    assert all(p == {"status": "skipped", "reason": f"no CUDA device: {summary['cuda']['reason']}"}
               for p in summary["parts"].values())
    probe = summary["probe"]
    assert probe["status"] == "ok" and probe["torch"] == torch.__version__ and probe["devices"] == []
    assert probe["onnxruntime"] == {"version": ort.__version__, "providers": ort.get_available_providers()}
    assert probe["missing"] == []  # this venv has every requirement and pytest
    assert summary["python_executable"] == sys.executable
    assert (tmp_path / "out" / "logs" / "probe.log").is_file()


def test_a_part_past_its_time_box_is_recorded_and_the_rest_skipped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # --allow-cpu runs the parts without CUDA. The steps part (1200 synthetic images at 224 px to write, then
    # minutes of training on a CPU) gets what the probe leaves of the 8 s budget as its box and is stopped by
    # `timeout`; then nothing is left for the tests part. A part needs MIN_BOX_S (15 s) of box to start, which
    # would make the budget >= 15 s and the test as long: here it is 1 s, so the probe may take up to 7 s.
    monkeypatch.setattr(device_check, "MIN_BOX_S", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    code = device_check.main(["--out-dir", str(out), "--allow-cpu", "--device", "cpu", "--parts", "steps", "tests",
                              "--budget-s", "8", "--workers", "0"])
    summary = json.loads((out / "device-check.json").read_text())
    assert code == 1, summary
    steps = summary["parts"]["steps"]
    assert steps["status"] == "timeout" and steps["exit_code"] == 124, steps
    assert steps["reason"] == f"steps ran past its time box of {steps['time_box_s']} s" 
    assert steps["time_box_s"] <= 8 < device_check.TIME_BOX_S["steps"]  # cut to what was left of the budget
    assert "result" not in steps and Path(steps["log"]).is_file()
    assert summary["parts"]["tests"] == {"status": "skipped", "reason": "no time left of the 8.0 s budget"}
    assert summary["status"] == "failed: steps" and summary["seconds"] < 30


def test_steps_part_measures_train_and_distillation_fits_on_the_cpu(tmp_path: Path) -> None:
    result = tmp_path / "steps.json"
    assert device_check.main(["--part", "steps", "--result", str(result), "--device", "cpu", "--image-size", "32",
                              "--n-images", "120", "--epochs", "2", "--batch", "16", "--workers", "0"]) == 0
    steps = json.loads(result.read_text())
    assert steps["device"] == "cpu" and steps["image_size"] == 32 and steps["epochs"] == 2
    for name in ("train", "finetune_distill"):
        rates = steps[name]["samples_per_s"]
        assert len(rates) == 2 and all(r > 0 for r in rates), steps
        assert steps[name]["amp"] is False  # AMP only on CUDA
        # an epoch's rate is its training images over a time shorter than the whole fit
        assert min(rates) >= steps["train_images"] / steps[name]["seconds"] - 1e-6, steps


def test_ort_part_times_the_same_model_through_two_runners(tmp_path: Path) -> None:
    result = tmp_path / "ort.json"
    assert device_check.main(["--part", "ort_cuda", "--result", str(result), "--device", "cpu", "--image-size",
                              "32", "--ort-backend", "onnxruntime", "--latency-batches", "1", "3"]) == 0
    rows = json.loads(result.read_text())["latency"]
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("onnxruntime", 1), ("onnxruntime", 3),
                                                               ("torch", 1), ("torch", 3)]
    assert all(r["iterations"] == 20 and r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] for r in rows)


def test_junit_summary_counts_and_names_failures(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok1"/><testcase classname="tests.a" name="ok2"/>'
        '<testcase classname="tests.b" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.c" name="gpu"><skipped message="needs a CUDA device"/></testcase>'
        '</testsuite></testsuites>')
    s = device_check.junit_summary(xml)
    assert (s["tests"], s["passed"], s["failures"], s["errors"], s["skipped"]) == (4, 2, 1, 0, 1)
    assert s["failed"] == [{"test": "tests.b::bad", "message": "assert 1 == 2"}]
    assert s["skipped_tests"] == [{"test": "tests.c::gpu", "reason": "needs a CUDA device"}]
