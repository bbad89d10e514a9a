"""Export profiles: the shipped TOML files, merging with flags (flags win), precision parsing, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.export.profiles import (
    ExportOptions,
    OnnxOptions,
    TrtOptions,
    list_profiles,
    parse_precisions,
    resolve_options,
)

REPO = Path(__file__).resolve().parents[1]
DIRS = [REPO / "export"]


def _opts(**tables) -> ExportOptions:
    return resolve_options(None, tables)


def test_parse_precisions_orders_and_the_options_add_the_fp32_onnx() -> None:
    assert parse_precisions(["int8,fp16"]) == ("fp16", "int8")  # what was asked: the engines built
    assert parse_precisions(["int8", "FP16", "int8"]) == ("fp16", "int8")
    assert parse_precisions([]) == ("fp32",)
    opts = _opts(onnx={"precision": "int8,fp16"})
    assert opts.precisions == ("fp32", "fp16", "int8") and opts.engine_precisions == ("fp16", "int8")
    with pytest.raises(FairdeployError, match=r"unknown precision 'bf16'; choose one of fp32, fp16, int8"):
        parse_precisions(["fp16,bf16"])


def test_shipped_profiles_load_and_say_what_the_issue_asks() -> None:
    assert {"jetson-orin-nano-fp16", "jetson-agx-orin-int8-dla", "workstation-int8"} <= set(list_profiles(DIRS))
    nano = resolve_options("jetson-orin-nano-fp16", {}, DIRS)
    assert nano.precisions == ("fp32", "fp16") and nano.tensorrt.enabled
    assert (nano.tensorrt.min_batch, nano.tensorrt.opt_batch, nano.tensorrt.max_batch) == (1, 1, 1)
    assert nano.tensorrt.dla_core is None
    agx = resolve_options("jetson-agx-orin-int8-dla", {}, DIRS)
    assert agx.precisions == ("fp32", "int8") and agx.tensorrt.dla_core == 0 and agx.tensorrt.gpu_fallback
    assert agx.calibration.method == "entropy"
    ws = resolve_options("workstation-int8", {}, DIRS)
    assert "int8" in ws.precisions and ws.tensorrt.min_batch < ws.tensorrt.max_batch  # dynamic batch
    assert ws.profile is not None and ws.profile.endswith("workstation-int8.toml")


def test_flags_override_the_profile_and_the_profile_overrides_defaults() -> None:
    base = resolve_options("workstation-int8", {}, DIRS)
    opts = resolve_options("workstation-int8", {
        "onnx": {"precision": ("fp32", "fp16")}, "calibration": {"method": "minmax"},
        "tensorrt": {"max_batch": 128, "opt_batch": None, "enabled": False, "workspace_mib": 512},
    }, DIRS)
    assert opts.precisions == ("fp32", "fp16")  # flag replaces the profile's list
    assert opts.tensorrt.max_batch == 128 and opts.tensorrt.opt_batch == base.tensorrt.opt_batch  # None = not given
    assert opts.calibration.method == "minmax" and not opts.tensorrt.enabled and opts.tensorrt.workspace_mib == 512
    assert opts.tensorrt.optimization_level == base.tensorrt.optimization_level == 5  # untouched profile value
    assert opts.onnx.opset == 17 and opts.tensorrt.timing_cache == "timing.cache"
    # No profile: defaults, then flags.
    plain = _opts(onnx={"opset": 18})
    assert plain.onnx.opset == 18 and plain.precisions == ("fp32",) and plain.tensorrt == TrtOptions()
    # -1 switches off a profile's DLA core (and with it, the static-batch requirement).
    gpu = resolve_options("jetson-agx-orin-int8-dla", {"tensorrt": {"dla_core": -1, "max_batch": 8}}, DIRS)
    assert gpu.tensorrt.dla_core is None and gpu.tensorrt.max_batch == 8


def test_bad_profiles_and_flags_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FairdeployError, match=r"unknown profile 'jetson-nano'; choose one of cpu-workstation-int8, "
                                              r"jetson-agx-orin-int8-dla, jetson-orin-nano-fp16, workstation-int8"):
        resolve_options("jetson-nano", {}, DIRS)
    (tmp_path / "typo.toml").write_text('[tensorrt]\nmax_bacth = 4\n')
    with pytest.raises(FairdeployError, match=r"typo\.toml: unknown key 'max_bacth' in \[tensorrt\]; valid keys: "
                                              r"enabled, min_batch, opt_batch, max_batch, workspace_mib"):
        resolve_options(tmp_path / "typo.toml")
    (tmp_path / "sect.toml").write_text('[trt]\nenabled = true\n')
    with pytest.raises(FairdeployError, match=r"sect\.toml: unknown key 'trt'; valid keys: description, profile, "
                                              r"onnx, calibration, tensorrt"):
        resolve_options(tmp_path / "sect.toml")
    (tmp_path / "type.toml").write_text('[tensorrt]\nmax_batch = "8"\n')
    with pytest.raises(FairdeployError, match=r"type\.toml: \[tensorrt\] max_batch must be an integer, got '8'"):
        resolve_options(tmp_path / "type.toml")
    (tmp_path / "broken.toml").write_text('[onnx\n')
    with pytest.raises(FairdeployError, match="not valid TOML"):
        resolve_options(tmp_path / "broken.toml")
    with pytest.raises(FairdeployError, match=r"DLA needs a static batch \(min = opt = max\), got 1/1/4"):
        resolve_options("jetson-agx-orin-int8-dla", {"tensorrt": {"max_batch": 4}}, DIRS)
    with pytest.raises(FairdeployError, match="1 <= min <= opt <= max"):
        _opts(tensorrt={"min_batch": 8, "opt_batch": 4})
    with pytest.raises(FairdeployError, match=r"command line: \[onnx\] opset: unsupported opset 12; choose 17\.\.20"):
        _opts(onnx={"opset": 12})
    with pytest.raises(FairdeployError, match="implicit INT8 calibrator builds the int8 engine; add --precision int8"):
        _opts(tensorrt={"enabled": True, "implicit_int8": True})


def test_options_record_as_plain_data() -> None:
    d = ExportOptions().to_dict()
    assert d["onnx"]["precision"] == ("fp32",) and d["tensorrt"]["enabled"] is False and d["onnx"]["opset"] == 17
    assert ExportOptions(onnx=OnnxOptions(precision=("int8",))).precisions == ("fp32", "int8")
