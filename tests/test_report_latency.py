"""An artifact slower than the FP32 artifact on the runtime it was timed on (issue 19 §1): `validate` records it
and warns, the report says so wherever it names the artifact and does not prefer it on a tie. Latencies are
constructed by hand (fake LatencyStats, or measure_latency replaced by a script keyed on the artifact's precision),
so the verdicts do not depend on this machine's speed; a faster artifact is the control (no warning)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fairdeploy.metrics import compute_metrics
from fairdeploy.report import StageRecord, build_report, load_stages, summary
from fairdeploy.report.stages import RunStages
from fairdeploy.speed import BatchSpeed, SpeedVsFp32, TimedArtifact, runtime_name, speed_vs_fp32
from fairdeploy.validation.latency import LatencyStats

CPU = {"backend": "onnxruntime", "device": "cpu", "providers_active": ["CPUExecutionProvider"]}
CPU_NAME = "onnxruntime on cpu (CPUExecutionProvider)"


def _lat(batch: int, p50: float, p95: float | None = None) -> LatencyStats:
    p95 = p50 * 1.1 if p95 is None else p95
    return LatencyStats(batch, 1, 10, p50, p95, p50, p50 * 0.9, batch * 1000 / p50)


def _timed(label: str, precision: str, p50s: dict[int, float], runtime: dict | None = None,
           source: str | None = "a" * 64) -> TimedArtifact:
    return TimedArtifact(label, precision, runtime_name(runtime or CPU), source,
                         tuple(_lat(b, ms) for b, ms in p50s.items()))


# ---- the comparison ----

def test_slower_and_faster_artifacts_against_fp32_on_the_same_runtime() -> None:
    speeds = speed_vs_fp32([
        _timed("reference", "fp32", {1: 9.0, 8: 30.0}, {"backend": "torch", "device": "cpu", "threads": 2}),
        _timed("model.fp32.onnx", "fp32", {1: 2.51, 8: 8.63}),
        _timed("model.int8.onnx", "int8", {1: 5.88, 8: 18.94}),  # the numbers
        _timed("fast.int8.onnx", "int8", {1: 1.56, 8: 5.38}),
    ])
    assert set(speeds) == {"model.int8.onnx", "fast.int8.onnx"}  # fp32 artifacts are not compared
    slow, fast = speeds["model.int8.onnx"], speeds["fast.int8.onnx"]
    assert slow.fp32 == fast.fp32 == "model.fp32.onnx" and slow.runtime == CPU_NAME  # not the torch reference
    assert slow.slower and not fast.slower
    assert [round(b.speed, 2) for b in slow.batches] == [round(2.51 / 5.88, 2), round(8.63 / 18.94, 2)] == [0.43, 0.46]
    assert slow.describe() == (f"slower than model.fp32.onnx on {CPU_NAME}: 0.43x its speed at batch 1 (5.88 vs 2.51 "
                               "ms median), 0.46x its speed at batch 8 (18.94 vs 8.63 ms median)")
    assert fast.describe().startswith("not slower than model.fp32.onnx")
    assert SpeedVsFp32.from_dict(json.loads(json.dumps(slow.to_dict()))) == slow


def test_slower_means_beyond_fp32s_own_spread() -> None:
    """Slower = its median above the FP32 artifact's p95: equal to it is not slower, just above is."""
    assert not BatchSpeed(1, 2.2, 2.0, 2.2).slower
    assert BatchSpeed(1, 2.2001, 2.0, 2.2).slower
    assert not BatchSpeed(1, 2.1, 2.0, 2.5).slower  # 5 % slower, inside FP32's own call-to-call spread
    # slower at one batch size is slower; the description names only that batch size
    mixed = SpeedVsFp32("f", "r", (BatchSpeed(1, 1.0, 2.0, 2.2), BatchSpeed(8, 9.0, 8.0, 8.5)))
    assert mixed.slower and mixed.describe() == "slower than f on r: 0.89x its speed at batch 8 (9.00 vs 8.00 ms median)"


