"""The demo pipeline end to end at a tiny size, stage caching, and bad pipeline configs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.models.checkpoint import load_checkpoint
from fairdeploy.models.size import model_size
from fairdeploy.pipeline.config import DEMO_CONFIG, PruneEntry, load_pipeline_config
from fairdeploy.pipeline.resolve import _budget_options, _split_options
from fairdeploy.pipeline.run import _trajectories, run_pipeline
from fairdeploy.pipeline.stages import run_stage
from fairdeploy.pruning.budget import BudgetConfig

# The demo cut down: one pruning round with one fine-tuning epoch, few score images and bootstrap samples. Less data
# or 16 px images save no measurable time (what is left is fixed cost: the budget bisection's 15 trial removals
# per run, ONNX export and quantization, the report's figures) and leave resnet18 predicting one class.
TINY = dict(
    synth={"n_images": 300, "image_size": 32},
    model={"epochs": 2, "batch_size": 32},
    prune={"fairprune": {"step": 0.5, "min_fraction": 0.4, "score_samples": 4, "bootstrap": 20,
                         "finetune": {"epochs": 1}},  # one search round (x0.5; x0.25 is below the floor)
           "snnl": {"stop": {"steps": 1}, "finetune": {"epochs": 1}}},
    export={"onnx": {"precision": ["fp32", "int8"]}, "calibration": {"size": 48}},
    validate={"bootstrap": 20, "latency": {"batch_sizes": [1, 4], "iterations": 3, "warmup": 1}},
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = replace(load_pipeline_config(DEMO_CONFIG).with_overrides(**TINY), device="cpu")
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    return cfg, run_dir, run_pipeline(cfg, run_dir)


def test_demo_pipeline_runs_every_stage_and_validates_every_artifact(tiny_run):
    cfg, run_dir, result = tiny_run
    ran = [o.name for o in result.outcomes if o.status == "ran"]
    assert ran[:4] == ["data", "train", "prune fairprune", "prune snnl"]
    assert {"export vanilla", "validate vanilla", "export fairprune", "validate fairprune",
            "export fairprune-control", "validate fairprune-control", "export snnl", "validate snnl"} <= set(ran)
    names = [s.name for s in result.stages.stages]
    for model in ("vanilla", "fairprune", "fairprune-control", "snnl"):
        assert model in names
        assert f"{model}/onnx-fp32" in names and f"{model}/onnx-int8" in names
    # every ONNX stage's metrics come from running that artifact: FP32 ONNX agrees with PyTorch
    fp32 = next(s for s in result.stages.stages if s.name == "vanilla/onnx-fp32")
    assert fp32.agreement == 1.0 and fp32.kind == "onnx"
    assert result.report_html.is_file() and "data:image/png;base64" in result.report_html.read_text()


def test_every_stage_reports_what_its_artifact_predicts(tiny_run):
    # Oracle: each artifact run by hand (a checkpoint in plain torch, an ONNX file in a bare onnxruntime session) on
    # the whole test split at once, each group's confusion matrix from scikit-learn. Metrics copied from another
    # stage (say, an INT8 file's from its reference) fail wherever the two predict differently.
    import numpy as np
    import onnxruntime as ort
    import torch
    from sklearn.metrics import confusion_matrix

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest

    cfg, run_dir, result = tiny_run
    stages = result.stages.stages
    checked = []
    for ref in (s for s in stages if s.reference is None):
        model, spec = load_checkpoint(ref.artifact)
        ds = split_dataset(read_manifest(run_dir / "data" / "manifest.csv"), result.stages.split,
                           Encoding(spec.classes, spec.groups), eval_transform(spec.image_size, spec.mean, spec.std))
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it[0] for it in items])
        y, g = (np.array([int(it[k]) for it in items]) for k in (1, 2))
        for s in (t for t in stages if t.name == ref.name or t.reference == ref.name):
            if s.kind == "pytorch":
                with torch.no_grad():
                    logits = model.eval()(x).numpy()
            else:
                session = ort.InferenceSession(s.artifact, providers=["CPUExecutionProvider"])
                logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            pred = logits.argmax(1)
            assert s.metrics["n"] == len(y) > 0
            assert s.metrics["overall"]["accuracy"] == pytest.approx(float(np.mean(pred == y))), s.name
            for k, group in enumerate(spec.groups):
                cm = confusion_matrix(y[g == k], pred[g == k], labels=list(range(len(spec.classes))))
                assert s.metrics["groups"][group]["confusion"] == cm.tolist(), (s.name, group)
                assert s.metrics["groups"][group]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
            checked.append(s.name)
    assert sorted(checked) == sorted(s.name for s in stages) and len(checked) == 12


def test_demo_search_stage_hands_on_what_the_guard_accepted_and_validates_its_control(tiny_run):
    """The demo's FairPrune stage compresses as far as the guard allows beside its magnitude control: whatever the
    trained model makes of it on this CPU, the model handed on is the search's reached model (the input model when
    round 1 failed), its guard passed, and every figure the notes and report show is prune.json's."""
    cfg, run_dir, result = tiny_run
    out = run_dir / "prune-fairprune" / "model"
    rec = json.loads((out / "prune.json").read_text())
    assert rec["kind"] == "budget" and rec["mode"] == "tolerance" and rec["budget"] is None
    assert rec["criterion"] == "fairprune" and rec["control"] == "magnitude"
    assert rec["tolerance"]["step"] == 0.5 and rec["tolerance"]["min_fraction"] == 0.4  # the TINY override arrived
    assert len(rec["runs"]["candidate"]["rounds"]) == 1  # x0.5, then x0.25 is below the floor (or round 1 failed)
    sizes = {}
    for name, path in [("dense", run_dir / "train" / "best"), ("candidate", out), ("control", out / "control")]:
        model, spec = load_checkpoint(path)
        sizes[name] = model_size(model, spec.image_size)
    for name, run_name in (("candidate", "candidate"), ("control", "control")):
        run = rec["runs"][run_name]
        reached, first = run["reached"], run["rounds"][0]
        assert run["guard_passed"] is True  # a search hands on only what the guard accepted
        if reached["round"] == 0:  # not even round 1 passed: the input model, uncompressed
            assert not first["passed"] and sizes[name].macs == sizes["dense"].macs
        else:
            assert first["passed"] and sizes[name].macs <= 0.5 * sizes["dense"].macs
            assert sizes[name].macs == first[reached["model"].split("-", 1)[1]]["size"]["macs"]
        assert reached["macs_fraction"] == pytest.approx(sizes[name].macs / sizes["dense"].macs)
    reach = rec["comparison"]["reach"]
    assert reach["reduction_ratio"] == pytest.approx(reach["control"] / reach["candidate"])
    vj = json.loads((run_dir / "validate-fairprune-control" / "validation.json").read_text())
    assert vj["candidates"] and all(c["artifact"]["kind"] == "onnx" for c in vj["candidates"])
    stage = {s.name: s for s in result.stages.stages}
    assert stage["fairprune"].macs == sizes["candidate"].macs
    assert stage["fairprune-control/onnx-int8"].macs == sizes["control"].macs
    assert stage["vanilla"].macs == sizes["dense"].macs
    for model in ("fairprune", "fairprune-control"):  # both passed their guard: no artifact is marked failed by it
        assert all(s.guard_failure is None for s in result.stages.stages if s.name.split("/")[0] == model)
    # notes: the verdict line (with the reach) and the MACs handed on; the report says which stage is the control
    assert f"fairprune: {rec['comparison']['verdict']}" in result.notes
    assert "compression reached at max group drop" in rec["comparison"]["verdict"]
    assert any(f"x{rec['selected']['macs_fraction']:.3f} of the MACs" in n for n in result.notes)
    md = (run_dir / "report.md").read_text()
    assert "`fairprune-control` controls `fairprune`" in md
    assert "frontier.png" in md
    # the frontier: the candidate's and the control's rounds after fine-tuning, step 0 = the input model
    traj = json.loads((run_dir / "stages.json").read_text())["trajectories"]
    assert [t["name"] for t in traj] == ["fairprune", "fairprune-control (magnitude)", "snnl"]
    for t, run_name in zip(traj, ("candidate", "control")):
        rounds = rec["runs"][run_name]["rounds"]
        assert [p["step"] for p in t["points"]] == list(range(len(rounds) + 1))
        assert t["points"][0]["accuracy"] == rec["input"]["val"]["accuracy"]
        assert t["points"][0]["macs"] == rec["input"]["size"]["macs"]
        assert t["points"][1]["eodd"] == rounds[0]["finetuned"]["val"]["fairness"]["eodd"]
        assert t["points"][1]["macs"] == rounds[0]["finetuned"]["size"]["macs"]
        assert t["points"][1]["passed"] == rounds[0]["passed"]


