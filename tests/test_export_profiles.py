"""Export profiles: the shipped TOML files, merging with flags (flags win), precision parsing, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.export.profiles import (
    ExportOptions,
    TrtOptions,
    list_profiles,
    load_profile,
    merge_options,
    parse_precisions,
    resolve_options,
)

REPO = Path(__file__).resolve().parents[1]
DIRS = [REPO / "export"]


def test_parse_precisions_orders_and_the_options_add_the_fp32_onnx() -> None:
    assert parse_precisions(["int8,fp16"]) == ("fp16", "int8")  # what was asked: the engines built
    assert parse_precisions(["int8", "FP16", "int8"]) == ("fp16", "int8")
    assert parse_precisions([]) == ("fp32",)
    opts = merge_options(None, {"precision": parse_precisions(["int8,fp16"])})
    assert opts.precisions == ("fp32", "fp16", "int8") and opts.engine_precisions == ("fp16", "int8")
    with pytest.raises(FairdeployError, match=r"unknown precision 'bf16'; choose one of fp32, fp16, int8"):
        parse_precisions(["fp16,bf16"])


def test_shipped_profiles_load_and_say_what_the_issue_asks() -> None:
    assert {"jetson-orin-nano-fp16", "jetson-agx-orin-int8-dla", "workstation-int8"} <= set(list_profiles(DIRS))
    nano = resolve_options("jetson-orin-nano-fp16", {}, DIRS)
    assert nano.precisions == ("fp32", "fp16") and nano.trt.enabled
    assert (nano.trt.min_batch, nano.trt.opt_batch, nano.trt.max_batch) == (1, 1, 1) and nano.trt.dla_core is None
    agx = resolve_options("jetson-agx-orin-int8-dla", {}, DIRS)
    assert agx.precisions == ("fp32", "int8") and agx.trt.dla_core == 0 and agx.trt.gpu_fallback
    assert agx.calib_method == "entropy"
    ws = resolve_options("workstation-int8", {}, DIRS)
    assert "int8" in ws.precisions and ws.trt.min_batch < ws.trt.max_batch  # dynamic batch
    assert ws.profile is not None and ws.profile.endswith("workstation-int8.toml")


def test_flags_override_the_profile_and_the_profile_overrides_defaults() -> None:
    base = resolve_options("workstation-int8", {}, DIRS)
    opts = resolve_options("workstation-int8", {
        "precision": ("fp32", "fp16"), "max_batch": 128, "opt_batch": None, "calib_method": "minmax",
        "trt": False, "workspace_mib": 512,
    }, DIRS)
    assert opts.precisions == ("fp32", "fp16")  # flag replaces the profile's list
    assert opts.trt.max_batch == 128 and opts.trt.opt_batch == base.trt.opt_batch  # None = not given
    assert opts.calib_method == "minmax" and not opts.trt.enabled and opts.trt.workspace_mib == 512
    assert opts.trt.optimization_level == base.trt.optimization_level == 5  # untouched profile value
    assert opts.opset == 17 and opts.trt.timing_cache == "timing.cache"
    # No profile: defaults, then flags.
    plain = resolve_options(None, {"opset": 18})
    assert plain.opset == 18 and plain.precisions == ("fp32",) and plain.trt == TrtOptions()
    # -1 switches off a profile's DLA core (and with it, the static-batch requirement).
    gpu = resolve_options("jetson-agx-orin-int8-dla", {"dla_core": -1, "max_batch": 8}, DIRS)
    assert gpu.trt.dla_core is None and gpu.trt.max_batch == 8


def test_bad_profiles_and_flags_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FairdeployError, match=r"unknown profile 'jetson-nano'; choose one of jetson-agx-orin-int8-dla, "
                                              r"jetson-orin-nano-fp16, workstation-int8"):
        resolve_options("jetson-nano", {}, DIRS)
    (tmp_path / "typo.toml").write_text('[tensorrt]\nmax_bacth = 4\n')
    with pytest.raises(FairdeployError, match=r"unknown key 'max_bacth' in \[tensorrt\]"):
        load_profile(tmp_path / "typo.toml")
    (tmp_path / "sect.toml").write_text('[trt]\nenabled = true\n')
    with pytest.raises(FairdeployError, match=r"unknown section \[trt\]"):
        load_profile(tmp_path / "sect.toml")
    (tmp_path / "type.toml").write_text('[tensorrt]\nmax_batch = "8"\n')
    with pytest.raises(FairdeployError, match="max_batch must be an integer, got '8'"):
        resolve_options(tmp_path / "type.toml", {})
    (tmp_path / "broken.toml").write_text('[export\n')
    with pytest.raises(FairdeployError, match="not valid TOML"):
        load_profile(tmp_path / "broken.toml")
    with pytest.raises(FairdeployError, match=r"DLA needs a static batch \(min = opt = max\), got 1/1/4"):
        resolve_options("jetson-agx-orin-int8-dla", {"max_batch": 4}, DIRS)
    with pytest.raises(FairdeployError, match="1 <= min <= opt <= max"):
        merge_options(None, {"min_batch": 8, "opt_batch": 4})
    with pytest.raises(FairdeployError, match=r"unsupported opset 12; choose 17\.\.20"):
        merge_options(None, {"opset": 12})
    with pytest.raises(FairdeployError, match="implicit INT8 calibrator builds the int8 engine; add --precision int8"):
        merge_options(None, {"trt": True, "implicit_int8": True})


def test_options_record_as_plain_data() -> None:
    d = ExportOptions().to_dict()
    assert d["precisions"] == ("fp32",) and d["trt"]["enabled"] is False and d["opset"] == 17
