"""The pipeline as data (issue 12 §4): stages keyed on their resolved settings, upstream files and the package
version; notes kept in the stage record. Nothing here trains a model: the plan is inspected, stages are toy ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import fairdeploy
from fairdeploy.pipeline.config import load_pipeline_config
from fairdeploy.pipeline.resolve import resolve_pipeline
from fairdeploy.pipeline.run import plan_stages
from fairdeploy.pipeline.stages import HashOf, Stage, hash_inputs, resolve_inputs, run_stage


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_package_version_is_part_of_every_stage_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def work() -> None:
        calls.append(1)
        (tmp_path / "s" / "out.txt").write_text("x")

    assert run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work).status == "ran"
    assert run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work).status == "up to date"
    monkeypatch.setattr(fairdeploy, "__version__", fairdeploy.__version__ + ".post1")
    assert run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work).status == "ran"  # a new library: rerun
    assert len(calls) == 2


def test_notes_survive_a_cached_rerun(tmp_path: Path) -> None:
    def work() -> list[str]:
        (tmp_path / "s" / "out.txt").write_text("x")
        return ["TensorRT engines not built: no tensorrt"]

    first = run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work)
    again = run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], lambda: pytest.fail("must not run"))
    assert first.status == "ran" and again.status == "up to date"
    assert first.notes == again.notes == ("TensorRT engines not built: no tensorrt",)


def test_hash_of_is_taken_when_the_stage_is_reached(tmp_path: Path) -> None:
    upstream = tmp_path / "model.bin"
    inputs = {"source": HashOf(upstream), "nested": [{"h": HashOf(upstream)}], "k": 3}
    upstream.write_bytes(b"one")
    first = resolve_inputs(inputs)
    upstream.write_bytes(b"two")
    second = resolve_inputs(inputs)
    import hashlib

    assert first["source"] == hashlib.sha256(b"one").hexdigest() == first["nested"][0]["h"]
    assert second["source"] == hashlib.sha256(b"two").hexdigest() and second["k"] == 3
    assert hash_inputs(first) != hash_inputs(second)


PIPE = ('seed = 1\n[data]\nsynth = { n_images = 48, image_size = 16 }\n[model]\narch = "resnet18"\nepochs = 1\n'
        '[[prune]]\nname = "b"\ncriterion = "group-taylor"\ntarget_macs = 0.5\n'
        '[[prune]]\nmethod = "fairprune"\nfinetune_after = { epochs = 1 }\n'
        '[export.onnx]\nprecision = ["fp32", "int8"]\n[validate]\nbootstrap = 0\n')


def _plan(tmp_path: Path, text: str = PIPE) -> tuple[list[Stage], list]:
    cfg = load_pipeline_config(_write(tmp_path / "p.toml", text))
    return plan_stages(resolve_pipeline(cfg), tmp_path / "run")


def test_plan_lists_every_stage_and_model_in_order(tmp_path: Path) -> None:
    stages, models = _plan(tmp_path)
    assert [m.name for m in models] == ["vanilla", "b", "b-control", "fairprune", "fairprune+ft"]
    assert [s.name for s in stages] == (
        ["data", "train", "prune b", "prune fairprune", "finetune fairprune"]
        + [f"{kind} {m}" for m in ("vanilla", "b", "b-control", "fairprune", "fairprune+ft")
           for kind in ("export", "validate")])
    export = next(s for s in stages if s.name == "export b-control")
    assert export.outputs == ("model.fp32.onnx", "model.int8.onnx", "export.json")
    assert export.folder == tmp_path / "run" / "export-b-control"


def test_stage_inputs_are_the_resolved_settings_not_the_file_text(tmp_path: Path) -> None:
    """A setting left to its library default is in the key: the same TOML with another default resolved (here
    simulated by replacing the resolved value) changes exactly the stages that use it."""
    cfg = load_pipeline_config(_write(tmp_path / "p.toml", PIPE))
    plan = resolve_pipeline(cfg)
    other = replace(plan, validate=replace(plan.validate, tolerances=replace(plan.validate.tolerances,
                                                                               max_eodd_drift=0.5)))
    a, _ = plan_stages(plan, tmp_path / "run")
    b, _ = plan_stages(other, tmp_path / "run")
    changed = {x.name for x, y in zip(a, b) if hash_inputs(_inputs(x, tmp_path)) != hash_inputs(_inputs(y, tmp_path))}
    assert changed == {"validate vanilla", "validate b", "validate b-control", "validate fairprune",
                       "validate fairprune+ft"}
    # the calibration recipe's values (from calibration/default.toml and the dataclass) are in the export key
    export = next(s for s in a if s.name == "export vanilla")
    assert export.inputs["options"]["calibration"]["size"] == plan.export.calibration.size


def _inputs(stage: Stage, tmp_path: Path) -> dict:
    """The stage's inputs with upstream hashes replaced by their paths (nothing upstream exists in this test)."""
    def strip(v):
        if isinstance(v, HashOf):
            return str(v.path)
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        return v
    return strip(stage.inputs)
