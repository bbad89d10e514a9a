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
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    return {"train": [FitConfig], "evaluate": [], "finetune": [FitConfig], "prune": [PruneConfig, BudgetConfig],
            "validate": [ValidationConfig], "export": [ExportOptions], "report": [], "pipeline": [], "demo": [],
            "data prepare": [], "data inspect": [], "data synth": [SynthConfig]}


def _mappings() -> dict[str, list[tuple[type, dict, dict]]]:
    """(dataclass, option -> field path(s), flag overrides) as each command hands them to cli.common.configure."""
    from fairdeploy.cli import data, prune, train
    from fairdeploy.data.synth import SynthConfig
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig

    return {"prune": [(PruneConfig, prune.STEP_FIELDS, {}), (FitConfig, prune.STEP_FINETUNE_FIELDS, {}),
                      (BudgetConfig, prune.BUDGET_FIELDS, {})],
            "train": [(FitConfig, train.FIT_FIELDS, {})], "finetune": [(FitConfig, train.FIT_FIELDS, {})],
            "data synth": [(SynthConfig, data.SYNTH_FIELDS, data.SYNTH_FLAGS)]}


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


def _stop_at(monkeypatch: pytest.MonkeyPatch, target: str, index: int = 3) -> list:
    """Replace `target` with a fake that records its argument `index` (the config) and stops the command."""
    seen: list = []

    def fake(*args, **kwargs):
        seen.append(args[index])
        raise FairdeployError("captured")

    monkeypatch.setattr(target, fake)
    return seen