def test_budget_table_maps_onto_budget_config():
    cfg = _budget_options(PruneEntry("t", "budget", {"speedup": 4, "rounds": 2, "finetune": {
        "lr": 0.01, "group_weight": "balanced"}}, criterion="taylor"), 7)
    assert (cfg.criterion, cfg.metric, cfg.target, cfg.rounds, cfg.seed) == ("taylor", "macs", 0.25, 2, 7)
    assert (cfg.finetune.lr, cfg.finetune.group_weight, cfg.finetune.seed) == (0.01, "balanced", 7)
    assert cfg.finetune.distill == BudgetConfig().finetune.distill  # unset finetune keys keep BudgetConfig's defaults
    assert cfg.control_run == "finetune-only"  # a blind criterion's control is fine-tuning alone, as on the CLI
    gt = _budget_options(PruneEntry("g", "budget", {"target_params": 0.3}, criterion="group-taylor"), 0)
    assert (gt.metric, gt.target, gt.control_run) == ("params", 0.3, "magnitude")
    search = _budget_options(PruneEntry("s", "budget", {"max_group_drop": 0.04}, criterion="fairprune"), 0)
    assert search.is_search and search.max_group_drop == 0.04 and search.control_run == "magnitude"


def test_method_tables_still_parse_and_old_prune_json_still_plots():
    cfg = _split_options(PruneEntry("snnl", "snnl", {"stop": {"steps": 1}, "snnl": {"channels_per_round": 8},
                                                       "finetune": {"epochs": 1}}), 3)
    assert cfg.method == "snnl" and cfg.stop.steps == 1 and cfg.finetune.epochs == 1 and cfg.finetune.seed == 3
    old = {"steps": [{"step": s, "val": {"accuracy": 0.5 + s / 10, "f1_macro": 0.4, "fairness": {"eodd": 0.2 - s / 20}}}
                     for s in range(3)]}
    [t] = _trajectories("fairprune", old)
    assert [p["step"] for p in t.points] == [0, 1, 2] and t.points[2]["eodd"] == pytest.approx(0.1)