def test_only_the_same_runtime_and_preferably_the_same_model_count() -> None:
    cuda = {"backend": "ort-cuda", "device": "cuda:0", "providers_active": ["CUDAExecutionProvider"]}
    speeds = speed_vs_fp32([
        _timed("other-model.fp32.onnx", "fp32", {1: 1.0}, source="b" * 64),
        _timed("gpu.fp32.onnx", "fp32", {1: 0.1}, cuda),
        _timed("model.fp32.onnx", "fp32", {1: 3.0}),
        _timed("model.int8.onnx", "int8", {1: 2.0}),
        _timed("lonely.fp16.onnx", "fp16", {1: 2.0}, {"backend": "tensorrt", "device": "cuda:0"}),
        _timed("untimed.int8.onnx", "int8", {}),
    ])
    assert speeds["model.int8.onnx"].fp32 == "model.fp32.onnx"  # the same model, though listed after another
    assert not speeds["model.int8.onnx"].slower
    assert "lonely.fp16.onnx" not in speeds and "untimed.int8.onnx" not in speeds  # no FP32 peer / no timing
    only_other = speed_vs_fp32([_timed("x.fp32.onnx", "fp32", {1: 1.0}, source="b" * 64),
                                _timed("y.int8.onnx", "int8", {1: 2.0})])
    assert only_other["y.int8.onnx"].fp32 == "x.fp32.onnx" and only_other["y.int8.onnx"].slower
    batches = speed_vs_fp32([_timed("f", "fp32", {1: 1.0}), _timed("q", "int8", {1: 2.0, 8: 9.0})])["q"].batches
    assert [b.batch_size for b in batches] == [1]  # only batch sizes both were timed at


# ---- validate: recorded, warned, printed ----

def _script_latency(monkeypatch: pytest.MonkeyPatch, int8_ms: float) -> None:
    """measure_latency replaced: FP32 artifacts 2.0 ms (p95 2.2) per call at every batch size, INT8 `int8_ms`."""
    def fake(runner, images, config):
        ms = int8_ms if runner.info.precision == "int8" else 2.0
        return tuple(_lat(b, ms * b, ms * b * 1.1) for b in config.batch_sizes)

    import sys

    import fairdeploy.validation  # noqa: F401  (the package re-exports the function validate under the same name)

    monkeypatch.setattr(sys.modules["fairdeploy.validation.validate"], "measure_latency", fake)


@pytest.mark.parametrize("int8_ms", [5.0, 1.0])
def test_validate_warns_when_int8_is_slower_than_fp32(run_main, monkeypatch, trained_checkpoint: Path,
                                                      synth_manifest: Path, cpu_int8_export: Path, tmp_path: Path,
                                                      int8_ms: float) -> None:
    _script_latency(monkeypatch, int8_ms)
    fp32, int8 = cpu_int8_export / "model.fp32.onnx", cpu_int8_export / "model.int8.onnx"
    out = tmp_path / "val"
    code, stdout, err = run_main("validate", "--reference", str(trained_checkpoint), "--candidate", str(fp32),
                                 "--candidate", str(int8), "--data", str(synth_manifest), "--out", str(out),
                                 "--bootstrap", "0", "--latency-iterations", "1", "--latency-warmup", "0",
                                 "--max-accuracy-drop", "1", "--max-group-accuracy-drop", "1", "--max-eodd-drift", "1")
    assert code == 0, err
    record = json.loads((out / "validation.json").read_text())
    cand = {c["label"]: c for c in record["candidates"]}
    vs = cand[str(int8)]["latency_vs_fp32"]
    assert cand[str(fp32)]["latency_vs_fp32"] is None  # the FP32 artifact is the yardstick
    assert vs["fp32"] == str(fp32) and vs["runtime"].startswith("onnxruntime on cpu")
    assert [b["batch_size"] for b in vs["batches"]] == [1, 8]
    assert all(b["speed"] == pytest.approx(2.0 / int8_ms) for b in vs["batches"])
    text = " ".join(stdout.split())
    if int8_ms > 2.0:
        assert vs["slower"] and len(record["warnings"]) == 1
        assert record["warnings"][0].startswith(f"{int8}: slower than {fp32} on onnxruntime on cpu")
        assert "slower" in text and "0.40x its speed at batch 1" in text and "gate passed" in text  # never gated
    else:
        assert not vs["slower"] and record["warnings"] == []
        assert "slower than" not in text

    # the report from that validation: the answer says it wherever it names the INT8 file
    answer = " ".join(summary.headline(load_stages(out)))
    assert ("slower than model.fp32.onnx on onnxruntime on cpu" in answer) == (int8_ms > 2.0)
    md = build_report(out).markdown.read_text()
    assert ("0.40x its speed at batch 1" in md) == (int8_ms > 2.0)


# ---- the report's answer ----