def test_unset_options_build_exactly_the_dataclass_defaults(run_main, monkeypatch, synth_manifest, tmp_path):
    from dataclasses import replace

    from fairdeploy.data.synth import SynthConfig
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.finetune import FINETUNE_CONFIG
    from fairdeploy.training.loop import FitConfig

    data = ("--data", str(synth_manifest))
    checkpoint = ("--model", str(tmp_path), *data)
    steps = _stop_at(monkeypatch, "fairdeploy.pruning.prune_checkpoint")
    budget = _stop_at(monkeypatch, "fairdeploy.pruning.budget.compress_checkpoint")
    finetuned = _stop_at(monkeypatch, "fairdeploy.training.finetune.finetune_checkpoint")
    trained = _stop_at(monkeypatch, "fairdeploy.training.train.train_model")
    synth = _stop_at(monkeypatch, "fairdeploy.data.synth.generate_synthetic", index=1)
    runs = [("prune", *checkpoint, "--out", str(tmp_path / "p1")),
            ("prune", *checkpoint, "--out", str(tmp_path / "p2"), "--finetune-epochs", "2", "--seed", "7"),
            ("prune", *checkpoint, "--out", str(tmp_path / "p3"), "--criterion", "taylor", "--target-macs", "0.4"),
            ("prune", *checkpoint, "--out", str(tmp_path / "p4"), "--speedup", "4", "--batch-size", "16"),
            ("finetune", *checkpoint, "--out", str(tmp_path / "f1")),
            ("train", *data, "--out", str(tmp_path / "t1")),
            ("data", "synth", "--out", str(tmp_path / "s1")),
            ("data", "synth", "--out", str(tmp_path / "s2"), "--format", "jpg", "--seed", "3")]
    for args in runs:
        code, _, err = run_main(*args)
        assert code == 2 and "captured" in err, (args, err)
    # nothing given: the dataclass itself, equal field by field
    assert steps[0] == PruneConfig()
    # --finetune-epochs N: fine-tuning as `fairdeploy finetune` does it, for N epochs; --seed reaches both
    assert steps[1] == PruneConfig(finetune=replace(FINETUNE_CONFIG, epochs=2, seed=7), seed=7)
    # a blind criterion gets its own control (fine-tuning alone), as BudgetConfig picks it
    assert budget[0] == BudgetConfig(criterion="taylor", target=0.4) and budget[0].control == "finetune-only"
    default = BudgetConfig()
    assert budget[1] == replace(default, target=0.25, batch_size=16, finetune=replace(default.finetune, batch_size=16))
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
    (("prune", "--beta", "-1"), r"--beta must be in \(0, 1\], got -1\.0"),
    (("prune", "--max-f1-drop", "2"), r"--max-f1-drop: max F1 drop must be in \[0, 1\], got 2\.0"),
    (("prune", "--target", "gap"), r"--target: unknown target 'gap'; choose one of eodd, eopp0, eopp1"),
    (("prune", "--method", "snnl", "--channels-per-round", "12"),
     r"--channels-per-round 12 is not a multiple of --round-to 8"),
    (("prune", "--finetune-epochs", "1", "--finetune-lr", "0"), r"--finetune-lr: lr must be > 0, got 0\.0"),
    (("prune", "--criterion", "magnitude", "--target-macs", "1.5"),
     r"--target-macs: the budget must keep a fraction in \(0, 1\) of the macs, got 1\.5"),
    (("prune", "--criterion", "magnitude", "--target-macs", "0.5", "--distill", "2"),
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


# ---- 8. the library's pruning, evaluation and interval defaults: each value written once, in its home ----

# (home module, the constant or Class.field that holds the value, the names the setting goes by in the package).
# The batch sizes are checked by agreement below: `batch_size` names several settings (training, evaluation,
# scoring, calibration).
LIBRARY_DEFAULTS = [
    ("pruning.structured", "DEFAULT_ROUND_TO", ("round_to", "channels_per_round")),
    ("pruning.removal", "DEFAULT_MAX_LAYER_RATIO", ("max_layer_ratio",)),
    ("pruning.saliency", "DEFAULT_BETA", ("beta",)),
    ("pruning.curvature", "DEFAULT_ESTIMATOR", ("curvature", "estimator")),
    ("pruning.scoresets", "DEFAULT_SCORE_SAMPLES", ("score_samples",)),
    ("pruning.scoresets", "DEFAULT_SCORE_BATCH_SIZE", ("score_batch_size",)),
    ("pruning.snnl", "DEFAULT_SNNL_TEMPERATURE", ("temperature",)),
    ("pruning.snnl", "DEFAULT_SNNL_BATCHES", ("snnl_batches", "batches")),
    ("pruning.snnl", "DEFAULT_SNNL_BATCH_SIZE", ("snnl_batch_size",)),
    ("metrics.bootstrap", "DEFAULT_N_BOOT", ("n_boot", "bootstrap")),
    ("metrics.fairness", "DEFAULT_CONFIDENCE", ("confidence",)),
    ("export.calibration", "CalibrationRecipe.percentile", ("percentile",)),
    ("models.checkpoint", "ModelSpec.image_size", ("image_size",)),
]
_LITERAL = r"""(-?[0-9][0-9_]*(?:\.[0-9_]*)?(?:e-?[0-9]+)?|"[^"\n]*"|'[^'\n]*')"""


def _literal_defaults(names: tuple[str, ...]) -> list[tuple[str, object]]:
    """(file, value) of every literal a setting of one of `names` is given outside cli/ (whose flags section 7
    checks): `name: type = v`, `name=v` and `.get("name", v)` / `.pop("name", v)`."""
    import ast

    alt = "|".join(names)
    patterns = [re.compile(rf"\b(?:{alt})\b\s*(?::[^=\n]*)?=\s*{_LITERAL}"),
                re.compile(rf"""\.(?:get|pop)\(\s*["'](?:{alt})["']\s*,\s*{_LITERAL}\s*\)""")]
    hits = []
    for py in sorted(PACKAGE.rglob("*.py")):
        rel = py.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/"):
            continue
        for line in py.read_text().splitlines():
            for pattern in patterns:
                hits += [(rel, ast.literal_eval(m.group(1) if m.group(1)[0] in "\"'" else m.group(1).replace("_", "")))
                         for m in pattern.finditer(line)]
    return hits


@pytest.mark.parametrize("module, home, names", LIBRARY_DEFAULTS, ids=[h for _, h, _ in LIBRARY_DEFAULTS])
def test_library_default_is_written_once_in_its_home(module, home, names):
    import ast
    import importlib

    mod = importlib.import_module(f"fairdeploy.{module}")
    holder, _, attr = home.rpartition(".")
    value = getattr(getattr(mod, holder) if holder else mod, attr)
    path = PACKAGE / (module.replace(".", "/") + ".py")
    same = [h for h in _literal_defaults(names) if h[1] == value]
    if holder:  # a dataclass field is the home: its own line is the one literal
        assert same == [(path.relative_to(PACKAGE).as_posix(), value)], same
    else:  # a module constant is the home: every user names it
        assert same == [], same
        text = path.read_text()
        assert [ast.literal_eval(v) for v in re.findall(rf"^{attr} = (\S+)", text, flags=re.MULTILINE)] == [value]


def test_configs_and_functions_that_share_a_setting_agree():
    """The method configs, the budget run's config, the criteria's ScoreData and the library functions' keyword
    defaults give a shared setting the same value, and the values are the ones prune.json / model.json / reports
    have always carried."""
    import dataclasses
    import inspect

    from fairdeploy.export.calibration import CalibrationRecipe
    from fairdeploy.export.int8 import quantize_qdq
    from fairdeploy.metrics import bootstrap_difference_intervals, bootstrap_intervals, compute_metrics
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
    from fairdeploy.validation import ValidationConfig

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
    # bootstrap resamples and interval level
    assert {default(bootstrap_intervals, "n_boot"), default(bootstrap_difference_intervals, "n_boot"),
            default(evaluate_checkpoint, "bootstrap"), ValidationConfig().bootstrap} == {1000}
    assert {default(bootstrap_intervals, "confidence"), default(bootstrap_difference_intervals, "confidence"),
            default(compute_metrics, "confidence")} == {0.95}
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
