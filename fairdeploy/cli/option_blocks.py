"""Option blocks: options several commands take together (`Images`, `Job`), declared once as frozen dataclasses.

A command takes a block as one parameter (`job: Job = Job()`) and is decorated with `option_blocks`: Typer sees the
block's fields as options (a block inside a block too), the command gets the block built from them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fairdeploy.cli.options import (
    AllowOutsideRootOpt,
    DeviceOpt,
    ImagesRootOpt,
    OverwriteOpt,
    SeedOpt,
    WorkersOpt,
    optional_option,
)
from fairdeploy.data.manifest import Manifest, read_manifest


@dataclasses.dataclass(frozen=True)
class Images:
    """Where a manifest's images are read from."""

    images_root: ImagesRootOpt = None
    allow_outside_root: AllowOutsideRootOpt = False

    def read(self, data: Path) -> Manifest:
        return read_manifest(data, self.images_root, allow_outside_root=self.allow_outside_root)


def _shared_default(name: str) -> str:
    """The default of `name` (seed, workers) as --help shows it: FitConfig's, which every configuration a Job feeds
    (FitConfig, FINETUNE_CONFIG, PruneConfig, BudgetConfig) shares (tests/test_defaults_once.py checks that)."""
    from fairdeploy.training.loop import FitConfig

    return str(getattr(FitConfig(), name))


@dataclasses.dataclass(frozen=True)
class Job:
    """The options of a command that computes on a manifest's images and writes --out (--workers and --seed left
    unset keep the command's configuration's defaults: FitConfig's, PruneConfig's, ..., all the same)."""

    device: DeviceOpt = "auto"
    workers: optional_option(WorkersOpt, _shared_default("workers")) = None  # type: ignore[valid-type]
    seed: optional_option(SeedOpt, _shared_default("seed")) = None  # type: ignore[valid-type]
    images: Images = Images()
    overwrite: OverwriteOpt = False


def _is_block(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _block_parameters(block: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(block, include_extras=True)
    out: list[inspect.Parameter] = []
    for f in dataclasses.fields(block):
        if _is_block(hints[f.name]):
            out += _block_parameters(hints[f.name])
        else:
            out.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                         annotation=hints[f.name]))
    return out


def _build_block(block: type, values: dict[str, Any]) -> Any:
    """The block from the options' values (taken out of `values`)."""
    hints = typing.get_type_hints(block, include_extras=True)
    return block(**{f.name: _build_block(hints[f.name], values) if _is_block(hints[f.name]) else values.pop(f.name)
                    for f in dataclasses.fields(block)})


def option_blocks(command: Callable[..., Any]) -> Callable[..., Any]:
    """Expand the command's block parameters (see Images, Job) into their options, in the signature Typer reads."""
    signature = inspect.signature(command, eval_str=True)
    blocks = {name: p.annotation for name, p in signature.parameters.items() if _is_block(p.annotation)}
    params: list[inspect.Parameter] = []
    for name, p in signature.parameters.items():
        params += _block_parameters(p.annotation) if name in blocks else [p]

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        built = {name: _build_block(block, values) for name, block in blocks.items()}  # takes their options out
        return command(**values, **built)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run
