"""Each option's default is written once, and the CLI and the pipeline TOML mean the same by it (issue 12 §1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.pipeline.config import PruneEntry, load_pipeline_config
from fairdeploy.pipeline.resolve import _export_options, _split_options

PACKAGE = Path(__file__).resolve().parents[1] / "fairdeploy"


def _pipeline(tmp_path: Path, export: str = "", name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[data]\nsynth = {{ n_images = 48 }}\n[model]\narch = "resnet18"\n[export]\n{export}\n')
    return path


# ---- 1. the fine-tuning learning rate ----

def test_finetune_lr_literal_is_written_once():
    from fairdeploy.training.finetune import FINETUNE_LR

    # any `lr ... = <number>` / `lr=<number>` default in the package, FitConfig's training LR aside
    pattern = re.compile(r"\b(?:finetune_)?(?:after_)?lr\b[^=\n]*=\s*([0-9.]+e-?[0-9]+|0\.0\d+)")
    hits = []
    for py in PACKAGE.rglob("*.py"):
        for line in py.read_text().splitlines():
            for m in pattern.finditer(line):
                hits.append((py.relative_to(PACKAGE).as_posix(), float(m.group(1))))
    fine_tune_values = [h for h in hits if h[0] != "training/loop.py"]  # FitConfig.lr: training from scratch
    assert fine_tune_values == [], fine_tune_values
    text = (PACKAGE / "training" / "finetune.py").read_text()
    assert [float(v) for v in re.findall(r"^FINETUNE_LR = (.+)$", text, flags=re.MULTILINE)] == [FINETUNE_LR]


def test_pipeline_finetune_lr_defaults_to_the_library_constant():
    from fairdeploy.training.finetune import FINETUNE_LR

    per_step = _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": 2}}), seed=3).finetune
    assert (per_step.epochs, per_step.lr, per_step.seed) == (2, FINETUNE_LR, 3)
    given = _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": 1, "lr": 0.02}}), 0).finetune
    assert given.lr == 0.02
    after = PruneEntry("fp", "fairprune", finetune_after_table={"epochs": 4}).finetune_after(seed=1)
    assert (after.epochs, after.lr, after.seed) == (4, FINETUNE_LR, 1)
    assert PruneEntry("fp", "fairprune", finetune_after_table={"epochs": 4, "lr": 0.03}).finetune_after(0).lr == 0.03
    assert PruneEntry("fp", "fairprune", finetune_after_table={"epochs": 0}).finetune_after(0) is None
    assert PruneEntry("fp", "fairprune").finetune_after(0) is None


def test_budget_runs_keep_their_own_named_recovery_lr():
    from fairdeploy.pruning.budget import BUDGET_FINETUNE_LR, BudgetConfig
    from fairdeploy.training.finetune import FINETUNE_LR

    assert BudgetConfig().finetune.lr == BUDGET_FINETUNE_LR != FINETUNE_LR


def _capture(monkeypatch: pytest.MonkeyPatch, target: str) -> list:
    """Replace `target` (a dotted path) with a fake that records its config and stops the command."""
    seen: list = []

    def fake(model, manifest, out, cfg, *args, **kwargs):
        seen.append(cfg)
        raise FairdeployError("captured")

    monkeypatch.setattr(target, fake)
    return seen


def test_cli_finetune_lr_defaults_to_the_library_constant(run_main, monkeypatch, synth_manifest, tmp_path):
    from fairdeploy.training.finetune import FINETUNE_LR

    seen = _capture(monkeypatch, "fairdeploy.training.finetune.finetune_checkpoint")
    code, _, err = run_main("finetune", "--model", str(tmp_path), "--data", str(synth_manifest),
                            "--out", str(tmp_path / "ft"), "--epochs", "1")
    assert code != 0 and "captured" in err
    assert seen[0].lr == FINETUNE_LR
    run_main("finetune", "--model", str(tmp_path), "--data", str(synth_manifest), "--out", str(tmp_path / "ft2"),
             "--epochs", "1", "--lr", "0.05")
    assert seen[1].lr == 0.05


# ---- 2. finetune_epochs = 0 means no fine-tuning, on the CLI and in a [[prune]] table ----

def test_zero_finetune_epochs_is_none_in_the_pipeline():
    cfg = _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": 0, "lr": 0.01}}), 0)
    assert cfg.finetune is None
    with pytest.raises(FairdeployError, match="epochs must be >= 1"):  # a negative count is still an error
        _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": -1}}), 0)


def test_zero_finetune_epochs_is_none_on_the_cli(run_main, monkeypatch, synth_manifest, tmp_path):
    from fairdeploy.training.finetune import FINETUNE_LR

    seen = _capture(monkeypatch, "fairdeploy.pruning.prune_checkpoint")
    common = ("prune", "--model", str(tmp_path), "--data", str(synth_manifest))
    code, _, err = run_main(*common, "--out", str(tmp_path / "a"), "--finetune-epochs", "0")
    assert code != 0 and "captured" in err
    run_main(*common, "--out", str(tmp_path / "b"), "--finetune-epochs", "2")
    assert seen[0].finetune is None
    assert (seen[1].finetune.epochs, seen[1].finetune.lr) == (2, FINETUNE_LR)


# ---- 3. a [[prune]] batch_size is the evaluation batch; the method's scoring batch is its own key ----

@pytest.mark.parametrize("method", ["fairprune", "snnl"])
def test_prune_table_batch_size_reaches_evaluation(method):
    from fairdeploy.pruning.run import PruneConfig

    cfg = _split_options(PruneEntry("x", method, {"batch_size": 16, method: {"batch_size": 8}}), 0)
    scoring = cfg.fairprune if method == "fairprune" else cfg.snnl
    assert (cfg.batch_size, scoring.batch_size) == (16, 8)
    default = getattr(PruneConfig(), method).batch_size
    assert getattr(_split_options(PruneEntry("x", method, {"batch_size": 16}), 0), method).batch_size == default


# ---- 4. [export] profile is applied as `fairdeploy export --profile` applies it ----

def test_export_profile_in_pipeline_matches_the_cli(tmp_path):
    from fairdeploy.export.profiles import default_profile_dirs, resolve_options

    cfg = load_pipeline_config(_pipeline(tmp_path, 'profile = "workstation-int8"\n[export.onnx]\nprecision = "fp16"\n'
                                                   "[export.tensorrt]\nmax_batch = 32\nenabled = false\n"))
    cli = resolve_options("workstation-int8", {"onnx": {"precision": ("fp16",)},
                                               "tensorrt": {"max_batch": 32, "enabled": False}}, default_profile_dirs())
    assert _export_options(cfg) == cli
    assert cli.tensorrt.optimization_level == 5 and cli.calibration.method == "entropy"  # the profile's values arrived
    # nothing in the table: the profile's own values, its `[tensorrt] enabled = true` included
    only = _export_options(load_pipeline_config(_pipeline(tmp_path, 'profile = "workstation-int8"', "q.toml")))
    assert only == resolve_options("workstation-int8", {}, default_profile_dirs())
    assert only.tensorrt.enabled and only.engine_precisions == ("fp16", "int8")


def test_export_profile_path_is_relative_to_the_pipeline_file(tmp_path):
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "mine.toml").write_text("[onnx]\nopset = 18\n[tensorrt]\nmax_batch = 4\nopt_batch = 2\n")
    opts = _export_options(load_pipeline_config(_pipeline(tmp_path, 'profile = "prof/mine.toml"\n'
                                                                    '[export.tensorrt]\nenabled = false')))
    assert (opts.onnx.opset, opts.tensorrt.max_batch, opts.tensorrt.opt_batch) == (18, 4, 2)
    assert opts.profile == str(tmp_path / "prof" / "mine.toml")


def test_unknown_export_profile_names_the_choices(tmp_path):
    path = _pipeline(tmp_path, 'profile = "no-such-profile"')
    with pytest.raises(FairdeployError, match=r"p\.toml: \[export\] profile: unknown profile .no-such-profile.; choose one of .*workstation"):
        _export_options(load_pipeline_config(path))


# ---- 5. the calibration recipe sets no value; its comment names real flags and every key ----

def test_default_recipe_sets_nothing_and_documents_every_key_and_flag():
    """default.toml repeats no default (they are CalibrationRecipe's); the flags its comment names are
    `fairdeploy export` options that land on the recipe field of that name (`--seed` is the export's seed,
    not the recipe's: `--calib-seed`)."""
    import typer

    from fairdeploy.cli.app import app
    from fairdeploy.export.calibration import CalibrationRecipe
    from fairdeploy.pipeline.config import tomllib
    from fairdeploy.schema import keys

    recipe = (PACKAGE / "resources" / "calibration" / "default.toml").read_text()
    assert tomllib.loads(recipe) == {"calibration": {}}
    documented = set(re.findall(r"^#   (\w+) ", recipe, flags=re.MULTILINE))
    assert documented == set(keys(CalibrationRecipe)) - {"recipe"}
    export = typer.main.get_command(app).commands["export"]  # type: ignore[attr-defined]
    flags = {opt for p in export.params for opt in (*p.opts, *p.secondary_opts)}
    named = re.findall(r"--[a-z0-9-]+", recipe)
    assert {"--calib-size", "--calib-seed", "--int8-mixed"} <= set(named) and set(named) <= flags, named


# ---- 6. validate's tolerances and latency defaults come from their dataclasses ----

def test_validate_flags_left_unset_keep_the_dataclass_defaults():
    from fairdeploy.cli.validate import validation_config
    from fairdeploy.validation import LatencyConfig, Tolerances, ValidationConfig

    assert validation_config("test") == ValidationConfig(split="test", tolerances=Tolerances(),
                                                         latency=LatencyConfig())
    cfg = validation_config("val", max_eodd_drift=0.05, latency_batch=16, latency_warmup=0, bootstrap=0)
    assert cfg.tolerances == Tolerances(max_eodd_drift=0.05)
    assert cfg.latency == LatencyConfig(batch_sizes=(1, 16), warmup=0)
    assert (cfg.bootstrap, cfg.split) == (0, "val")
    assert validation_config("test", latency=False).latency is None


def test_validate_cli_writes_no_tolerance_or_latency_literal():
    import typer

    from fairdeploy.cli.app import app

    cmd = typer.main.get_command(app).commands["validate"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in cmd.params}
    for name in ("max_eodd_drift", "max_accuracy_drop", "max_group_accuracy_drop", "latency_batch",
                 "latency_iterations", "latency_warmup", "bootstrap"):
        assert defaults[name] is None, name
