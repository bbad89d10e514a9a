"""The benchmark scripts' bookkeeping: interleaved timing on a fake clock, the curvature loop timed like the fast
path (same samples, same calls) and agreeing with it, tree RSS."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
