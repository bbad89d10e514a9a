"""TensorRT 10.x / 11.x: the pure build decisions with injected version strings, and the builder's
plumbing against a *recording fake* `tensorrt` module. The fake checks which API calls are made for
each version; it builds no engine, so nothing here claims one was built. The real build test is
marked `tensorrt` and skipped where TensorRT is not installed."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import ENGINE_MAGIC, dla_exists, engine_bytes, fake_tensorrt, names, timing_cache_blob

from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.export import tensorrt_build as tb
from fairdeploy.export.profiles import TrtOptions

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------- pure decisions


def test_versions_before_10_3_or_unparseable_are_refused() -> None:
    with pytest.raises(FairdeployError, match=r"TensorRT 10\.2\.0 is too old; fairdeploy needs 10\.3 or newer"):
        tb.trt_api("10.2.0")
    with pytest.raises(FairdeployError, match="too old"):
        tb.trt_api("8.6.1")
    with pytest.raises(FairdeployError, match="unparseable TensorRT version 'banana'"):
        tb.trt_api("banana")
    ten, eleven = tb.trt_api("10.3.0.30"), tb.trt_api("11.0.0")
    assert (ten.precision_flags, ten.implicit_calibrator, ten.always_strongly_typed) == (True, True, False)
    assert (eleven.precision_flags, eleven.implicit_calibrator, eleven.always_strongly_typed) == (False, False, True)
    assert not eleven.explicit_batch_flag


@pytest.mark.parametrize("version", ["10.3.0", "10.13.2", "11.0.0", "11.4.1"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_explicit_precision_plans(version: str, precision: str) -> None:
    plan = tb.plan_build(version, precision, TrtOptions(min_batch=1, opt_batch=4, max_batch=16, workspace_mib=256), 224)
    assert "EXPLICIT_BATCH" not in plan.network_flags  # ignored since 10.0, gone in 11.0
    assert plan.network_flags == (("STRONGLY_TYPED",) if version.startswith("10.") else ())  # 11.x: always typed
    assert plan.builder_flags == ()  # no FP16/INT8 flags: the precision is in the ONNX graph
    assert plan.onnx_precision == precision and not plan.implicit_calibrator
    assert plan.quantization == ("qdq" if precision == "int8" else None)
    assert (plan.min_shape, plan.opt_shape, plan.max_shape) == ((1, 3, 224, 224), (4, 3, 224, 224), (16, 3, 224, 224))
    assert plan.workspace_bytes == 256 * 2**20


def test_implicit_calibrator_only_on_10x() -> None:
    plan = tb.plan_build("10.8.0", "int8", TrtOptions(implicit_int8=True), 32)
    assert plan.implicit_calibrator and plan.builder_flags == ("INT8",) and plan.network_flags == ()
    assert plan.onnx_precision == "fp32" and plan.quantization == "implicit-calibrator"
    # Asked for, but not the int8 engine: the fp16 engine is unaffected.
    assert not tb.plan_build("10.8.0", "fp16", TrtOptions(implicit_int8=True), 32).implicit_calibrator
    with pytest.raises(FairdeployError, match=r"TensorRT 11\.1\.0 has no implicit INT8 calibrator \(removed in 11\.0\); "
                                              r"drop --trt-implicit-int8"):
        tb.plan_build("11.1.0", "int8", TrtOptions(implicit_int8=True), 32)


def test_dla_sparsity_and_cache_settings() -> None:
    dla = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=1, sparse_weights=True, timing_cache=None)
    plan = tb.plan_build("10.3.0", "fp16", dla, 224)
    assert plan.builder_flags == ("SPARSE_WEIGHTS", "GPU_FALLBACK") and plan.dla_core == 1 and plan.timing_cache is None
    no_fallback = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0, gpu_fallback=False)
    # 11.4.1 on Linux (JetPack >= 7.2.2): DLA is back, strongly typed, INT8 from the Q/DQ model.
    eleven = tb.plan_build("11.4.1", "int8", no_fallback, 224, platform="linux")
    assert eleven.builder_flags == () and eleven.quantization == "qdq" and eleven.onnx_precision == "int8"
    with pytest.raises(FairdeployError, match="DLA runs only FP16 and INT8 layers"):
        tb.plan_build("10.3.0", "fp32", no_fallback, 224)
    with pytest.raises(FairdeployError, match="DLA needs a static batch"):
        tb.plan_build("10.3.0", "fp16", TrtOptions(dla_core=0, max_batch=8), 224)


def test_int8_on_dla_with_10x_is_the_implicit_int8_fp16_path() -> None:
    """Item 1: DLA does not run explicit Q/DQ on 10.x; the entropy calibrator on the fp32 ONNX, weakly typed,
    INT8 and FP16 flags. The jetson-agx-orin-int8-dla profile plans exactly that and says so."""
    from fairdeploy.export.profiles import resolve_options

    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0)
    plan = tb.plan_build("10.3.0.30", "int8", opts, 224)
    assert plan.implicit_calibrator and plan.network_flags == ()  # weakly typed
    assert plan.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    assert plan.onnx_precision == "fp32" and plan.quantization == "implicit-calibrator"
    # The same core with fp16 stays strongly typed from the fp16 ONNX; on the GPU int8 stays Q/DQ.
    assert not tb.plan_build("10.3.0", "fp16", opts, 224).implicit_calibrator
    assert tb.plan_build("10.3.0", "int8", TrtOptions(), 224).quantization == "qdq"
    repo = Path(__file__).resolve().parents[1]
    profile = resolve_options("jetson-agx-orin-int8-dla", {}, [repo / "export"])
    assert profile.engine_precisions == ("int8",) and profile.tensorrt.dla_core == 0
    dla_plan = tb.plan_build("10.3.0", "int8", profile.tensorrt, 224)
    assert dla_plan.quantization == "implicit-calibrator" and {"INT8", "FP16"} <= set(dla_plan.builder_flags)
    text = (repo / "export" / "jetson-agx-orin-int8-dla.toml").read_text()
    assert "IInt8EntropyCalibrator2" in text and "Q/DQ engine on DLA" not in text
    assert "INT8 *and* FP16" in text and "11.0-11.3 has no DLA" in text


DLA_VERSIONS = ("10.3.0", "10.7.0", "10.8.0", "10.13.2", "10.16.0", "11.0.0", "11.3.1", "11.4.0", "11.4.1",
                "11.4.2", "11.5.0", "11.5.1")


@pytest.mark.parametrize("platform", ["linux", "win32"])
@pytest.mark.parametrize("version", DLA_VERSIONS)
def test_dla_table_agrees_with_nvidias_statement(version: str, platform: str) -> None:
    """Issue 19 §2: DLA by release as NVIDIA's 'Working with DLA' states it (the fake's own statement of it:
    10.0-10.7 Jetson, none in 10.8+ or 11.0-11.3, 11.4.0 Windows on ARM, 11.4.1 Orin + Windows on ARM, 11.5
    Windows on ARM). Where there is none, plan_build refuses in one line naming the row of fairdeploy's table."""
    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0)
    if dla_exists(version, platform):
        tb.plan_build(version, "fp16", opts, 224, platform=platform)
        return
    with pytest.raises(FairdeployError, match=rf"--dla-core 0: TensorRT {version} has no DLA on {platform} "
                                              r"\(DLA table row [^:]+: .+\)") as e:
        tb.plan_build(version, "fp16", opts, 224, platform=platform)
    row = tb.dla_row(*tb.version_parts(version))
    assert row is not None and f"row {row.releases}: {row.says}" in str(e.value)
    assert "\n" not in str(e.value) and "--dla-core -1" in str(e.value)
    tb.plan_build(version, "fp16", TrtOptions(), 224, platform=platform)  # the GPU is fine


