"""fairdeploy.schema: one loader builds every configuration from TOML tables and flags (issue 12 §1).

Oracles: each expected object is written out by hand as the dataclass it must equal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import CalibrationRecipe
from fairdeploy.export.profiles import ExportOptions, OnnxOptions, TrtOptions, resolve_export_options
from fairdeploy.pipeline.config import load_pipeline_config
from fairdeploy.pipeline.resolve import _export_options, _validation_config
from fairdeploy.schema import Layer, build, keys, load, setting
from fairdeploy.validation import LatencyConfig, Tolerances, ValidationConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None


@dataclass(frozen=True)
class Outer:
    title: str = "t"
    count: int = 3
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None
    code: str = setting("x", convert=str.upper)
    hidden: int = setting(7, internal=True)


def test_layers_apply_in_order_nested_and_converted() -> None:
    obj, prov = build(Outer, [
        Layer({"count": 5, "inner": {"rate": 1, "sizes": [4]}}, "a.toml"),
        Layer({"count": None, "inner": {"name": "n"}, "code": "abc"}, "command line", names={"code": "--code"}),
    ])
    # int 1 -> float 1.0 on a float field, a list -> a tuple on a tuple field, None = not given, convert applied
    assert obj == Outer(title="t", count=5, inner=Inner(rate=1.0, sizes=(4,), name="n"), code="ABC")
    assert isinstance(obj.inner.rate, float)
    assert prov("count") == "a.toml: count" and prov("inner.name") == "command line: [inner] name"
    assert prov("code") == "--code" and prov("title") == "title (default)"
    assert keys(Outer) == ["title", "count", "inner", "extra", "code"]  # internal fields are no keys


def test_optional_sub_table_switched_on_and_off() -> None:
    assert load(Outer, {"extra": True}, "x").extra == Inner()
    assert load(Outer, {"extra": {"rate": 2}}, "x").extra == Inner(rate=2.0)
    assert load(Outer, {"extra": False}, "x", base=Outer(extra=Inner(rate=9.0))).extra is None


@pytest.mark.parametrize("values, message", [
    ({"cuont": 1}, r"^f\.toml: unknown key 'cuont' in \[sec\]; valid keys: title, count, inner, extra, code$"),
    ({"inner": {"rte": 1}}, r"^f\.toml: unknown key 'rte' in \[sec\.inner\]; valid keys: rate, sizes, name$"),
    ({"hidden": 1}, r"unknown key 'hidden'"),
    ({"count": "3"}, r"^f\.toml: \[sec\] count must be an integer, got '3' \(a string\)$"),
    ({"count": True}, r"count must be an integer, got True \(true/false\)"),
    ({"inner": {"sizes": [1, "a"]}}, r"^f\.toml: \[sec\.inner\] sizes must be a list of integers, got \[1, 'a'\]"),
    ({"inner": 3}, r"\[sec\] inner must be a table, got 3 \(an integer\)"),
])
def test_bad_values_name_the_key_the_table_and_the_valid_choices(values, message) -> None:
    with pytest.raises(FairdeployError, match=message):
        load(Outer, values, "f.toml", "sec")


def _profile(tmp_path: Path) -> Path:
    path = tmp_path / "target.toml"
    path.write_text('description = "a target"\n[onnx]\nprecision = ["int8"]\nopset = 18\n'
                    '[calibration]\nmethod = "entropy"\nsize = 64\n[tensorrt]\nenabled = true\nmax_batch = 64\n')
    return path


def test_a_profile_a_pipeline_table_and_flags_give_the_expected_dataclass(tmp_path: Path) -> None:
    profile = _profile(tmp_path)
    pipe = tmp_path / "p.toml"
    pipe.write_text('[data]\nsynth = { n_images = 48 }\n[model]\narch = "resnet18"\n'
                    f'[export]\nprofile = "{profile.name}"\n[export.tensorrt]\nmax_batch = 16\n'
                    '[export.calibration]\nseed = 3\n')
    recipe = str(REPO / "calibration" / "default.toml")
    expected = ExportOptions(
        description="a target", profile=str(profile),
        onnx=OnnxOptions(precision=("int8",), opset=18),
        calibration=CalibrationRecipe(method="entropy", size=64, seed=3, source=recipe, fit_size=False),
        tensorrt=TrtOptions(enabled=True, max_batch=16))
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # ./calibration is searched before the packaged copy: name the file the test expects
    try:
        from_pipeline = _export_options(load_pipeline_config(pipe))
        # the same through the command line: --profile PATH --max-batch 16 --calib-seed 3 --opt-batch 2
        flags = Layer({"profile": str(profile), "tensorrt": {"max_batch": 16, "opt_batch": 2},
                       "calibration": {"seed": 3}}, "command line")
        from_flags = resolve_export_options([flags])
    finally:
        os.chdir(cwd)
    assert from_pipeline == expected
    assert from_flags == ExportOptions(**{**expected.__dict__,
                                          "tensorrt": TrtOptions(enabled=True, max_batch=16, opt_batch=2)})


def test_recipe_size_fits_the_data_but_a_size_asked_for_is_strict(tmp_path: Path) -> None:
    assert resolve_export_options().calibration.fit_size  # the recipe's own size
    assert not resolve_export_options([Layer({"calibration": {"size": 100}}, "command line")]).calibration.fit_size
    assert not resolve_export_options([Layer({"profile": str(_profile(tmp_path))}, "command line")]).calibration.fit_size
    recipe = tmp_path / "r.toml"
    recipe.write_text("[calibration]\nsize = 40\n")
    own = resolve_export_options([Layer({"calibration": {"recipe": str(recipe)}}, "command line")]).calibration
    assert (own.size, own.fit_size, own.source) == (40, True, str(recipe))
    recipe.write_text('[calibration]\nrecipe = "default"\n')
    with pytest.raises(FairdeployError, match=r"r\.toml: \[calibration\] recipe: a recipe file cannot name another"):
        resolve_export_options([Layer({"calibration": {"recipe": str(recipe)}}, "command line")])
    recipe.write_text("[tensorrt]\nmax_batch = 2\n")
    with pytest.raises(FairdeployError, match=r"r\.toml: unknown key 'tensorrt'; a recipe file has one table"):
        resolve_export_options([Layer({"calibration": {"recipe": str(recipe)}}, "command line")])


def test_a_range_error_names_where_the_value_was_written(tmp_path: Path) -> None:
    flags = Layer({"tensorrt": {"optimization_level": 9}}, "command line",
                  names={"tensorrt.optimization_level": "--opt-level"})
    with pytest.raises(FairdeployError, match=r"^--opt-level: builder optimisation level must be 0\.\.5, got 9$"):
        resolve_export_options([flags])
    bad = tmp_path / "bad.toml"
    bad.write_text("[tensorrt]\noptimization_level = 7\n")
    with pytest.raises(FairdeployError, match=r"^.*bad\.toml: \[tensorrt\] optimization_level: builder optimisation"):
        resolve_export_options([Layer({"profile": str(bad)}, "command line")])
    pipe = tmp_path / "p.toml"
    pipe.write_text('[data]\nsynth = { n_images = 48 }\n[model]\narch = "resnet18"\n'
                    '[export.calibration]\nsplit = "test"\n')
    with pytest.raises(FairdeployError, match=r"p\.toml: \[export\.calibration\] split: split 'test' must stay unseen"):
        _export_options(load_pipeline_config(pipe))  # fp32 only: the table is still checked, never silently unused


def test_pipeline_validate_table_is_validation_config(tmp_path: Path) -> None:
    pipe = tmp_path / "p.toml"
    pipe.write_text('seed = 4\n[data]\nsynth = { n_images = 48 }\n[model]\narch = "resnet18"\n'
                    '[validate]\nbootstrap = 0\n[validate.tolerances]\nmax_eodd_drift = 0.5\n'
                    '[validate.latency]\nbatch_sizes = [1, 2]\n')
    assert _validation_config(load_pipeline_config(pipe)) == ValidationConfig(
        bootstrap=0, seed=4, tolerances=Tolerances(max_eodd_drift=0.5), latency=LatencyConfig(batch_sizes=(1, 2)))
    pipe.write_text('[data]\nsynth = { n_images = 48 }\n[model]\narch = "resnet18"\n[validate]\nlatency = false\n')
    assert _validation_config(load_pipeline_config(pipe)).latency is None
    pipe.write_text('[data]\nsynth = { n_images = 48 }\n[model]\narch = "resnet18"\n'
                    '[validate.tolerances]\nmax_eod_drift = 0.5\n')
    with pytest.raises(FairdeployError, match=r"p\.toml: unknown key 'max_eod_drift' in \[validate\.tolerances\]; "
                                              r"valid keys: max_eodd_drift, max_accuracy_drop"):
        _validation_config(load_pipeline_config(pipe))


def test_flag_layer_nests_given_flags_and_names_them() -> None:
    from fairdeploy.schema import flag_layer

    layer = flag_layer({"count": ("--count", 4), "inner.rate": ("--rate", None), "inner.sizes": ("--size", [2, 3])})
    assert layer.values == {"count": 4, "inner": {"sizes": [2, 3]}}  # --rate not given: no key, not None
    assert build(Outer, [layer])[0] == Outer(count=4, inner=Inner(sizes=(2, 3)))
    with pytest.raises(FairdeployError, match=r"^--size must be a list of integers, got \['a'\] \(a list\)$"):
        build(Outer, [flag_layer({"inner.sizes": ("--size", ["a"])})])