def test_second_run_with_nothing_changed_redoes_no_stage(tiny_run):
    cfg, run_dir, first = tiny_run
    assert first.outcomes[-1].name == "report" and first.outcomes[-1].status == "ran"
    kept = [*run_dir.rglob("*.onnx"), run_dir / "report.md", run_dir / "report.html", run_dir / "stages.json",
            *(run_dir / "report_files").iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept}
    again = run_pipeline(cfg, run_dir)
    assert [o.status for o in again.outcomes] == ["up to date"] * len(first.outcomes)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == before  # the report is not re-rendered


def test_report_stage_renders_only_when_stages_json_changes(tmp_path):
    from test_report import _stages

    from fairdeploy.pipeline.run import report_stage
    from fairdeploy.report import write_stages
    from fairdeploy.report.stages import RunStages

    write_stages(tmp_path / "stages.json", RunStages(tuple(_stages())))
    assert report_stage(tmp_path).status == "ran"
    files = [tmp_path / "report.md", tmp_path / "report.html", *(tmp_path / "report_files").iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert report_stage(tmp_path).status == "up to date"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    write_stages(tmp_path / "stages.json", RunStages(tuple(_stages()), notes=("a new note",)))
    assert report_stage(tmp_path).status == "ran"
    assert "a new note" in (tmp_path / "report.md").read_text()
    (tmp_path / "report.html").unlink()  # a deleted output is rendered again
    assert report_stage(tmp_path).status == "ran" and (tmp_path / "report.html").is_file()


def test_changing_a_validation_setting_reruns_only_validation(tiny_run):
    cfg, run_dir, first = tiny_run
    changed = cfg.with_overrides(validate={"bootstrap": 21})
    result = run_pipeline(changed, run_dir)
    status = {o.name: o.status for o in result.outcomes}
    assert all(v == "ran" for k, v in status.items() if k.startswith("validate"))
    assert status["report"] == "ran"  # new intervals in stages.json
    assert all(v == "up to date" for k, v in status.items() if not k.startswith("validate") and k != "report")


def test_interrupted_stage_runs_again(tmp_path):
    calls = []

    def work():
        calls.append(1)
        (tmp_path / "s" / "out.txt").write_text("x")

    def broken():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], broken)
    assert not (tmp_path / "s" / "stage.json").exists()
    assert run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work).status == "ran"
    assert run_stage(tmp_path / "s", "s", {"a": 1}, ["out.txt"], work).status == "up to date"
    assert run_stage(tmp_path / "s", "s", {"a": 2}, ["out.txt"], work).status == "ran"
    assert len(calls) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\narch = 'resnet18'\n[data]\nsynth = {}\nmanifest = 'x.csv'\n", "exactly one of"),
        ("[model]\narch = 'resnet18'\n[data]\nsynth = {n_imagez = 5}\n", r"unknown key 'n_imagez' in \[data\.synth\]; valid keys: n_images"),
        ("colour = 1\n[model]\narch = 'resnet18'\n[data]\nsynth = {}\n", "unknown key 'colour'"),
        ("[model]\narch = 'resnet18'\n[data]\nsynth = {}\n[[prune]]\nname = 'x'\n", "needs a `method`"),
        ("[model]\narch = 'resnet18'\n[data]\nsynth = {}\n[[prune]]\ncriterion = 'group-taylor'\nspeedup = 2\n"
         "target_macs = 0.5\n", "takes at most one of target_macs"),
        ("[model]\narch = 'resnet18'\n[data]\nsynth = {}\n[[prune]]\ncriterion = 'group-taylor'\nspeedup = 2\nroundz = 2\n",
         "group-taylor: unknown key 'roundz'; valid keys: .*rounds"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_bad_pipeline_config_is_one_clear_line(tmp_path, run_main, text, message):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(FairdeployError, match=message):
        cfg = load_pipeline_config(p)
        run_pipeline(cfg, tmp_path / "run")
    # the CLI in this process (its error handling included; a subprocess would import torch again for each case)
    code, _, err = run_main("pipeline", str(p), "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err and message.split("'")[0] in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # every section is checked before anything is written


def test_cli_gate_column_agrees_with_the_report_on_a_failed_pruning_guard():
    from dataclasses import replace

    from test_report import _stages

    from fairdeploy.cli.pipeline import gate_cell

    vanilla, pruned, artifact = _stages()
    assert gate_cell(vanilla) == ""  # a reference: no gate of its own
    assert gate_cell(artifact) == "pass"
    assert gate_cell(replace(artifact, gate_passed=False)) == "[red]FAIL[/red]"
    # its runtime drift passed, but the model it comes from failed its pruning guard: not a pass
    guarded = replace(artifact, guard_failure="pruning guard failed: dark accuracy -0.05")
    assert gate_cell(guarded) == "[red]FAIL (pruning guard)[/red]"
    assert gate_cell(replace(pruned, guard_failure="pruning guard failed")) == "[red]FAIL (pruning guard)[/red]"