def test_dla_after_the_table_is_left_to_the_machine(tmp_path: Path) -> None:
    """A release newer than the table: planned with a note saying so; the machine's num_DLA_cores (0 in the fake,
    which knows no DLA there either) then refuses before the build."""
    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0, timing_cache=None)
    plan = tb.plan_build("11.6.0", "fp16", opts, 224, platform="linux")
    assert any("newer than fairdeploy's DLA table" in n for n in plan.notes)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    trt = fake_tensorrt("11.6.0", dla_cores=2)
    with pytest.raises(FairdeployError, match="--dla-core 0: this machine has no DLA"):
        tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", plan, trt)
    assert "build_serialized_network" not in names(trt.calls)


@pytest.mark.parametrize("cores,core", [(0, 0), (1, 1), (2, 2)])
def test_dla_core_the_machine_lacks_is_refused(cores: int, core: int, tmp_path: Path) -> None:
    """Item 2: builder.num_DLA_cores <= dla_core (an ordinary GPU has 0) -> one-line error, nothing written."""
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    plan = tb.plan_build("10.3.0", "fp16", TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=core), 32)
    trt = fake_tensorrt("10.3.0", dla_cores=cores)
    with pytest.raises(FairdeployError, match=rf"--dla-core {core}: this machine has (no DLA|{cores} DLA core)") as e:
        tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", plan, trt)
    assert "\n" not in str(e.value) and "build_serialized_network" not in names(trt.calls)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # The 11.0-11.3 fake reports no DLA cores at all, whatever the hardware.
    assert fake_tensorrt("11.2.0", dla_cores=2).Builder(None).num_DLA_cores == 0


