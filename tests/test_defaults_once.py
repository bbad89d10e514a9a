"""Each option's default is defined once, and every way of running the library means the same by it (issue 12
§1, issue 18 item 5): the configuration a command, a pipeline table and the library function itself run with when
an option is not given, observed by recording what the library functions are called with, not by reading source."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.pipeline.config import PruneEntry, load_pipeline_config
from fairdeploy.pipeline.resolve import _export_options, _split_options, resolve_pipeline

PACKAGE = Path(__file__).resolve().parents[1] / "fairdeploy"


def _pipeline(tmp_path: Path, export: str = "", name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[data]\nsynth = {{ n_images = 48 }}\n[model]\narch = "resnet18"\n[export]\n{export}\n')
    return path


# ---- 1. the effective configuration: what the library functions receive from a command and a pipeline ----

# The library functions the commands and the pipeline's stages call: their homes (where the callers look them up)
# and the position of the configuration argument.
LIBRARY_CALLS = {
    "train_model": (("fairdeploy.training.train",), 3),
    "prune_checkpoint": (("fairdeploy.pruning", "fairdeploy.pruning.run"), 3),
    "compress_checkpoint": (("fairdeploy.pruning.budget",), 3),
    "finetune_checkpoint": (("fairdeploy.training.finetune",), 3),
    "run_export": (("fairdeploy.export.exporter",), 2),
    "validate": (("fairdeploy.validation", "fairdeploy.validation.validate"), 3),
    "generate_synthetic": (("fairdeploy.data.synth",), 1),
}


class Calls(dict):
    """Function name -> the arguments of each call; `config(name)` the configuration of its calls."""

    def config(self, name: str) -> list:
        index = LIBRARY_CALLS[name][1]
        return [args[index] for args, _ in self[name]]


def _record_library_calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Replace the library functions that run a command or a pipeline stage with recorders: each keeps the
    arguments it was called with and stops its caller with a FairdeployError("captured") (a command: exit 2)."""
    calls = Calls({name: [] for name in LIBRARY_CALLS})
    for name, (homes, _) in LIBRARY_CALLS.items():
        def record(*args, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            raise FairdeployError("captured")

        for home in homes:
            monkeypatch.setattr(importlib.import_module(home), name, record)
    return calls


def _run_command(run_main, *args: str) -> None:
    code, _, err = run_main(*args)
    assert code == 2 and "captured" in err, (args, err)


def _run_pipeline_stages(tmp_path: Path, manifest: Path, tables: str, seed: int = 0) -> None:
    """Plan the pipeline `[model] arch = "resnet18"` on `manifest` with `tables` as `fairdeploy pipeline` plans it,
    and run every stage (with the library recorded, each stops at its library call)."""
    from fairdeploy.pipeline.run import plan_stages

    path = tmp_path / "p.toml"
    path.write_text(f'seed = {seed}\n[data]\nmanifest = "{manifest}"\n[model]\narch = "resnet18"\n{tables}')
    stages, _ = plan_stages(resolve_pipeline(load_pipeline_config(path)), tmp_path / "run")
    for stage in stages:
        with pytest.raises(FairdeployError, match="captured"):
            stage.run()


def _settings(obj):
    """A configuration's settings as nested dicts: the fields a file or flag sets, not those code records."""
    import dataclasses

    if not dataclasses.is_dataclass(obj):
        return obj
    return {f.name: _settings(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_finetune_after_fine_tunes_as_the_finetune_command(run_main, monkeypatch, synth_manifest, tmp_path):
    """A pipeline's `finetune_after = {}` is `fairdeploy finetune` with no options is finetune_checkpoint called
    without a config: the same FitConfig (it was 10 epochs in the pipeline, FitConfig's, and 5 on the command line,
    FINETUNE_CONFIG's); the keys given override the same fields as the flags."""
    from dataclasses import replace

    from fairdeploy.training.finetune import finetune_checkpoint

    calls = _record_library_calls(monkeypatch)
    model = ("--model", str(tmp_path), "--data", str(synth_manifest))
    _run_command(run_main, "finetune", *model, "--out", str(tmp_path / "f1"), "--seed", "3")
    _run_command(run_main, "finetune", *model, "--out", str(tmp_path / "f2"), "--seed", "3", "--epochs", "2",
                 "--lr", "0.02")
    prune = '[[prune]]\nname = "{}"\nmethod = "fairprune"\nfinetune_after = {}\n'
    _run_pipeline_stages(tmp_path, synth_manifest, prune.format("a", "{}") + prune.format("b", "{ epochs = 2, lr = 0.02 }")
                         + prune.format("c", "{ epochs = 0 }") + '[[prune]]\nname = "d"\nmethod = "fairprune"\n',
                         seed=3)
    # c (epochs = 0) and d (no table) have no fine-tuning stage
    cli_default, cli_given, pipeline_default, pipeline_given = calls.config("finetune_checkpoint")
    assert pipeline_default == cli_default == replace(_default(finetune_checkpoint, "cfg"), seed=3)
    assert pipeline_given == cli_given == replace(cli_default, epochs=2, lr=0.02)


def test_fine_tuning_after_every_step_is_the_same_in_a_prune_table_and_on_the_command(run_main, monkeypatch,
                                                                                     synth_manifest, tmp_path):
    """`[[prune]] finetune = { epochs = 2 }` is `prune --finetune-epochs 2`: the same PruneConfig (fine-tuning as
    `fairdeploy finetune` does it, for 2 epochs); `finetune = {}` fine-tunes as `fairdeploy finetune` does."""
    from dataclasses import replace

    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.finetune import FINETUNE_CONFIG

    calls = _record_library_calls(monkeypatch)
    model = ("--model", str(tmp_path), "--data", str(synth_manifest))
    for method in ("fairprune", "snnl"):
        _run_command(run_main, "prune", *model, "--out", str(tmp_path / method), "--method", method, "--seed", "3",
                     "--finetune-epochs", "2")
    _run_pipeline_stages(tmp_path, synth_manifest, '[[prune]]\nmethod = "fairprune"\nfinetune = { epochs = 2 }\n'
                         '[[prune]]\nmethod = "snnl"\nfinetune = { epochs = 2 }\n'
                         '[[prune]]\nname = "all"\nmethod = "fairprune"\nfinetune = {}\n', seed=3)
    cli_fp, cli_snnl, table_fp, table_snnl, table_all = calls.config("prune_checkpoint")
    assert (table_fp, table_snnl) == (cli_fp, cli_snnl)
    ft = replace(FINETUNE_CONFIG, epochs=2, seed=3)
    assert (cli_fp, cli_snnl) == (PruneConfig(method="fairprune", finetune=ft, seed=3),
                                  PruneConfig(method="snnl", finetune=ft, seed=3))
    assert table_all.finetune == replace(FINETUNE_CONFIG, seed=3)


def test_budget_runs_keep_their_own_named_recovery_lr():
    from fairdeploy.pruning.budget import BUDGET_FINETUNE_LR, BudgetConfig
    from fairdeploy.training.finetune import FINETUNE_LR

    assert BudgetConfig().finetune.lr == BUDGET_FINETUNE_LR != FINETUNE_LR


def test_each_stage_of_a_pipeline_runs_with_its_commands_configuration(run_main, monkeypatch, synth_manifest,
                                                                       tmp_path):
    """Tables left empty, options not given: `train`, `prune` (steps), `compress` (a budget run), `export` and
    `validate` hand the library the same configurations as the pipeline's stages (the pipeline's seed given as
    --seed), and those are the dataclasses' own defaults."""
    from dataclasses import replace

    from fairdeploy.export.profiles import ExportOptions
    from fairdeploy.models.checkpoint import ModelSpec
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    calls = _record_library_calls(monkeypatch)
    data, seed = ("--data", str(synth_manifest)), ("--seed", "3")
    model = ("--model", str(tmp_path), *data)
    _run_command(run_main, "train", *data, "--out", str(tmp_path / "t"), *seed)
    _run_command(run_main, "prune", *model, "--out", str(tmp_path / "p"), "--method", "snnl", *seed)
    _run_command(run_main, "compress", *model, "--out", str(tmp_path / "c"), "--target-macs", "0.5", *seed)
    _run_command(run_main, "export", "--model", str(tmp_path), "--out", str(tmp_path / "e"))
    _run_command(run_main, "validate", "-r", str(tmp_path), "-c", str(tmp_path / "x.onnx"), *data,
                 "--out", str(tmp_path / "v"), *seed)
    _run_pipeline_stages(tmp_path, synth_manifest, '[[prune]]\nmethod = "snnl"\n[[prune]]\n'
                         'criterion = "group-taylor"\ntarget_macs = 0.5\n[export]\n[validate]\n', seed=3)

    cli_fit, pipeline_fit = calls.config("train_model")
    assert pipeline_fit == cli_fit == FitConfig(seed=3)
    assert [args[4] for args, _ in calls["train_model"]] == [ModelSpec.image_size] * 2
    cli_steps, pipeline_steps = calls.config("prune_checkpoint")
    assert pipeline_steps == cli_steps == PruneConfig(method="snnl", seed=3)
    cli_compress, pipeline_budget = calls.config("compress_checkpoint")
    assert pipeline_budget == cli_compress
    default = BudgetConfig()
    assert cli_compress == replace(default, criterion="group-taylor", target=0.5, seed=3,
                                   finetune=replace(default.finetune, seed=3))
    cli_export, *pipeline_exports = calls.config("run_export")  # the pipeline: one export per model
    assert pipeline_exports and all(o == cli_export for o in pipeline_exports)
    # no flag, no profile: the defaults (the default recipe file sets nothing; which file was read is recorded)
    assert _settings(cli_export) == _settings(ExportOptions())
    cli_validation, *pipeline_validations = calls.config("validate")
    assert pipeline_validations and all(v == cli_validation for v in pipeline_validations)
    assert cli_validation == ValidationConfig(seed=3)


def test_every_95_percent_interval_resamples_as_often(run_main, monkeypatch, synth_manifest, tmp_path):
    """The bootstrap intervals of `evaluate` (compute_metrics), `validate` (paired differences against the reference)
    and a budget run's candidate-vs-control comparison are the same statistic, a 95 % percentile interval: with
    no option given, each resamples as often (it was 1000, 1000 and 500)."""
    from fairdeploy.metrics import bootstrap_difference_intervals, bootstrap_intervals
    from fairdeploy.metrics.fairness import compute_metrics
    from fairdeploy.training.train import evaluate_checkpoint

    calls = _record_library_calls(monkeypatch)
    data = ("--data", str(synth_manifest))
    _run_command(run_main, "compress", "--model", str(tmp_path), *data, "--out", str(tmp_path / "b"),
                 "--criterion", "magnitude", "--speedup", "2")
    _run_command(run_main, "validate", "-r", str(tmp_path), "-c", str(tmp_path / "x.onnx"), *data,
                 "--out", str(tmp_path / "v"))
    _run_pipeline_stages(tmp_path, synth_manifest, '[[prune]]\ncriterion = "magnitude"\nspeedup = 2\n')
    counts = {
        "compress --criterion": calls.config("compress_checkpoint")[0].bootstrap,
        "[[prune]] criterion": calls.config("compress_checkpoint")[1].bootstrap,
        "validate": calls.config("validate")[0].bootstrap,
        "[validate]": calls.config("validate")[-1].bootstrap,
        "evaluate (evaluate_checkpoint)": _default(evaluate_checkpoint, "bootstrap"),
        "bootstrap_intervals": _default(bootstrap_intervals, "n_boot"),
        "bootstrap_difference_intervals": _default(bootstrap_difference_intervals, "n_boot"),
    }
    assert len(set(counts.values())) == 1, counts
    # and each is a 95 % interval: the interval functions' level, the one compute_metrics passes
    assert {_default(bootstrap_intervals, "confidence"), _default(bootstrap_difference_intervals, "confidence"),
            _default(compute_metrics, "confidence")} == {0.95}


# ---- 2. finetune_epochs = 0 means no fine-tuning, on the CLI and in a [[prune]] table ----

def test_zero_finetune_epochs_is_none_in_the_pipeline():
    cfg = _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": 0, "lr": 0.01}}), 0)
    assert cfg.finetune is None
    with pytest.raises(FairdeployError, match="epochs must be >= 1"):  # a negative count is still an error
        _split_options(PruneEntry("fp", "fairprune", {"finetune": {"epochs": -1}}), 0)


def test_zero_finetune_epochs_is_none_on_the_cli(run_main, monkeypatch, synth_manifest, tmp_path):
    from fairdeploy.training.finetune import FINETUNE_LR

    calls = _record_library_calls(monkeypatch)
    common = ("prune", "--model", str(tmp_path), "--data", str(synth_manifest))
    _run_command(run_main, *common, "--out", str(tmp_path / "a"), "--finetune-epochs", "0")
    _run_command(run_main, *common, "--out", str(tmp_path / "b"), "--finetune-epochs", "2")
    settings = tmp_path / "lr.toml"  # the fine-tuning's other settings come from --config
    settings.write_text("[finetune]\nlr = 0.05\n")
    _run_command(run_main, *common, "--out", str(tmp_path / "c"), "--finetune-epochs", "2", "--config", str(settings))
    none, two, given = calls.config("prune_checkpoint")
    assert none.finetune is None
    assert (two.finetune.epochs, two.finetune.lr, given.finetune.lr) == (2, FINETUNE_LR, 0.05)


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
    from fairdeploy.schema import keys, read_toml

    recipe_file = PACKAGE / "resources" / "calibration" / "default.toml"
    recipe = recipe_file.read_text()
    assert read_toml(recipe_file) == {"calibration": {}}
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


# ---- 7. no command-line option repeats a library default: flags default to None and override ----

def _commands() -> dict[str, object]:
    """Every registered command by its full name ("data synth"), from the Typer app."""
    import typer

    from fairdeploy.cli.app import app

    found: dict[str, object] = {}

    def walk(cmd: object, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            full = f"{prefix} {name}".strip()
            if hasattr(sub, "commands"):  # a group (`data`)
                walk(sub, full)
            else:
                found[full] = sub

    walk(typer.main.get_command(app), "")
    return found


def _configs() -> dict[str, list[type]]:
    """The configuration dataclasses each command builds from its options ([]: it builds none)."""
    from fairdeploy.data.synth import SynthConfig
    from fairdeploy.export.profiles import ExportOptions
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.choose import RankConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    return {"train": [FitConfig], "evaluate": [], "finetune": [FitConfig], "prune": [PruneConfig, FitConfig],
            "validate": [ValidationConfig], "export": [ExportOptions], "report": [], "pipeline": [], "demo": [],
            "data prepare": [], "data inspect": [], "data synth": [SynthConfig], "compress": [BudgetConfig],
            "config show": [], "rank": [RankConfig]}


def _mappings() -> dict[str, list[tuple[type, dict, dict]]]:
    """(dataclass, option -> field path(s), flag overrides) as each command hands them to cli.options.configure."""
    from fairdeploy.cli import compress, data, prune, rank, train
    from fairdeploy.data.synth import SynthConfig
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.choose import RankConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig

    return {"prune": [(PruneConfig, prune.PRUNE_FIELDS, {}), (FitConfig, prune.FINETUNE_JOB_FIELDS, {})],
            "train": [(FitConfig, train.FIT_FIELDS, {})], "finetune": [(FitConfig, train.FIT_FIELDS, {})],
            "data synth": [(SynthConfig, data.SYNTH_FIELDS, data.SYNTH_FLAGS)],
            "compress": [(BudgetConfig, compress.FIELDS, {})], "rank": [(RankConfig, rank.FIELDS, {})]}


def _field_names(cls: type) -> set[str]:
    """Every field name of `cls` and of the dataclasses its fields hold (Optional ones too), at any depth."""
    import dataclasses
    import typing

    names: set[str] = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        hint = typing.get_type_hints(cls)[f.name]
        for arm in (hint, *typing.get_args(hint)):
            if isinstance(arm, type) and dataclasses.is_dataclass(arm):
                names |= _field_names(arm)
    return names


def _path_exists(cls: type, path: str) -> bool:
    import dataclasses
    import typing

    *tables, key = path.split(".")
    for table in tables:
        hint = typing.get_type_hints(cls).get(table)
        arms = [a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if not arms:
            return False
        cls = arms[0]
    return key in {f.name for f in dataclasses.fields(cls)}


# An option whose name is a field of the command's configuration but which sets something else, and why.
NOT_THE_FIELD = {
    ("export", "seed"): "the ONNX check's random inputs (run_export's argument), not [calibration] seed "
                        "(that is --calib-seed)",
}


def test_every_command_is_classified_by_the_configuration_it_builds():
    assert set(_commands()) == set(_configs())


def test_no_cli_default_repeats_a_dataclass_default():
    """A parameter named like a field of a dataclass its command builds (or mapped to one) defaults to None (or
    False for a switch, or empty): the field's default is the only one."""
    commands, configs, mappings = _commands(), _configs(), _mappings()
    offenders = []
    for name, cmd in commands.items():
        fields = set().union(*(_field_names(c) for c in configs[name]))
        mapped = {opt for _, m, _ in mappings.get(name, []) for opt in m}
        for p in cmd.params:  # type: ignore[attr-defined]
            unset = p.default is None or p.default is False or p.default in ("", (), [])
            if not unset and (p.name in fields or p.name in mapped) and (name, p.name) not in NOT_THE_FIELD:
                offenders.append(f"{name} {p.opts[0]} = {p.default!r}")
    assert offenders == []


def test_option_maps_name_real_options_and_real_fields():
    """Each mapping entry is a parameter of its command, the flag configure() names in messages is that
    parameter's flag, and each path is a field of the dataclass (a typo would make the option a silent no-op)."""
    commands = _commands()
    for name, maps in _mappings().items():
        params = {p.name: p for p in commands[name].params}  # type: ignore[attr-defined]
        for cls, fields, flags in maps:
            for option, paths in fields.items():
                assert option in params, (name, option)
                flag = flags.get(option) or "--" + option.replace("_", "-")
                assert flag in params[option].opts, (name, option, params[option].opts)
                for path in (paths,) if isinstance(paths, str) else paths:
                    assert _path_exists(cls, path), (name, cls.__name__, path)


def test_unset_options_build_exactly_the_dataclass_defaults(run_main, monkeypatch, synth_manifest, tmp_path):
    from dataclasses import replace

    from fairdeploy.data.synth import SynthConfig
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.finetune import FINETUNE_CONFIG
    from fairdeploy.training.loop import FitConfig

    data = ("--data", str(synth_manifest))
    checkpoint = ("--model", str(tmp_path), *data)
    calls = _record_library_calls(monkeypatch)
    runs = [("prune", *checkpoint, "--out", str(tmp_path / "p1")),
            ("prune", *checkpoint, "--out", str(tmp_path / "p2"), "--finetune-epochs", "2", "--seed", "7"),
            ("compress", *checkpoint, "--out", str(tmp_path / "p3"), "--criterion", "taylor", "--target-macs", "0.4"),
            ("compress", *checkpoint, "--out", str(tmp_path / "p4"), "--speedup", "4", "--epochs", "2"),
            ("finetune", *checkpoint, "--out", str(tmp_path / "f1")),
            ("train", *data, "--out", str(tmp_path / "t1")),
            ("data", "synth", "--out", str(tmp_path / "s1")),
            ("data", "synth", "--out", str(tmp_path / "s2"), "--format", "jpg", "--seed", "3")]
    for args in runs:
        _run_command(run_main, *args)
    steps, budget = calls.config("prune_checkpoint"), calls.config("compress_checkpoint")
    finetuned, trained = calls.config("finetune_checkpoint"), calls.config("train_model")
    synth = calls.config("generate_synthetic")
    # nothing given: the dataclass itself, equal field by field
    assert steps[0] == PruneConfig()
    # --finetune-epochs N: fine-tuning as `fairdeploy finetune` does it, for N epochs; --seed reaches both
    assert steps[1] == PruneConfig(finetune=replace(FINETUNE_CONFIG, epochs=2, seed=7), seed=7)
    # a blind criterion gets its own control (fine-tuning alone), as BudgetConfig picks it
    assert budget[0] == BudgetConfig(criterion="taylor", target=0.4) and budget[0].control_run == "finetune-only"
    default = BudgetConfig()
    assert budget[1] == replace(default, target=0.25, finetune=replace(default.finetune, epochs=2))
    assert finetuned[0] == FINETUNE_CONFIG
    assert trained[0] == FitConfig()
    assert synth == [SynthConfig(), SynthConfig(image_format="jpg", seed=3)]


def test_validate_with_no_options_is_validation_config():
    from fairdeploy.cli.validate import validation_config
    from fairdeploy.validation import ValidationConfig

    assert validation_config() == ValidationConfig()
    assert validation_config(latency=True) == ValidationConfig()
    assert validation_config(batch_size=8, seed=2, workers=1) == ValidationConfig(batch_size=8, seed=2, workers=1)


@pytest.mark.parametrize("args, message", [
    (("prune", "--ratio", "1.5"), r"--ratio: ratio must be in \(0, 1\), got 1\.5"),
    (("prune", "--max-group-drop", "2"), r"--max-group-drop: max group drop must be in \[0, 1\], got 2\.0"),
    (("prune", "--target", "gap"), r"--target: unknown target 'gap'; choose one of eodd, eopp0, eopp1"),
    (("prune", "--method", "snnl", "--channels-per-round", "12"),
     r"--method, --channels-per-round: channels_per_round 12 is not a multiple of round_to 8"),
    (("compress", "--criterion", "magnitude", "--target-macs", "1.5"),
     r"--target-macs must keep a fraction in \(0, 1\) of the model, got 1\.5"),
    (("compress", "--criterion", "magnitude", "--target-macs", "0.5", "--distill", "2"),
     r"--distill: distillation weight must be in \[0, 1\], got 2\.0"),
    (("finetune", "--optimizer", "adam"), r"--optimizer: unknown optimizer 'adam'; choose one of adamw, sgd"),
    (("train", "--lr", "-0.1"), r"--lr: lr must be > 0, got -0\.1"),
])
def test_a_wrong_value_is_reported_with_its_flag(run_main, tmp_path, args, message):
    """The check runs on the built configuration; the message starts with the flag the user typed (no manifest
    or model is read first: --data and --model need not exist)."""
    command, *rest = args
    paths = ["--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    if command != "train":
        paths += ["--model", str(tmp_path / "ckpt")]
    code, _, err = run_main(command, *paths, *rest)
    assert code == 2
    assert re.match(rf"error: {message}", err.strip()), err


def test_synth_wrong_value_names_its_flag(run_main, tmp_path):
    code, _, err = run_main("data", "synth", "--out", str(tmp_path / "s"), "--n-images", "5")
    assert code == 2 and err.strip() == "error: --n-images: n_images must be at least 30, got 5"
    code, _, err = run_main("data", "synth", "--out", str(tmp_path / "s"), "--format", "gif")
    assert code == 2 and err.strip().startswith("error: --format: image_format must be png or jpg")


# ---- 8. the library's pruning, evaluation and calibration defaults: configs and functions agree ----

def test_configs_and_functions_that_share_a_setting_agree():
    """The method configs, the budget run's config, the criteria's ScoreData and the library functions' keyword
    defaults give a shared setting the same value, and the values are the ones prune.json / model.json / reports
    have always carried."""
    import dataclasses
    import inspect

    from fairdeploy.export.calibration import CalibrationRecipe
    from fairdeploy.export.int8 import quantize_qdq
    from fairdeploy.models.checkpoint import ModelSpec
    from fairdeploy.pruning._reference import group_curvature_loop
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.criteria import ScoreData
    from fairdeploy.pruning.curvature import group_curvature, group_gradient
    from fairdeploy.pruning.fairprune import FairPruneConfig
    from fairdeploy.pruning.removal import remove_channels, remove_to_budget
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.pruning.snnl import snnl_per_channel
    from fairdeploy.pruning.snnl_prune import SnnlConfig
    from fairdeploy.training.loop import evaluate_model
    from fairdeploy.training.predict import predict
    from fairdeploy.training.train import evaluate_checkpoint, train_model

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    fp, snnl, budget = FairPruneConfig(), SnnlConfig(), BudgetConfig()
    score = {f.name: f.default for f in dataclasses.fields(ScoreData)}
    # FairPrune's settings: its config, the budget run's, ScoreData's
    assert (budget.beta, budget.curvature, budget.score_samples, budget.score_batch_size, budget.round_to) == \
        (fp.beta, fp.curvature, fp.score_samples, fp.batch_size, fp.round_to) == (0.5, "fisher", 64, 32, 8)
    assert (score["beta"], score["curvature"], score["batch_size"]) == (fp.beta, fp.curvature, fp.batch_size)
    # SNNL's settings
    assert (budget.temperature, budget.snnl_batches, budget.snnl_batch_size, budget.round_to) == \
        (snnl.temperature, snnl.batches, snnl.batch_size, snnl.round_to) == (1.0, 4, 64, 8)
    assert (score["temperature"], score["snnl_batch_size"]) == (snnl.temperature, snnl.batch_size)
    assert default(snnl_per_channel, "temperature") == snnl.temperature
    assert snnl.channels_per_round == snnl.round_to  # the default is valid: one aligned block per round
    # channel removal
    for fn in (remove_channels, remove_to_budget):
        assert (default(fn, "round_to"), default(fn, "max_layer_ratio")) == (budget.round_to, budget.max_layer_ratio)
    assert budget.max_layer_ratio == 0.9
    # the curvature functions called directly (the methods pass their score batch)
    for fn in (group_curvature, group_curvature_loop):
        assert default(fn, "estimator") == fp.curvature
    assert {default(fn, "batch_size") for fn in (group_curvature, group_gradient, group_curvature_loop)} == {64}
    # the evaluation batch
    assert {default(predict, "batch_size"), default(evaluate_model, "batch_size"),
            default(evaluate_checkpoint, "batch_size"), PruneConfig().batch_size, budget.batch_size} == {64}
    # INT8 calibration and the model's input size
    recipe = CalibrationRecipe()
    assert (default(quantize_qdq, "method"), default(quantize_qdq, "percentile")) == (recipe.method, recipe.percentile)
    assert default(train_model, "image_size") == ModelSpec("resnet18", ("a", "b")).image_size == 224


def test_evaluate_and_train_options_left_unset_keep_the_library_defaults(run_main, monkeypatch, synth_manifest,
                                                                         tmp_path):
    """`evaluate` passes only the options given (evaluate_checkpoint's defaults otherwise); `train` without
    --image-size trains at ModelSpec's default size."""
    import fairdeploy.training.train as train_mod
    from fairdeploy.models.checkpoint import ModelSpec

    seen: list[dict] = []

    def fake_evaluate(model, manifest, *args, **kwargs):
        seen.append({"args": args, **kwargs})
        raise FairdeployError("captured")

    monkeypatch.setattr(train_mod, "evaluate_checkpoint", fake_evaluate)
    code, _, err = run_main("evaluate", "--model", str(tmp_path), "--data", str(synth_manifest))
    assert code == 2 and "captured" in err
    assert seen[0]["args"] == () and not {"split", "batch_size", "bootstrap", "workers", "seed"} & set(seen[0])
    run_main("evaluate", "--model", str(tmp_path), "--data", str(synth_manifest), "--split", "val",
             "--batch-size", "8", "--bootstrap", "0")
    assert (seen[1]["split"], seen[1]["batch_size"], seen[1]["bootstrap"]) == ("val", 8, 0)

    sizes: list[int] = []

    def fake_train(manifest, arch, out, cfg, image_size, *args, **kwargs):
        sizes.append(image_size)
        raise FairdeployError("captured")

    monkeypatch.setattr(train_mod, "train_model", fake_train)
    run_main("train", "--data", str(synth_manifest), "--out", str(tmp_path / "t"))
    run_main("train", "--data", str(synth_manifest), "--out", str(tmp_path / "u"), "--image-size", "32")
    assert sizes == [ModelSpec.image_size, 32]
