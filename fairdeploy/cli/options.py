"""Options declared once for several commands, their defaults shown from a configuration dataclass, and that
dataclass built from a command's options (`configure`)."""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")

threads_option: int | None = None  # the global --threads, when given (it wins over a pipeline's `threads`)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (model.safetensors + model.json).")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Manifest CSV (image,label,group,split,...).")]
ImagesRootOpt = Annotated[
    Path | None, typer.Option("--images-root", help="Folder the manifest's image paths are relative to (default: the manifest's folder).")
]
AllowOutsideRootOpt = Annotated[
    bool,
    typer.Option("--allow-outside-root", help="Read manifest image paths that leave the images root ('../', absolute "
                                              "paths, symlinks pointing outside); refused by default."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Manifest split: train, val or test.")]


def check_split(split: str) -> str:
    """--split checked before any data or model is loaded."""
    from fairdeploy.data.manifest import SPLITS
    from fairdeploy.errors import FairdeployError

    if split not in SPLITS:
        raise FairdeployError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    return split

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Write --out even when it exists and is not an earlier output of this command "
                                     "(a folder is replaced; by default such an --out is refused)."),
]


def optional_option(option: Any, default: str) -> Any:
    """A shared `option` (Annotated[T, typer.Option]) for a command whose configuration dataclass holds the default:
    T | None (None: not given, the field keeps its default), the help ending "(default: DEFAULT)"."""
    kind, info = typing.get_args(option)
    info = copy.copy(info)
    info.help = f"{(info.help or '').rstrip('.')} (default: {default})."
    return Annotated[kind | None, info]


# ---- literal defaults in --help, read from a command's configuration dataclass (the value stays on the field) ----

def default_of(config: Any, path: str) -> Any:
    """The value at the dotted field `path` of `config`: a dataclass (read from its defaults) or an instance."""
    value: Any = config() if isinstance(config, type) else config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def shown_default(value: Any) -> str:
    """A default as --help shows it: true / false, none, a list as a,b, else the value itself."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def config_option(config: Any) -> Callable[..., Any]:
    """The option factory of a command whose defaults are the fields of `config` (a dataclass or an instance):
    `opt(help, path=None, *names, **kw)` is a typer.Option whose help ends "(default: VALUE)", VALUE read from
    `config` at the dotted field `path` (no path: the help as written). The option itself defaults to None (not
    given: the field keeps its default), so the value is written once, on the field."""
    def opt(help_text: str, path: str | None = None, *names: str, **kw: Any) -> Any:
        if path is not None:
            help_text = f"{help_text.rstrip('.')} (default: {shown_default(default_of(config, path))})."
        return typer.Option(*names, help=help_text, **kw)

    return opt


def options_defaulting_to(owner: str) -> Callable[..., Any]:
    """The option factory `opt(help, *names, **kw)` of options whose help ends "(default: OWNER's)": `owner` names
    the configuration holding their defaults (the option itself defaults to None: not given, it keeps them)."""
    def opt(help_text: str, *names: str, **kw: Any) -> Any:
        return typer.Option(*names, help=f"{help_text.rstrip('.')} (default: {owner}'s).", **kw)

    return opt


# ---- a configuration dataclass from a command's options (fairdeploy.schema): each default is the field's ----

def configure(cls: type[T], fields: Mapping[str, str | tuple[str, ...]], options: Mapping[str, Any], *,
              base: T | None = None, flags: Mapping[str, str] | None = None) -> T:
    """`base` (default `cls()`) with the command's options over it, checked by its `validate()`.

    `fields` maps each option (its parameter name) to the dotted field path(s) it sets; `options` holds the values
    (None: not given, the field keeps its default, so no default is written in the CLI). A wrong value is reported
    with its flag (--NAME, or `flags[NAME]`): the type check names it (fairdeploy.schema), and a failed
    `validate()` is prefixed with the flag(s) whose value it is about, found by leaving each given option out."""
    from fairdeploy.errors import FairdeployError
    from fairdeploy.schema import build, flag_layer

    names = {name: (flags or {}).get(name) or "--" + name.replace("_", "-") for name in fields}

    def built(leave_out: str | None = None) -> T:
        # an option not given (None) sets nothing: a sub-table is not switched on by options that are all unset
        given = {path: (names[name], options.get(name) if name != leave_out else None)
                 for name, paths in fields.items() for path in ((paths,) if isinstance(paths, str) else paths)}
        return build(cls, [flag_layer(given)], base)[0]

    def problem(cfg: T) -> str | None:
        try:
            cfg.validate()  # type: ignore[attr-defined]
        except FairdeployError as exc:
            return str(exc)
        return None

    cfg = built()
    message = problem(cfg)
    if message is None:
        return cfg
    culprits = list(dict.fromkeys(names[name] for name in fields if options.get(name) is not None
                                  and problem(built(leave_out=name)) != message))
    if not culprits or any(re.search(rf"{re.escape(flag)}(?![\w-])", message) for flag in culprits):
        raise FairdeployError(message)  # no option to blame, or the message names it already
    raise FairdeployError(f"{', '.join(culprits)}: {message}")