def test_module_imports_without_tensorrt_and_says_how_to_install() -> None:
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    assert "tensorrt" not in sys.modules  # importing fairdeploy.export.tensorrt_build did not import it
    with pytest.raises(MissingDependencyError, match=r"pip install 'fairdeploy\[trt\]'") as e:
        tb.import_tensorrt()
    assert e.value.exit_code == 3 and "\n" not in str(e.value)


# ---------------------------------------------------------------- the builder's plumbing (fake module)


@pytest.mark.parametrize("version", ["10.3.0.30", "11.0.0"])
def test_builder_plumbing_per_version(version: str, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.int8.onnx"
    onnx_path.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, workspace_mib=64, optimization_level=4,
                      sparse_weights=True)
    plan = tb.plan_build(version, "int8", opts, 32)
    seen: list[tuple[str, int, int]] = []
    trt = fake_tensorrt(version)
    built = tb.build_engine(onnx_path, tmp_path / "model.int8.engine", plan, trt,
                            progress=lambda t, c, n: seen.append((t, c, n)), timing_cache_path=cache)
    calls = trt.calls
    assert ("create_network", 1 << 1 if version.startswith("10.") else 0) in calls  # STRONGLY_TYPED only on 10.x
    assert ("config.set_memory_pool_limit", "pool:workspace", 64 * 2**20) in calls
    assert ("config.builder_optimization_level", 4) in calls
    assert [c for c in calls if c[0] == "config.set_flag"] == [("config.set_flag", "flag:SPARSE_WEIGHTS")]
    assert ("config.clear_flag", "flag:TF32") in calls and "flag:TF32" not in trt.built[0]["flags"]
    assert plan.cleared_builder_flags == ("TF32",)
    assert ("profile.set_shape", "input", (1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32)) in calls
    assert "config.default_device_type" not in names(calls) and "config.DLA_core" not in names(calls)
    assert ("config.create_timing_cache", b"") in calls and ("config.set_timing_cache", False, True) in calls
    assert "config.int8_calibrator" not in names(calls)
    assert seen[0] == ("TensorRT Building engine", 0, 3) and seen[-1] == ("TensorRT Building engine", 3, 3)
    assert built.path.read_bytes() == ENGINE_MAGIC and cache.read_bytes() == timing_cache_blob(version, entries=b"+")
    # A second build reuses the saved timing cache.
    trt2 = fake_tensorrt(version)
    tb.build_engine(onnx_path, tmp_path / "model.int8.engine", plan, trt2, timing_cache_path=cache)
    assert ("config.create_timing_cache", timing_cache_blob(version, entries=b"+")) in trt2.calls
    assert [c for c in trt2.calls if c[0] == "config.set_timing_cache"] == [("config.set_timing_cache", False, True)]
    assert cache.read_bytes() == timing_cache_blob(version, entries=b"++")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.engine", "model.int8.onnx", "timing.cache"]


