"""Options declared once for several commands, their defaults shown from a configuration dataclass (or a library
function's keyword defaults), and that dataclass built from a command's options (`configure`)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
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
    """The value at the dotted field `path` of `config`: a dataclass (its field's default: a class with fields
    that have none, like ModelSpec, works too), an instance, or a function (the first part of `path` names a
    keyword parameter; its default is read from the signature)."""
    first, *rest = path.split(".")
    if inspect.isfunction(config):
        value: Any = keyword_default(config, first)
    elif isinstance(config, type):
        value = field_default(config, first)
    else:
        value = getattr(config, first)
    for part in rest:
        value = getattr(value, part)
    return value


def field_default(cls: type, name: str) -> Any:
    """The default of the dataclass `cls`'s field `name` (its default_factory called)."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    raise TypeError(f"{cls.__qualname__}'s field {name!r} has no default")


def keyword_default(function: Callable[..., Any], name: str) -> Any:
    """The default of `function`'s parameter `name` (written once, in its signature)."""
    default = inspect.signature(function).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{function.__qualname__}'s parameter {name!r} has no default")
    return default


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
    """The option factory of a command whose defaults are the fields of `config` (a dataclass or an instance) or the
    keyword defaults of a library function: `opt(help, path=None, *names, **kw)` is a typer.Option whose help ends
    "(default: VALUE)", VALUE read from `config` at the dotted field `path` (no path: the help as written). The
    option itself defaults to None (not given: the field keeps its default), so the value is written once, there."""
    def opt(help_text: str, path: str | None = None, *names: str, **kw: Any) -> Any:
        if path is not None:
            help_text = f"{help_text.rstrip('.')} (default: {shown_default(default_of(config, path))})."
        return typer.Option(*names, help=help_text, **kw)

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
