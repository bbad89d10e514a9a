"""The benchmark scripts' bookkeeping: interleaved timing on a fake clock, the curvature loop timed like the fast
path (same samples, same calls) and agreeing with it, tree RSS, the tolerance benchmark's paired ratios and target."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_time_interleaved_round_robin_and_medians():
    common = _load("_common")
    log: list[str] = []
    ticks = iter(range(1000))
    # fake clock: each call advances by 1 unit, so every call of `b` (two reads per call) lasts exactly 1
    clock = lambda: float(next(ticks))
    timings = common.time_interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")},
                                      {"a": 4, "b": 8}, repeats=3, warmup=1, clock=clock)
    assert log == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    assert timings["a"].seconds == (1.0, 1.0, 1.0)
    assert timings["b"].per_second == 8.0
    assert timings["a"].per_second == 4.0


def test_curvature_times_the_loop_like_the_fast_path_and_checks_agreement(tmp_path):
    curvature = _load("curvature")
    out = tmp_path / "curv.json"
    curvature.main(["--device", "cpu", "--archs", "resnet18", "--sizes", "16", "--batch-sizes", "2",
                    "--estimators", "fisher", "--optimizers", "sgd", "--repeats", "1", "--warmup", "0",
                    "--loop-samples", "2", "--loop-repeats", "2", "--out", str(out)])
    (case,) = json.loads(out.read_text())["results"]["cases"]
    loop, fast = case["loop_timings"]["fisher"], case["loop_fast_timings"]["fisher"]
    # curv / loop compares like with like: the same samples, the same number of timed calls
    assert loop["items_per_call"] == fast["items_per_call"] == 2
    assert len(loop["seconds"]) == len(fast["seconds"]) == 2
    # the timed fast path computes what the per-sample oracle computes
    assert case["estimators"]["fisher"]["max_rel_diff_vs_loop"] < 1e-3


def test_tree_rss_counts_children():
    pipeline = _load("pipeline")
    own = pipeline.tree_rss_bytes(os.getpid())
    assert own > 10 * 2**20
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; b = bytearray(200 * 2**20); print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        with_child = pipeline.tree_rss_bytes(os.getpid())
        assert with_child - own > 150 * 2**20  # the child's 200 MiB buffer is counted in the tree
        assert pipeline.tree_rss_bytes(child.pid) > 190 * 2**20
    finally:
        child.kill()
        child.wait()


def test_machine_header_records_the_cpu_features(monkeypatch, tmp_path):
    """The benchmark header's CPU comes from the validation fingerprint's /proc/cpuinfo reader (hand-written here)."""
    import torch

    from fairdeploy.validation import fingerprint

    common = _load("_common")
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 fma f16c avx2 sha_ni\n")
    monkeypatch.setattr(fingerprint, "CPUINFO", fake)
    info = common.machine()
    assert info["cpu_model"] == "AMD EPYC 7B12"
    assert {k for k, v in info["cpu_isa"].items() if v} == {"avx2", "fma", "f16c"}
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert common.describe_machine(info).startswith("AMD EPYC 7B12 (ISA avx2 fma f16c), ")
    json.dumps(info)
    monkeypatch.setattr(fingerprint, "CPUINFO", tmp_path / "absent")  # no /proc/cpuinfo: unknown, not "none"
    assert "(ISA unknown)" in common.describe_machine(common.machine())


def test_fair_compression_summary_ratios_and_target_by_hand():
    """The tolerance benchmark's paired table and target line on hand-made rows: 3 seeds where one configuration
    compresses 4x, 2x and 1x as far as the blind search (MACs kept 0.25/0.5/1.0 against 1.0 each) and keeps the
    worst group within 1 point of dense on every seed."""
    fc = _load("fair_compression")
    rows = []
    for seed, (kept, wga) in enumerate([(0.25, 0.80), (0.5, 0.795), (1.0, 0.80)]):
        rows.append({"dataset": "d", "seed": seed, "eps": None, "config": "dense", "macs_fraction": 1.0,
                     "worst_group_accuracy": 0.80, "eodd": 0.1, "f1_macro": 0.9})
        for config, frac, w in ((fc.BLIND, 1.0, 0.80), ("group-taylor+constrained", kept, wga)):
            rows.append({"dataset": "d", "seed": seed, "eps": 0.02, "config": config, "macs_fraction": frac,
                         "worst_group_accuracy": w, "eodd": 0.1, "f1_macro": 0.9})
    summary, paired, targets = fc.summarise(rows, [0.02])
    gt = next(e for e in summary if e["config"] == "group-taylor+constrained")
    assert gt["reduction"]["mean"] == pytest.approx(7 / 3) and gt["seeds"] == 3
    assert gt["wga_minus_dense"]["mean"] == pytest.approx(-0.005 / 3)
    (p,) = paired
    assert p["per_seed_ratio"] == [4.0, 2.0, 1.0]
    assert p["ratio"]["mean"] == pytest.approx(7 / 3)
    # geometric mean of 4, 2, 1 is 2; the log ratios ln 4, ln 2, 0 have sd ln 2, so the interval is
    # 2 * exp(±4.303 * ln 2 / sqrt 3) (t quantile 0.975 with 2 degrees of freedom, to 3 decimals)
    half = 4.303 * math.log(2) / math.sqrt(3)
    assert p["geometric_ratio"]["mean"] == pytest.approx(2.0)
    assert p["geometric_ratio"]["low"] == pytest.approx(2 * math.exp(-half), rel=1e-5)
    assert p["geometric_ratio"]["high"] == pytest.approx(2 * math.exp(half), rel=1e-5)
    assert p["per_seed_delta_wga"] == pytest.approx([0.0, -0.005, 0.0])
    (t,) = targets
    assert [m.split(" ")[0] for m in t["met_by"]] == ["group-taylor+constrained"] and t["shown_by"] == []
    assert "met on the mean by group-taylor+constrained" in t["line"] and "by none" in t["line"]
    # one seed 2 points below dense: not met, whatever the ratio
    rows[-1] = {**rows[-1], "worst_group_accuracy": 0.78}
    assert fc.summarise(rows, [0.02])[2][0]["met_by"] == []