@pytest.mark.parametrize("stale", [timing_cache_blob("10.8.0"), timing_cache_blob("10.3.0", gpu="Other GPU"),
                                   b"garbage, not a timing cache"])
def test_timing_cache_from_another_version_or_gpu_falls_back_to_a_fresh_one(stale: bytes, tmp_path: Path) -> None:
    """Item 4: set_timing_cache returns False for another version/GPU (create_timing_cache None for garbage):
    the build goes on with a fresh cache, says so, and the file then holds this machine's cache."""
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(stale)
    plan = tb.plan_build("10.3.0", "fp16", TrtOptions(), 32)
    trt = fake_tensorrt("10.3.0")
    with pytest.warns(UserWarning, match="timing cache timing.cache is from another TensorRT version or GPU"):
        built = tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", plan, trt, timing_cache_path=cache)
    sets = [c for c in trt.calls if c[0] == "config.set_timing_cache"]
    assert sets[-1] == ("config.set_timing_cache", False, True)  # the fresh cache, never ignore_mismatch=True
    assert all(c[1] is False for c in sets) and ("config.create_timing_cache", b"") in trt.calls
    assert built.path.read_bytes() == ENGINE_MAGIC and "another TensorRT version" in built.timing_cache_note
    assert cache.read_bytes() == timing_cache_blob("10.3.0", entries=b"+")


def _calibration_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches, set_hash: str | None,
                       version: str = "10.3.0", opts: TrtOptions | None = None, dla_cores: int = 0):
    plan = tb.plan_build(version, "int8", opts or TrtOptions(implicit_int8=True, timing_cache=None), 32)
    trt = fake_tensorrt(version, dla_cores=dla_cores, memory="host")
    built = tb.build_engine(tmp_path / "model.fp32.onnx", tmp_path / "model.int8.engine", plan, trt,
                            calibration_batches=batches, calibration_batch_size=len(batches[0]),
                            calibration_sha256=set_hash, calibration_device="cpu")  # the fake reads host memory
    return trt, built


