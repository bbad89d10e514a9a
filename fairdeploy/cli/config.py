"""`fairdeploy config show COMMAND`: a command's full effective configuration as TOML, from its configuration
dataclass (the defaults, or with `--config FILE` merged by the loader the command itself uses). What it prints is
the file `--config` takes: it loads back to the same configuration."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from fairdeploy.cli.console import console
from fairdeploy.errors import FairdeployError

config_app = typer.Typer(help="Show a command's configuration: every setting with its value, as TOML.",
                         no_args_is_help=True)


@dataclass(frozen=True)
class CommandConfig:
    """A command's configuration: its dataclass's name, its defaults and how a TOML file is merged onto them."""

    what: str  # the dataclass, for the header line
    default: Callable[[], Any]
    load: Callable[[dict[str, Any], str], Any]  # a TOML table and its source -> the configuration


def command_configs() -> dict[str, CommandConfig]:
    """Every command with a configuration dataclass (imported here, when asked for)."""
    from fairdeploy.export.profiles import ExportOptions
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig, load_prune_config
    from fairdeploy.schema import load
    from fairdeploy.training.finetune import FINETUNE_CONFIG
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.validation import ValidationConfig

    def plain(cls: type, base: Any = None) -> Callable[[dict[str, Any], str], Any]:
        return lambda values, source: load(cls, values, source, base=base)

    return {
        "prune": CommandConfig("PruneConfig (fairdeploy.pruning.run)", PruneConfig, load_prune_config),
        "compress": CommandConfig("BudgetConfig (fairdeploy.pruning.budget)", BudgetConfig, plain(BudgetConfig)),
        "finetune": CommandConfig("FINETUNE_CONFIG, a FitConfig (fairdeploy.training.finetune)",
                                  lambda: FINETUNE_CONFIG, plain(FitConfig, FINETUNE_CONFIG)),
        "train": CommandConfig("FitConfig (fairdeploy.training.loop)", FitConfig, plain(FitConfig)),
        "export": CommandConfig("ExportOptions (fairdeploy.export.profiles)", ExportOptions, plain(ExportOptions)),
        "validate": CommandConfig("ValidationConfig (fairdeploy.validation)", ValidationConfig,
                                  plain(ValidationConfig)),
    }


def load_config(command: str, path: Path | None = None) -> Any:
    """`command`'s configuration: its defaults, or `path` (a TOML file of its fields) merged onto them by the
    command's own loader (not yet checked: `effective_config`). What `--config FILE` gives a command."""
    from fairdeploy.schema import read_toml

    configs = command_configs()
    if command not in configs:
        raise FairdeployError(f"no configuration for command {command!r}; choose one of {', '.join(configs)}")
    spec = configs[command]
    return spec.default() if path is None else spec.load(read_toml(path), str(path))


def effective_config(command: str, path: Path | None = None) -> Any:
    """`command`'s configuration: its defaults, or `path` (a TOML file of its fields) merged onto them, checked."""
    cfg = load_config(command, path)
    try:
        cfg.validate()
    except FairdeployError as exc:
        raise FairdeployError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return cfg


# ---- a configuration dataclass as TOML -----------------------------------------------------------------------

def to_toml(cfg: Any, header: str = "") -> str:
    """Every setting of the dataclass `cfg` (internal fields left out): its own keys first, then each sub-table
    as [name] (a nested one as [name.sub]). An optional sub-table that is off is `name = false`; an optional
    value that is unset is a comment line (TOML has no null, and leaving the key out keeps it unset)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += _table(cfg, "")
    return "\n".join(lines).strip("\n") + "\n"


def _table(cfg: Any, prefix: str) -> list[str]:
    from fairdeploy.schema import _dataclass_arm

    hints = typing.get_type_hints(type(cfg))
    own: list[str] = []
    subs: list[str] = []
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        value = getattr(cfg, f.name)
        sub = _dataclass_arm(hints[f.name])
        if sub is not None and value is not None:
            subs += ["", f"[{prefix}{f.name}]", *_table(value, f"{prefix}{f.name}.")]
        elif value is None:
            own.append(_unset_as_toml(f, sub, getattr(defaults, f.name, None), prefix))
        else:
            own.append(f"{f.name} = {toml_value(value)}")
    return own + subs


def _unset_as_toml(f: dataclasses.Field, sub: type | None, default: Any, prefix: str) -> str:
    """An unset (None) value as TOML: `false` for an optional sub-table; a field's own "off" value where its
    converter has one and the default is set (so that the file switches it off); else a comment."""
    if sub is not None:
        return f"{f.name} = false"
    convert = f.metadata.get("convert")
    if default is not None and convert is not None:
        for sentinel in (-1, "none", "off", ""):
            try:
                if convert(sentinel) is None:
                    return f"{f.name} = {toml_value(sentinel)}"
            except FairdeployError:
                continue
    if default is not None:
        raise FairdeployError(f"{prefix}{f.name} is unset, which a TOML file cannot say (its default is {default!r})")
    return f"# {f.name}: unset"


def toml_value(value: Any) -> str:
    """One TOML value: true/false, an integer, a float (inf / nan as TOML spells them), a basic string, a list or
    an inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise FairdeployError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def show_text(command: str, path: Path | None = None) -> str:
    """What `fairdeploy config show COMMAND [--config FILE]` prints."""
    cfg = effective_config(command, path)
    spec = command_configs()[command]
    source = "its defaults" if path is None else f"its defaults with {path} merged"
    takes = (f"the file `fairdeploy {command} --config FILE` takes (options given on the command line win)"
             if command in ("prune", "compress") else "a TOML table of these keys loads to this configuration")
    return to_toml(cfg, f"fairdeploy {command}: {spec.what}, {source}\n{takes}")


@config_app.command("show")
def show(
    command: Annotated[str, typer.Argument(help="prune, compress, finetune, train, export or validate.")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML file of the command's settings to merge onto its defaults (as the command's own "
                         "--config does).")] = None,
) -> None:
    """Print every setting of COMMAND with its value, as TOML: the defaults, or with --config FILE merged. The
    output is the file `--config` takes."""
    console.print(show_text(command, config), highlight=False, soft_wrap=True, markup=False, end="")
