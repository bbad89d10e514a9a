"""`fairdeploy config show COMMAND` and `prune --config FILE` (issue 20 §2): the printed TOML loads back through the
command's own loader to the same configuration (defaults, and with a file merged), `prune` takes what it prints,
its options show their dataclass defaults, and options that left it or contradict each other get one line."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import typer

from fairdeploy.errors import FairdeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMANDS = ("prune", "compress", "finetune", "train", "export", "validate")


def _load_back(command: str, text: str):
    """The printed TOML through the loader `command`'s configuration is read with (fairdeploy.cli.config)."""
    from fairdeploy.cli.config import command_configs

    return command_configs()[command].load(tomllib.loads(text), "printed")


def _show(run_main, *args: str) -> str:
    code, out, err = run_main("config", "show", *args)
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_printed_defaults_load_back_to_the_defaults(command: str, run_main) -> None:
    from fairdeploy.cli.config import command_configs

    text = _show(run_main, command)
    default = command_configs()[command].default()
    assert _load_back(command, text) == default
    # every setting is written out (an unset one as a comment): the file alone, loaded onto the plain dataclass's
    # defaults, gives the command's configuration too (FINETUNE_CONFIG differs from FitConfig())
    from fairdeploy.schema import load

    assert load(type(default), tomllib.loads(text), "printed") == default
    assert text.startswith(f"# fairdeploy {command}: ")


