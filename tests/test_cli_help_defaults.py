"""Issue 20 §2: every command's --help shows the value of each default, read from the one place it is defined (a
dataclass field or a library function's keyword default), never a default named by its owner ("(default:
FitConfig's)") and never a literal written again. The options themselves stay None (tests/test_defaults_once.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer

# a default named by its owner instead of shown: "(default: FitConfig's)", "(default: Tolerances')"
OWNER_NAMED = re.compile(r"default: [^)]*'s?\)")
# the value a help text shows, after any "the profile's, else" / "the profile's or recipe's, else"
SHOWN = re.compile(r"\(default: (?:the profile's(?: or recipe's)?, else )?([^()]*)\)\.$")


def _params() -> dict[str, dict[str, object]]:
    """Every registered command by its full name ("data prepare"), recursing into groups: flag -> click parameter."""
    from fairdeploy.cli.app import app

    found: dict[str, dict[str, object]] = {}

    def walk(cmd: object, name: str) -> None:
        subcommands = getattr(cmd, "commands", None)
        if subcommands is not None:  # a group (the app, `data`, `config`)
            for sub_name, sub in subcommands.items():
                walk(sub, f"{name} {sub_name}".strip())
            return
        found[name] = {p.opts[0]: p for p in cmd.params}

    walk(typer.main.get_command(app), "")
    return found


def _shown(command: str, flag: str) -> str:
    param = _params()[command][flag]
    assert param.default is None, (command, flag, param.default)
    match = SHOWN.search(" ".join(param.help.split()))
    assert match, (command, flag, param.help)
    return match.group(1)


def test_the_pattern_catches_a_default_named_by_its_owner() -> None:
    """The control: the help texts this issue replaced match, a shown value does not."""
    for old in ("Training epochs (default: FitConfig's).", "Largest allowed drop (default: Tolerances').",
                "Random seed (default: 0, the paired bootstrap's).",
                "Q/DQ placement (default: the profile's or recipe's)."):
        assert OWNER_NAMED.search(old), old
    for new in ("Training epochs (default: 10).", "Calibration images (default: the profile's or recipe's, else 512).",
                ("Q/DQ placement (default: the profile's or recipe's, else the --int8-target's own: tensorrt for "
                 "tensorrt, ort-cpu for ort-cpu).")):
        assert not OWNER_NAMED.search(new), new


def test_no_help_names_a_default_by_its_owner() -> None:
    params = _params()
    assert {"train", "evaluate", "validate", "export", "data prepare", "data synth", "config show", "rank", "prune",
            "compress", "finetune"} <= set(params)  # the walk reached the groups' commands
    offenders = [f"{command} {flag}: {p.help}" for command, flags in params.items() for flag, p in flags.items()
                 if OWNER_NAMED.search(" ".join((p.help or "").split()))]
    assert offenders == []


def test_shown_values_are_the_dataclass_fields_and_keyword_defaults() -> None:
    """A few options of each command touched: the value shown is the field (or keyword default) read here."""
    import inspect

    from fairdeploy.data.adapters import prepare
    from fairdeploy.export.calibration import CalibrationRecipe
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import OnnxOptions, TrtOptions
    from fairdeploy.models.checkpoint import ModelSpec
    from fairdeploy.pruning.choose import RankConfig
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import evaluate_checkpoint
    from fairdeploy.validation import LatencyConfig, Tolerances, ValidationConfig

    def keyword(fn, name):
        return inspect.signature(fn).parameters[name].default

    fit, tolerances, latency, validation = FitConfig(), Tolerances(), LatencyConfig(), ValidationConfig()
    spec = ModelSpec("resnet18", ("a", "b"))
    expected = {
        ("train", "--epochs"): fit.epochs,
        ("train", "--batch-size"): fit.batch_size,
        ("train", "--lr"): fit.lr,
        ("train", "--optimizer"): fit.optimizer,
        ("train", "--image-size"): spec.image_size,
        ("evaluate", "--split"): keyword(evaluate_checkpoint, "split"),
        ("evaluate", "--bootstrap"): keyword(evaluate_checkpoint, "bootstrap"),
        ("evaluate", "--batch-size"): keyword(evaluate_checkpoint, "batch_size"),
        ("validate", "--split"): validation.split,
        ("validate", "--batch-size"): validation.batch_size,
        ("validate", "--bootstrap"): validation.bootstrap,
        ("validate", "--max-eodd-drift"): tolerances.max_eodd_drift,
        ("validate", "--max-group-accuracy-drop"): tolerances.max_group_accuracy_drop,
        ("validate", "--latency-iterations"): latency.iterations,
        ("validate", "--latency-warmup"): latency.warmup,
        ("validate", "--latency-batch"): max(latency.batch_sizes),
        ("export", "--opset"): OnnxOptions().opset,
        ("export", "--max-batch"): TrtOptions().max_batch,
        ("export", "--workspace-mib"): TrtOptions().workspace_mib,
        ("export", "--calib-size"): CalibrationRecipe().size,
        ("export", "--calib-method"): CalibrationRecipe().method,
        ("export", "--seed"): keyword(run_export, "seed"),
        ("data prepare", "--seed"): keyword(prepare, "seed"),
        ("rank", "--seed"): RankConfig().seed,
        ("rank", "--max-group-drop"): RankConfig().max_group_drop,
    }
    for (command, flag), value in expected.items():
        assert _shown(command, flag) == str(value), (command, flag)
    export = _params()["export"]
    assert f"(default: {keyword(run_export, 'check_split')};" in export["--check-split"].help  # mid-sentence
    # the profile (and for a [calibration] key the recipe) comes first: the help says so
    assert "(default: the profile's, else " in export["--opset"].help
    assert "(default: the profile's or recipe's, else " in export["--calib-size"].help


def test_switches_show_the_state_their_field_gives() -> None:
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    params = _params()
    assert _shown("train", "--amp") == str(FitConfig().amp).lower()
    assert _shown("validate", "--latency") == ("--no-latency" if ValidationConfig().latency is None else "--latency")
    assert params["validate"]["--latency"].secondary_opts == ["--no-latency"]


def test_a_default_is_read_from_a_function_signature_and_from_a_class_that_needs_arguments() -> None:
    """config_option reads a library function's keyword default, and a dataclass field whose class cannot be built
    without arguments (ModelSpec): a changed default changes the help."""
    from fairdeploy.cli.options import config_option, default_of

    def run(model: str, *, batch_size: int = 48, split: str = "val") -> None:
        """A library function whose keyword defaults a command shows."""

    @dataclasses.dataclass(frozen=True)
    class Spec:
        arch: str
        size: int = 96
        sizes: tuple[int, ...] = dataclasses.field(default_factory=lambda: (1, 4))

    assert config_option(run)("Batch size.", "batch_size").help == "Batch size (default: 48)."
    assert config_option(Spec)("Input size.", "size").help == "Input size (default: 96)."
    assert default_of(Spec, "sizes") == (1, 4)
    with pytest.raises(TypeError, match="has no default"):
        default_of(run, "model")
    with pytest.raises(TypeError, match="has no default"):
        default_of(Spec, "arch")
