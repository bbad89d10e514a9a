"""A pipeline over a user's manifest and a given checkpoint (no synthetic data, no training stage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdeploy.data.manifest import read_manifest
from fairdeploy.models.checkpoint import checkpoint_hash
from fairdeploy.pipeline.config import load_pipeline_config
from fairdeploy.pipeline.run import run_pipeline
from fairdeploy.training.train import evaluate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pipeline_from_a_manifest_and_a_given_checkpoint(trained_checkpoint: Path, synth_manifest: Path,
                                                         tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        f'title = "given model"\ndevice = "cpu"\nseed = 0\n'
        f'[data]\nmanifest = "{synth_manifest}"\n'
        f'[model]\ncheckpoint = "{trained_checkpoint}"\n'
        f'[export.onnx]\nprecision = ["fp32"]\n'
        f'[validate]\nsplit = "test"\nbootstrap = 0\n'
        f'[validate.latency]\nbatch_sizes = [1]\niterations = 2\nwarmup = 1\n')
    before = checkpoint_hash(trained_checkpoint)
    result = run_pipeline(load_pipeline_config(toml), tmp_path / "run")
    ran = [o.name for o in result.outcomes if o.status == "ran"]
    assert "train" not in ran and "data" not in ran  # nothing generated, nothing trained
    assert {"export vanilla", "validate vanilla"} <= set(ran)
    stages = {s.name: s for s in result.stages.stages}
    assert set(stages) == {"vanilla", "vanilla/onnx-fp32"}
    # oracle: the library's own evaluation of the given checkpoint on the given manifest's test split
    ref = evaluate_checkpoint(trained_checkpoint, read_manifest(synth_manifest), "test", "cpu", bootstrap=0)
    assert stages["vanilla"].metrics["overall"]["accuracy"] == pytest.approx(ref.overall_accuracy)
    assert stages["vanilla"].metrics["fairness"]["eodd"] == pytest.approx(ref.gap("eodd"))
    assert {g: m["n"] for g, m in stages["vanilla"].metrics["groups"].items()} == {g: m.n for g, m in ref.groups}
    assert stages["vanilla/onnx-fp32"].agreement == 1.0
    assert checkpoint_hash(trained_checkpoint) == before  # the user's checkpoint is read, never rewritten