# A file for each command that changes a top-level value, a value in a sub-table, a list or an optional sub-table,
# and the configuration it must give (built here by hand from the dataclasses).
def _merged_cases():
    from fairdeploy.export.profiles import ExportOptions
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.constrained import ConstrainedRecovery
    from fairdeploy.training.finetune import FINETUNE_CONFIG
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    r = dataclasses.replace
    prune, budget, export, validation = PruneConfig(), BudgetConfig(), ExportOptions(), ValidationConfig()
    return {
        # a [finetune] table fine-tunes after every step with FINETUNE_CONFIG's values where it is silent; the
        # file's seed is the fine-tuning's too
        "prune": ('method = "snnl"\nseed = 4\nprivileged = "light"\n[snnl]\nlayers = "layer3.1.conv2"\n'
                  'max_channels = 32\n[finetune]\nepochs = 2\n[guard]\nselect = "last"\n',
                  r(prune, method="snnl", seed=4, privileged="light",
                    snnl=r(prune.snnl, layers="layer3.1.conv2", max_channels=32),
                    finetune=r(FINETUNE_CONFIG, epochs=2, seed=4), guard=r(prune.guard, select="last"))),
        "compress": ('criterion = "fairprune"\ntarget = 0.5\n[finetune]\nepochs = 2\n[finetune.constrained]\n'
                     'dual_lr = 0.1\n',
                     r(budget, criterion="fairprune", target=0.5,
                       finetune=r(budget.finetune, epochs=2, constrained=ConstrainedRecovery(dual_lr=0.1)))),
        "finetune": ("lr = 0.01\nbalance = \"group\"\n", r(FINETUNE_CONFIG, lr=0.01, balance="group")),
        "train": ("epochs = 3\namp = false\n", FitConfig(epochs=3, amp=False)),
        "export": ('description = "edge"\n[onnx]\nprecision = ["fp16", "int8"]\n[tensorrt]\nenabled = "auto"\n'
                   "dla_core = 0\nmin_batch = 1\nopt_batch = 1\nmax_batch = 1\n",
                   r(export, description="edge", onnx=r(export.onnx, precision=("fp16", "int8")),
                     tensorrt=r(export.tensorrt, enabled="auto", dla_core=0, opt_batch=1, max_batch=1))),
        "validate": ("split = \"val\"\nlatency = false\n[tolerances]\nmin_agreement = 0.99\n",
                     r(validation, split="val", latency=None, tolerances=r(validation.tolerances, min_agreement=0.99))),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_a_merged_file_is_printed_in_full_and_loads_back_to_the_same_configuration(command: str, run_main,
                                                                                  tmp_path: Path) -> None:
    text, expected = _merged_cases()[command]
    path = tmp_path / f"{command}.toml"
    path.write_text(text)
    printed = _show(run_main, command, "--config", str(path))
    assert f"with {path} merged" in printed.splitlines()[0]
    assert _load_back(command, printed) == expected
    again = tmp_path / "again.toml"  # what was printed is itself a --config file that prints the same
    again.write_text(printed)
    assert _show(run_main, command, "--config", str(again)).splitlines()[2:] == printed.splitlines()[2:]


def test_unset_and_switched_off_settings_are_written_so_that_they_load_back(run_main, tmp_path: Path) -> None:
    """TOML has no null: an optional sub-table that is off is `= false`, a setting whose converter has an "off"
    value that one, an unset value with no default a comment (leaving the key out keeps it unset)."""
    text = _show(run_main, "prune")
    assert "\nfinetune = false\n" in text and "\n# privileged: unset\n" in text
    assert "\n# max_channels: unset\n" in text and "\n# target_value: unset\n" in text
    path = tmp_path / "export.toml"
    path.write_text('[tensorrt]\ntiming_cache = "off"\n')  # TrtOptions' converter: "off" = no cache
    printed = _show(run_main, "export", "--config", str(path))
    assert '\ntiming_cache = "none"\n' in printed  # the converter's own spelling of "off"
    assert _load_back("export", printed).tensorrt.timing_cache is None


def test_config_show_refuses_in_one_line(run_main, tmp_path: Path) -> None:
    code, _, err = run_main("config", "show", "pruen")
    assert code == 2 and err.strip() == ("error: no configuration for command 'pruen'; choose one of prune, compress, "
                                         "finetune, train, export, validate")
    path = tmp_path / "p.toml"
    path.write_text("[fairprune]\nbta = 0.3\n")
    code, _, err = run_main("config", "show", "prune", "--config", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{path}: unknown key 'bta' in [fairprune]; valid keys: granularity, curvature, beta" in err
    path.write_text('method = "snnl"\n[snnl]\nround_to = 3\n')  # the default 8 channels per round: not aligned
    code, _, err = run_main("config", "show", "prune", "--config", str(path))
    assert code == 2 and err.strip() == (f"error: {path}: channels_per_round 8 is not a multiple of round_to 3 (channel "
                                         "counts stay aligned); change one of them (round_to = 1 disables alignment)")


# ---- `prune`: its options, --config, and what it refuses ---------------------------------------------------

def _prune_command():
    from fairdeploy.cli.app import app

    return typer.main.get_command(app).commands["prune"]


def test_prune_has_at_most_20_options_each_showing_its_dataclass_default() -> None:
    from fairdeploy.cli.options import default_of, shown_default
    from fairdeploy.cli.prune import PRUNE_FIELDS
    from fairdeploy.pruning.run import PruneConfig

    command = _prune_command()
    options = [p for p in command.params if p.param_type_name == "option"]
    assert len(options) <= 20
    for p in options:
        if p.name in PRUNE_FIELDS and p.name not in ("workers", "seed"):  # Job's two say "the configuration's"
            path = PRUNE_FIELDS[p.name]
            want = shown_default(default_of(PruneConfig, path if isinstance(path, str) else path[0]))
            assert p.help.endswith(f"(default: {want}).") and p.default is None, (p.name, p.help)
    flags = {o for p in options for o in p.opts}
    # the budget options are `compress`'s, the rarely used ones keys of --config
    assert not flags & {"--criterion", "--speedup", "--target-macs", "--beta", "--batch-size", "--layers"}
    assert {"--config", "--method", "--finetune-epochs"} <= flags


def test_defaults_shown_follow_the_dataclass(monkeypatch) -> None:
    """The help text is read from the field: a changed default changes the help (nothing is copied into it)."""
    from fairdeploy.cli.options import config_option

    @dataclasses.dataclass(frozen=True)
    class Inner:
        ratio: float = 0.25
        sizes: tuple[int, ...] = (1, 8)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        on: bool = True
        name: str | None = None

    opt = config_option(Outer)
    assert opt("Ratio.", "inner.ratio").help == "Ratio (default: 0.25)."
    assert opt("Sizes.", "inner.sizes").help == "Sizes (default: 1,8)."
    assert (opt("On.", "on").help, opt("Name.", "name").help) == ("On (default: true).", "Name (default: none).")
    assert config_option(Outer(inner=Inner(ratio=0.5)))("Ratio.", "inner.ratio").help == "Ratio (default: 0.5)."
    assert opt("As written.").help == "As written."


def _record_prune(monkeypatch) -> list:
    import fairdeploy.pruning

    seen: list = []

    def record(model, manifest, out, cfg, device, progress):
        seen.append(cfg)
        raise FairdeployError("captured")

    monkeypatch.setattr(fairdeploy.pruning, "prune_checkpoint", record)
    return seen


def test_prune_takes_what_config_show_prints_and_its_options_win(run_main, monkeypatch, synth_manifest,
                                                                 tmp_path: Path) -> None:
    from fairdeploy.cli.config import effective_config
    from fairdeploy.training.finetune import FINETUNE_CONFIG

    seen = _record_prune(monkeypatch)
    common = ("prune", "--model", str(tmp_path), "--data", str(synth_manifest))
    text, expected = _merged_cases()["prune"]
    path = tmp_path / "prune.toml"
    path.write_text(text)
    printed = tmp_path / "printed.toml"
    printed.write_text(_show(run_main, "prune", "--config", str(path)))
    for i, config in enumerate((path, printed)):
        code, _, err = run_main(*common, "--out", str(tmp_path / f"o{i}"), "--config", str(config))
        assert code == 2 and "captured" in err
    assert seen == [expected, expected] == [effective_config("prune", path)] * 2
    # options over the file: --steps, --privileged and the job's seed (the fine-tuning's too), --finetune-epochs
    # keeps the file's other fine-tuning settings; 0 switches it off
    code, _, err = run_main(*common, "--out", str(tmp_path / "o2"), "--config", str(path), "--steps", "3",
                            "--privileged", "dark", "--seed", "9", "--finetune-epochs", "1")
    assert code == 2 and "captured" in err
    assert seen[-1] == dataclasses.replace(expected, stop=dataclasses.replace(expected.stop, steps=3), seed=9,
                                           privileged="dark",
                                           finetune=dataclasses.replace(expected.finetune, epochs=1, seed=9))
    run_main(*common, "--out", str(tmp_path / "o3"), "--config", str(path), "--finetune-epochs", "0")
    assert seen[-1].finetune is None
    run_main(*common, "--out", str(tmp_path / "o4"), "--finetune-epochs", "2")  # no file: FINETUNE_CONFIG's values
    assert seen[-1].finetune == dataclasses.replace(FINETUNE_CONFIG, epochs=2)


@pytest.mark.parametrize(("args", "message"), [
    (("--criterion", "magnitude", "--speedup", "2"),
     "--criterion: compression to a MAC budget or a per-group tolerance is `fairdeploy compress --criterion`"),
    (("--target-params=0.5",), '`fairdeploy compress --config FILE` with metric = "params" and target = F'),
    (("--keep-rounds",), "`fairdeploy compress` keeps them by default"),
    (("--beta", "0.3"), "--beta is a setting of `fairdeploy prune --config FILE`: [fairprune] beta"),
    (("--no-guard",), "--no-guard is a setting of `fairdeploy prune --config FILE`: [guard] protect_unprivileged = "
                      "false"),
    (("--method", "snnl", "--ratio", "0.1"), "--ratio is a FairPrune option, not used with --method snnl"),
    (("--method", "snnl", "--granularity", "channel", "--ratio", "0.1"),
     "--granularity, --ratio are FairPrune options, not used with --method snnl"),
    (("--channels-per-round", "16"), "--channels-per-round is an SNNL option, not used with --method fairprune (the "
                                     "default)"),
    (("--granularity", "2:4", "--ratio", "0.1"),
     "--ratio is not used with --granularity 2:4 (2:4 sparsity is reached in one step)"),
])
def test_prune_refuses_moved_and_contradictory_options_in_one_line_before_reading_anything(run_main, monkeypatch,
                                                                                          tmp_path, args, message):
    import fairdeploy.cli.option_blocks as option_blocks_cli

    def never(*_a, **_k):
        raise AssertionError("the manifest was read")

    monkeypatch.setattr(option_blocks_cli, "read_manifest", never)
    code, out, err = run_main("prune", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                              str(tmp_path / "o"), *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_the_method_a_config_file_sets_decides_what_is_contradictory(run_main, monkeypatch, tmp_path) -> None:
    seen = _record_prune(monkeypatch)
    path = tmp_path / "snnl.toml"
    path.write_text('method = "snnl"\n')
    code, _, err = run_main("prune", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                            str(tmp_path / "o"), "--config", str(path), "--ratio", "0.1")
    assert code == 2 and "--ratio is a FairPrune option, not used with --method snnl (from --config)" in err
    assert seen == []


def test_a_bad_value_from_the_file_names_the_file_and_one_from_an_option_the_option(run_main, tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[fairprune]\nratio = 1.5\n")
    args = ("prune", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"))
    code, _, err = run_main(*args, "--config", str(path))
    assert code == 2 and err.strip() == f"error: {path}: ratio must be in (0, 1), got 1.5"
    code, _, err = run_main(*args, "--config", str(path), "--ratio", "0.01")  # the option wins: valid
    assert "ratio" not in err
    path.write_text("[fairprune]\nratio = 0.1\n")
    code, _, err = run_main(*args, "--config", str(path), "--ratio", "2")
    assert code == 2 and err.strip() == "error: --ratio: ratio must be in (0, 1), got 2.0"
    path.write_text('[fairprune]\nratio = "half"\n')
    code, _, err = run_main(*args, "--config", str(path))
    assert code == 2 and re.match(rf"error: {re.escape(str(path))}: \[fairprune\] ratio must be a number, got 'half'",
                                  err.strip()), err