def _stage(name: str, precision: str, size: int, p50: float, vs: SpeedVsFp32 | None, correct: np.ndarray,
           y: np.ndarray, g: np.ndarray) -> StageRecord:
    pred = np.where(correct, y, (y + 1) % 3)
    return StageRecord(name=name, kind="onnx", precision=precision, size_bytes=size,
                       metrics=compute_metrics(y, pred, g, 3, ("a", "b", "c")).to_dict(),
                       latency={"batch1_p50_ms": p50}, reference="reference", gate_passed=True,
                       latency_vs_fp32=None if vs is None else vs.to_dict())


@pytest.fixture()
def tied_run() -> tuple[RunStages, StageRecord, StageRecord]:
    """An FP32 and an INT8 artifact with the same predictions (the same worst group), INT8 4x smaller but slower
    on the CPU; a reference checkpoint before them."""
    rng = np.random.default_rng(0)
    y, g = rng.integers(0, 3, 120), rng.choice(["dark", "light"], 120)
    correct = rng.random(120) < 0.8
    ref = replace(_stage("reference", "fp32", 45_000_000, 9.0, None, correct, y, g), reference=None, gate_passed=None)
    slow = SpeedVsFp32("model.fp32.onnx", CPU_NAME, (BatchSpeed(1, 5.88, 2.51, 2.7), BatchSpeed(8, 18.94, 8.63, 9.1)))
    fp32 = _stage("model.fp32.onnx", "fp32", 44_700_000, 2.51, None, correct, y, g)
    int8 = _stage("model.int8.onnx", "int8", 11_300_000, 5.88, slow, correct, y, g)
    return RunStages((ref, fp32, int8)), fp32, int8


def test_a_slower_int8_is_named_with_its_slowness_and_loses_the_tie(tied_run) -> None:
    run, fp32, _ = tied_run
    assert summary.best_passing(run) is fp32  # same worst group: the one not slower than FP32 wins the tie
    lines = summary.headline(run)
    assert lines[0] == ("2 of 2 artifacts pass every gate. Of these, model.fp32.onnx does best on its worst group "
                        "(tied with 1 other; the smallest file of them not slower than FP32 on its runtime): "
                        "44.70 MB file, 2.51 ms median latency at batch 1.")
    smallest = next(ln for ln in lines if ln.startswith("Smallest file that passes"))
    assert smallest.startswith("Smallest file that passes: model.int8.onnx (11.30 MB file, 5.88 ms median latency at "
                               f"batch 1; slower than model.fp32.onnx on {CPU_NAME}: 0.43x its speed at batch 1 "
                               "(5.88 vs 2.51 ms median), 0.46x its speed at batch 8 (18.94 vs 8.63 ms median); "
                               "worst group")


def test_a_faster_int8_wins_the_tie_by_size_with_no_word_on_speed(tied_run) -> None:
    run, fp32, int8 = tied_run
    fast = SpeedVsFp32("model.fp32.onnx", CPU_NAME, (BatchSpeed(1, 1.56, 2.51, 2.7),))
    run = RunStages((run.stages[0], fp32, replace(int8, latency_vs_fp32=fast.to_dict(), latency={"batch1_p50_ms": 1.56})))
    assert summary.best_passing(run).name == "model.int8.onnx"
    lines = summary.headline(run)
    assert "(tied with 1 other; the smallest file of them): 11.30 MB file, 1.56 ms median latency at batch 1." in lines[0]
    assert not any("slower" in ln for ln in lines)


def test_a_slower_artifact_named_only_in_also_passing_gets_its_own_line(tied_run) -> None:
    run, _, int8 = tied_run
    fp16 = replace(int8, name="model.fp16.onnx", precision="fp16", size_bytes=22_400_000, latency_vs_fp32=SpeedVsFp32(
        "model.fp32.onnx", CPU_NAME, (BatchSpeed(1, 3.1, 2.51, 2.7),)).to_dict(), latency={"batch1_p50_ms": 3.1})
    lines = summary.headline(RunStages((*run.stages, fp16)))
    assert "Also passing: model.fp16.onnx." in lines
    assert lines[-1] == (f"Slower than FP32 on the runtime it was timed on: model.fp16.onnx, slower than model.fp32.onnx "
                         f"on {CPU_NAME}: 0.81x its speed at batch 1 (3.10 vs 2.51 ms median).")


def test_stages_json_keeps_the_comparison(tied_run, tmp_path: Path) -> None:
    from fairdeploy.report import write_stages

    run, _, int8 = tied_run
    write_stages(tmp_path / "stages.json", run)
    back = load_stages(tmp_path)
    assert back.stages[2].latency_vs_fp32 == int8.latency_vs_fp32 and summary.slower_than_fp32(back.stages[2])