def test_implicit_calibrator_plumbing_on_10x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 7: the fake builder really calls get_batch until None; the calibrator hands it the batches' data."""
    (tmp_path / "model.fp32.onnx").write_bytes(b"onnx")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((6, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    trt, built = _calibration_build(tmp_path, monkeypatch, batches, "ab" * 32)
    calls = trt.calls
    assert ("create_network", 0) in calls and ("config.set_flag", "flag:INT8") in calls
    calibrator = next(c[1] for c in calls if c[0] == "config.int8_calibrator")
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and calibrator.get_batch_size() == 6
    assert ("profile.set_shape", "input", (6, 3, 32, 32), (6, 3, 32, 32), (6, 3, 32, 32)) in calls
    assert "config.set_calibration_profile" in names(calls)
    assert trt.calibration["batches"] == [6, 6, 6]
    np.testing.assert_allclose(trt.calibration["sums"], [float(b.astype(np.float64).sum()) for b in batches],
                               rtol=1e-6)
    assert built.calibration_cache == tmp_path / f"model.int8.engine.calib-{'ab' * 8}.cache"
    assert built.calibration_cache.read_bytes() == b"CALIBRATION-TABLE"
    plan = tb.plan_build("10.3.0", "int8", TrtOptions(implicit_int8=True, timing_cache=None), 32)
    with pytest.raises(FairdeployError, match="needs the calibration set's batches"):
        tb.build_engine(tmp_path / "model.fp32.onnx", tmp_path / "x.engine", plan, fake_tensorrt("10.3.0"))


def test_calibration_cache_is_keyed_to_the_calibration_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 3: a second export with another set into the same folder calibrates again (new cache file named
    by the set's hash); the same set reuses its own cache and asks for no batch."""
    (tmp_path / "model.fp32.onnx").write_bytes(b"onnx")
    one = [np.zeros((2, 3, 32, 32), np.float32)]
    two = [np.ones((2, 3, 32, 32), np.float32)]
    trt_a, a = _calibration_build(tmp_path, monkeypatch, one, "a" * 64)
    trt_b, b = _calibration_build(tmp_path, monkeypatch, two, "b" * 64)
    assert trt_a.calibration["batches"] == [2] and trt_b.calibration["batches"] == [2]  # B calibrated anew
    assert trt_b.calibration["sums"] == [2 * 3 * 32 * 32]
    assert a.calibration_cache != b.calibration_cache and "b" * 16 in b.calibration_cache.name
    trt_again, again = _calibration_build(tmp_path, monkeypatch, one, "a" * 64)
    assert trt_again.calibration["batches"] == [] and again.calibration_cache == a.calibration_cache
    assert ("calibrator.read_calibration_cache", True) in trt_again.calls
    # No set hash given: the batches' own content keys the cache.
    _, c = _calibration_build(tmp_path, monkeypatch, two, None)
    _, d = _calibration_build(tmp_path, monkeypatch, [x + 1 for x in two], None)
    assert c.calibration_cache != d.calibration_cache


def test_int8_on_dla_plumbing_on_10x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1 through the builder: DLA device and core, INT8 + FP16 flags, weakly typed, calibrator fed."""
    (tmp_path / "model.fp32.onnx").write_bytes(b"onnx")
    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=1, timing_cache=None)
    trt, built = _calibration_build(tmp_path, monkeypatch, [np.ones((1, 3, 32, 32), np.float32)] * 4, "c" * 64,
                                    opts=opts, dla_cores=2)
    calls = trt.calls
    assert ("create_network", 0) in calls
    assert [c[1] for c in calls if c[0] == "config.set_flag"] == ["flag:INT8", "flag:FP16", "flag:GPU_FALLBACK"]
    assert ("config.default_device_type", "device:dla") in calls and ("config.DLA_core", 1) in calls
    assert trt.calibration["batches"] == [1, 1, 1, 1] and built.plan.quantization == "implicit-calibrator"


def test_parse_or_build_failure_leaves_no_engine(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    plan = tb.plan_build("11.0.0", "fp16", TrtOptions(timing_cache=None), 32)
    with pytest.raises(FairdeployError, match=r"TensorRT cannot parse m\.onnx: In node 3 \(Foo\): No importer"):
        tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", plan, fake_tensorrt("11.0.0", parse_ok=False))
    with pytest.raises(FairdeployError, match=r"TensorRT could not build an engine from m\.onnx: out of memory$"):
        tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", plan,
                        fake_tensorrt("11.0.0", build_error="out of\nmemory"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def _pooling_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["logits"], name="/head/GlobalAveragePool")], "pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 1, 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_layer_the_dla_rejects_at_build_time_is_one_line(tmp_path: Path) -> None:
    """Issue 19 §2: build_serialized_network returns None (the reason goes to the logger) for a layer the DLA
    cannot run without GPU fallback; fairdeploy says so in one line naming the layer, and writes nothing. With GPU
    fallback the same network builds (the control)."""
    onnx_path = _pooling_onnx(tmp_path / "m.onnx")
    opts = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0, gpu_fallback=False, timing_cache=None)
    plan = tb.plan_build("10.3.0", "fp16", opts, 32)
    trt = fake_tensorrt("10.3.0", dla_cores=2, dla_unsupported=("GlobalAveragePool",))
    with pytest.raises(FairdeployError) as e:
        tb.build_engine(onnx_path, tmp_path / "m.engine", plan, trt)
    assert str(e.value) == ("TensorRT could not build an engine from m.onnx: /head/GlobalAveragePool "
                            "(GlobalAveragePool): layer cannot run on DLA and GPU fallback is not enabled")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    fallback = tb.plan_build("10.3.0", "fp16", TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0,
                                                          timing_cache=None), 32)
    built = tb.build_engine(onnx_path, tmp_path / "m.engine", fallback,
                            fake_tensorrt("10.3.0", dla_cores=2, dla_unsupported=("GlobalAveragePool",)))
    assert built.path.read_bytes() == engine_bytes(0)


def test_calibration_batches_must_be_device_memory(tmp_path: Path) -> None:
    """The real builder reads get_batch's pointers as device memory: host memory (a CPU tensor) is refused, the
    build returns None, and fairdeploy's message carries the reason (the fake in its real-API mode; on a machine
    without CUDA it has no device memory at all)."""
    (tmp_path / "model.fp32.onnx").write_bytes(b"onnx")
    plan = tb.plan_build("10.3.0", "int8", TrtOptions(implicit_int8=True, timing_cache=None), 32)
    with pytest.raises(FairdeployError, match=r"could not build an engine from model\.fp32\.onnx: Calibration "
                                              r"failure: (address 0x[0-9a-f]+ is not CUDA device memory|the bindings "
                                              r"read device memory and there is no CUDA device here)"):
        tb.build_engine(tmp_path / "model.fp32.onnx", tmp_path / "model.int8.engine", plan, fake_tensorrt("10.3.0"),
                        calibration_batches=[np.ones((2, 3, 32, 32), np.float32)], calibration_batch_size=2,
                        calibration_sha256="d" * 64, calibration_device="cpu")


def test_export_writes_sidecar_from_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_export's engine step with the fake 10.x module: what goes into the sidecar and export.json."""
    from fairdeploy.artifact.sidecar import check_sidecar, read_sidecar
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options
    from fairdeploy.files.hashing import sha256_file
    from fairdeploy.files.json_files import read_json
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    ckpt = save_checkpoint(create_model("mobilenet_v3_small", 3),
                           ModelSpec(arch="mobilenet_v3_small", classes=("a", "b", "c"), groups=("g0", "g1"),
                                     image_size=32), tmp_path / "ckpt")
    monkeypatch.setattr(tb, "gpu_identity", lambda device_index=0: ("Fake GPU", "8.7"))
    options = resolve_options(None, {"onnx": {"precision": ("fp16",)}, "tensorrt": {"enabled": True, "max_batch": 4, "opt_batch": 2}})
    trt = fake_tensorrt("10.3.0.30")
    result = run_export(ckpt, tmp_path / "out", options, trt_module=trt)
    side = read_sidecar(tmp_path / "out" / "model.fp16.engine.json")
    assert side.tensorrt_version == "10.3.0.30" and side.gpu_name == "Fake GPU" and side.precision == "fp16"
    assert side.onnx_sha256 == sha256_file(tmp_path / "out" / "model.fp16.onnx") and side.calibration_sha256 is None
    assert (side.min_batch, side.opt_batch, side.max_batch) == (1, 2, 4) and side.classes == ("a", "b", "c")
    check_sidecar(side, "10.3.0.30", "Fake GPU", "8.7", result.engines["fp16"])
    recorded = read_json(tmp_path / "out" / "export.json")["engines"]
    # TF32 (on by default in TensorRT) is cleared, and export.json says so beside the flags that were set.
    assert recorded["fp16"]["build_settings"]["cleared_builder_flags"] == ["TF32"]
    assert side.build_settings["builder_flags"] == [] and "flag:TF32" not in trt.built[0]["flags"]
    # Item 5: only the engine asked for; the fp32 ONNX is written (the others derive from it), no fp32 engine.
    assert set(recorded) == {"fp16"} and recorded["fp16"]["engine_sha256"] == side.engine_sha256
    assert set(result.engines) == {"fp16"} and not (tmp_path / "out" / "model.fp32.engine").exists()
    assert set(result.onnx) == {"fp32", "fp16"}


def test_engine_precisions_are_those_asked() -> None:
    """Item 5: the ONNX files always include fp32; the engines only what was asked for."""
    from fairdeploy.export.profiles import ExportOptions, OnnxOptions, parse_precisions, resolve_options

    opts = resolve_options(None, {"onnx": {"precision": parse_precisions(["int8"])}, "tensorrt": {"enabled": True}})
    assert opts.precisions == ("fp32", "int8") and opts.engine_precisions == ("int8",)
    assert resolve_options(None, {}).engine_precisions == ("fp32",)
    both = ExportOptions(onnx=OnnxOptions(precision=("int8", "fp32")))
    assert both.precisions == ("fp32", "int8") and both.engine_precisions == ("fp32", "int8")
    assert ExportOptions(onnx=OnnxOptions(precision=("fp16",))).engine_precisions == ("fp16",)


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    return save_checkpoint(create_model("mobilenet_v3_small", 3),
                           ModelSpec(arch="mobilenet_v3_small", classes=("cross", "disc", "ring"),
                                     groups=("dark", "light"), image_size=32), tmp_path / "ckpt")


def test_sidecar_is_written_even_when_the_timing_cache_cannot_be_saved(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 4: nothing that can fail comes between the engine file and its sidecar; an unsavable timing cache
    is a warning, the engine and its sidecar are there."""
    from fairdeploy.artifact.sidecar import read_sidecar
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache's folder would be")
    monkeypatch.setattr(tb, "gpu_identity", lambda device_index=0: ("Fake GPU", "8.7"))
    options = resolve_options(None, {"onnx": {"precision": ("fp16",)}, "tensorrt": {
        "enabled": True, "max_batch": 2, "opt_batch": 1, "timing_cache": str(blocker / "timing.cache")}})
    with pytest.warns(UserWarning, match="timing cache .*timing.cache could not be saved"):
        result = run_export(_tiny_checkpoint(tmp_path), tmp_path / "out", options,
                            trt_module=fake_tensorrt("10.3.0.30"))
    side = read_sidecar(tmp_path / "out" / "model.fp16.engine.json")
    assert result.engines["fp16"].read_bytes() == ENGINE_MAGIC and side.precision == "fp16"


def test_dla_int8_without_gpu_fallback_exports_on_10x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      synth_manifest: Path) -> None:
    """Items 1 and 5 end to end: `--dla-core 0 --no-gpu-fallback --precision int8` builds one engine, the
    implicit-calibrator INT8 one from the fp32 ONNX, its sidecar naming the calibration set."""
    from fairdeploy.artifact.sidecar import read_sidecar
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options

    monkeypatch.setattr(tb, "gpu_identity", lambda device_index=0: ("Fake GPU", "8.7"))
    monkeypatch.setattr(tb, "build_engine", functools.partial(tb.build_engine, calibration_device="cpu"))
    options = resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {"size": 12}, "tensorrt": {
        "enabled": True, "min_batch": 1, "opt_batch": 1, "max_batch": 1, "dla_core": 0, "gpu_fallback": False}})
    trt = fake_tensorrt("10.3.0.30", dla_cores=2, memory="host")
    result = run_export(_tiny_checkpoint(tmp_path), tmp_path / "out", options, data=synth_manifest,
                        trt_module=trt)
    assert set(result.engines) == {"int8"}
    side = read_sidecar(tmp_path / "out" / "model.int8.engine.json")
    assert side.quantization == "implicit-calibrator" and side.onnx_file == "model.fp32.onnx" and side.dla_core == 0
    assert side.calibration_sha256 == result.summary.calibration.sha256
    assert (tmp_path / "out" / f"model.int8.engine.calib-{side.calibration_sha256[:16]}.cache").is_file()
    assert trt.calibration["batches"] == [1] * 12 and ("parse_from_file", "model.fp32.onnx") in trt.calls


def test_group_aware_mixed_precision_is_refused_on_the_implicit_path() -> None:
    """Issue 19 §2: the implicit INT8 path (DLA on 10.x, --trt-implicit-int8) builds from model.fp32.onnx with
    TensorRT's calibrator, so the layers group-aware mixed precision keeps FP32 in model.int8.onnx would silently
    not be kept: refused at planning, in one line. The Q/DQ paths keep them and plan as before."""
    from fairdeploy.export.calibration import CalibrationRecipe

    mixed = CalibrationRecipe(mixed_precision="group-aware")
    dla = TrtOptions(min_batch=1, opt_batch=1, max_batch=1, dla_core=0)
    for opts, why in ((dla, "INT8 on DLA with TensorRT 10.x"), (TrtOptions(implicit_int8=True), "--trt-implicit-int8")):
        with pytest.raises(FairdeployError, match=rf"^--int8-mixed group-aware: {why} builds the int8 engine from "
                                                  r"model\.fp32\.onnx") as e:
            tb.plan_build("10.3.0", "int8", opts, 224, platform="linux", calibration=mixed)
        assert "\n" not in str(e.value) and "--int8-mixed off" in str(e.value)
        # The control: the same options without mixed precision plan the implicit path.
        assert tb.plan_build("10.3.0", "int8", opts, 224, platform="linux",
                             calibration=CalibrationRecipe()).implicit_calibrator
    assert tb.plan_build("10.3.0", "int8", TrtOptions(), 224, calibration=mixed).quantization == "qdq"
    assert tb.plan_build("11.4.1", "int8", dla, 224, platform="linux", calibration=mixed).quantization == "qdq"
    assert not tb.plan_build("10.3.0", "fp16", dla, 224, platform="linux", calibration=mixed).implicit_calibrator


def test_implicit_path_notes_a_recipe_method_other_than_entropy() -> None:
    from fairdeploy.export.calibration import CalibrationRecipe

    opts = TrtOptions(implicit_int8=True)
    notes = tb.plan_build("10.3.0", "int8", opts, 32, calibration=CalibrationRecipe(method="minmax")).notes
    assert any("calibrated with 'minmax'" in n for n in notes)
    entropy = tb.plan_build("10.3.0", "int8", opts, 32, calibration=CalibrationRecipe(method="entropy")).notes
    assert not any("calibrated with" in n for n in entropy)


@pytest.mark.parametrize("case", ["mixed-on-dla", "no-dla-in-10.8"])
def test_export_refuses_at_planning_before_any_work(case: str, tmp_path: Path, synth_manifest: Path) -> None:
    """With TensorRT importable, run_export plans the engines before reading the data or exporting anything: the
    refusal comes first and the output folder is never made."""
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options

    dla = {"enabled": True, "min_batch": 1, "opt_batch": 1, "max_batch": 1, "dla_core": 0}
    if case == "mixed-on-dla":
        flags = {"onnx": {"precision": ("int8",)}, "calibration": {"mixed_precision": "group-aware"}, "tensorrt": dla}
        version, expected = "10.3.0.30", "--int8-mixed group-aware: INT8 on DLA"
    else:
        flags = {"onnx": {"precision": ("fp16",)}, "tensorrt": dla}
        version, expected = "10.8.0", "--dla-core 0: TensorRT 10.8.0 has no DLA"
    trt = fake_tensorrt(version, dla_cores=2)
    with pytest.raises(FairdeployError, match=expected):
        run_export(_tiny_checkpoint(tmp_path), tmp_path / "out", resolve_options(None, flags), data=synth_manifest,
                   trt_module=trt)
    assert not (tmp_path / "out").exists() and names(trt.calls) == []


# ---------------------------------------------------------------- real TensorRT (skipped here)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_build(tmp_path: Path) -> None:
    if not HAS_TRT:
        pytest.skip("TensorRT is not installed (pip install 'fairdeploy[trt]' on a GPU machine)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from fairdeploy.artifact.sidecar import check_sidecar, read_sidecar
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    trt = tb.import_tensorrt()
    ckpt = save_checkpoint(create_model("resnet18", 3), ModelSpec(arch="resnet18", classes=("a", "b", "c"),
                           groups=("g0", "g1"), image_size=32), tmp_path / "ckpt")
    result = run_export(ckpt, tmp_path / "out", resolve_options(None, {"onnx": {"precision": ("fp16",)}, "tensorrt": {"enabled": True}}))
    side = read_sidecar(tmp_path / "out" / "model.fp16.engine.json")
    name, cc = tb.gpu_identity()
    check_sidecar(side, trt.__version__, name, cc, result.engines["fp16"])
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(result.engines["fp16"].read_bytes()) is not None
