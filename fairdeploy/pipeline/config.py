"""PipelineConfig: the TOML file `fairdeploy pipeline` runs (see fairdeploy/pipeline/demo.toml)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.schema import check_type, load, read_toml

DEMO_CONFIG = Path(__file__).with_name("demo.toml")


BUDGET_KEYS = ("target_macs", "target_params", "speedup")


@dataclass(frozen=True)
class PruneEntry:
    """One [[prune]] table: FairPrune / SNNL steps (`method = ...`: PruneConfig's fields, its sub-tables
    `fairprune`, `snnl`, `stop`, `guard`, `finetune`, and `finetune_after`), or a compression run (`criterion =
    ...`: BudgetConfig's fields, `finetune` its recovery fine-tuning, and one of target_macs / target_params /
    speedup, or none of them to compress as far as every group stays within max_group_drop) that also runs its
    control."""

    name: str
    method: str  # "fairprune", "snnl", or "budget" for a `criterion = ...` table
    options: dict[str, Any] = field(default_factory=dict)
    criterion: str | None = None  # budget runs only
    # `finetune_after = { epochs = 2 }`: a separate fine-tuning stage after pruning, `fairdeploy finetune` in the
    # pipeline: keys left out keep FINETUNE_CONFIG's values (fairdeploy.training.finetune); None or epochs = 0: none
    finetune_after_table: dict[str, Any] | None = None
    source: str = "[[prune]]"  # where the table was written, for messages

    @property
    def is_budget(self) -> bool:
        return self.criterion is not None

    @property
    def where(self) -> str:
        return f"{self.source} {self.name}"

    def finetune_after(self, seed: int) -> Any:
        """The FitConfig of the separate fine-tuning stage after pruning: the table over `fairdeploy finetune`'s
        defaults (FINETUNE_CONFIG) with the pipeline's seed; None without one (or epochs = 0)."""
        if self.finetune_after_table is None:
            return None
        from fairdeploy.schema import load
        from fairdeploy.training.finetune import FINETUNE_CONFIG
        from fairdeploy.training.loop import FitConfig

        fit = load(FitConfig, self.finetune_after_table, self.where, "finetune_after",
                   base=replace(FINETUNE_CONFIG, seed=seed))
        if fit.epochs <= 0:
            return None
        fit.validate()  # resolve_pipeline calls this before anything is written
        return fit


@dataclass(frozen=True)
class DataTable:
    """[data]: exactly one of `synth = {...}` (SynthConfig's table, checked when resolved) or `manifest`."""

    synth: dict[str, Any] | None = None
    manifest: str | None = None
    images_root: str | None = None
    allow_outside_root: bool = False  # or `pipeline --allow-outside-root`


@dataclass(frozen=True)
class PipelineFile:
    """The top level of a pipeline file, read by the generic loader (fairdeploy.schema); the tables it leaves as
    dicts are built into the library's dataclasses by fairdeploy.pipeline.resolve, by the same loader."""

    title: str = "fairdeploy pipeline"
    device: str = "auto"
    seed: int = 0
    nproc: int = 1  # > 1: the train / prune / finetune stages run under torchrun with this many processes
    threads: int | None = None  # torch CPU threads (`fairdeploy pipeline` sets them; the global --threads wins)
    data: DataTable = field(default_factory=DataTable)
    model: dict[str, Any] = field(default_factory=dict)  # arch / checkpoint, image_size and FitConfig's keys
    prune: list[dict[str, Any]] = field(default_factory=list)  # [[prune]] tables (PruneEntry)
    export: dict[str, Any] = field(default_factory=dict)  # ExportOptions' table
    validate: dict[str, Any] = field(default_factory=dict)  # ValidationConfig's table


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file as read: PipelineFile's values, paths made absolute, [[prune]] tables as PruneEntry."""

    source: str
    title: str
    device: str
    seed: int
    nproc: int
    threads: int | None
    synth: dict[str, Any] | None
    manifest: str | None
    images_root: str | None
    allow_outside_root: bool
    model: dict[str, Any]
    prune: tuple[PruneEntry, ...]
    export: dict[str, Any]
    validate: dict[str, Any]

    def with_overrides(
        self,
        synth: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        prune: dict[str, dict[str, Any]] | None = None,
        export: dict[str, Any] | None = None,
        validate: dict[str, Any] | None = None,
    ) -> PipelineConfig:
        """A copy with some settings replaced (e.g. the tiny demo used by the tests); `prune` is keyed by entry name."""
        if synth and self.synth is None:
            raise FairdeployError(f"{self.source}: synthetic-data overrides need a synthetic-data pipeline")
        return replace(
            self,
            synth={**self.synth, **(synth or {})} if self.synth is not None else None,
            model={**self.model, **(model or {})},
            prune=tuple(replace(e, options={**e.options, **(prune or {}).get(e.name, {})}) for e in self.prune),
            export=deep_merge(self.export, export or {}),
            validate=deep_merge(self.validate, validate or {}),
        )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s keys replacing its own; sub-tables merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def beside(config_file: Path, path: str) -> str:
    """A path written in a pipeline file: absolute as given, relative to the file's folder."""
    return path if os.path.isabs(path) else str((config_file.parent / path).resolve())


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"pipeline config {p} not found")
    raw = read_toml(p)
    source = str(p)
    top = load(PipelineFile, raw, source)
    if top.threads is not None and top.threads < 1:
        raise FairdeployError(f"{source}: threads must be >= 1 (torch CPU threads), got {top.threads}")
    if top.nproc < 1:
        raise FairdeployError(f"{source}: nproc must be >= 1 (processes per stage under torchrun), got {top.nproc}")
    if "model" not in raw:
        raise FairdeployError(f"{source}: the [model] table is missing; give `arch = \"resnet18\"` (with "
                              "image_size, epochs, ... to train one) or `checkpoint = \"path\"` under [model]")
    data = top.data
    synth, manifest = data.synth, data.manifest
    if (synth is None) == (manifest is None):
        raise FairdeployError(f"{source}: [data] needs exactly one of `synth = {{...}}` or `manifest = \"path\"`")
    if manifest is not None:
        manifest = beside(p, manifest)
    images_root = data.images_root
    if images_root is not None:
        images_root = beside(p, images_root)
    model = dict(top.model)
    _check_keys(model, {"checkpoint": str, "arch": str, "image_size": int}, f"{source}: [model]")
    if ("checkpoint" in model) == ("arch" in model):
        raise FairdeployError(f"{source}: [model] needs exactly one of `arch = \"resnet18\"` (train one) or "
                              "`checkpoint = \"path\"` (use it)")
    if "checkpoint" in model:
        model["checkpoint"] = beside(p, model["checkpoint"])
    entries = []
    names: set[str] = set()
    for i, e in enumerate(top.prune):
        if not isinstance(e, dict) or ("method" in e) == ("criterion" in e):
            raise FairdeployError(f"{source}: [[prune]] entry {i + 1} needs a `method` (fairprune or snnl) or, for a "
                                  "compression run, a `criterion` (with target_macs, target_params or speedup, or "
                                  "none of them to compress as far as the tolerance allows), not both")
        e = dict(e)
        _check_keys(e, {"name": str, "method": str, "criterion": str, "finetune_after": dict},
                    f"{source}: [[prune]] entry {i + 1}")
        criterion = str(e.pop("criterion")) if "criterion" in e else None
        name = str(e.pop("name", criterion or e["method"]))
        if name in names or name == "vanilla" or name.endswith("-control"):
            raise FairdeployError(f"{source}: [[prune]] name {name!r} is used twice (or is reserved: vanilla, "
                                  "*-control)")
        names.add(name)
        where = f"{source}: [[prune]]"
        if criterion is not None:
            if "finetune_after" in e:
                raise FairdeployError(f"{where} {name}: a budget run fine-tunes after every round (its `finetune` "
                                      "table); finetune_after is for method tables")
            given = [k for k in BUDGET_KEYS if k in e]
            if len(given) > 1:  # none: compress as far as the guard's tolerance allows
                raise FairdeployError(f"{where} {name}: a compression run takes at most one of "
                                      f"{', '.join(BUDGET_KEYS)} (got {', '.join(given)}); none searches as far "
                                      "as every group stays within max_group_drop")
            entries.append(PruneEntry(name=name, method="budget", options=e, criterion=criterion, source=where))
            continue
        method = str(e.pop("method"))
        after = e.pop("finetune_after", None)
        entries.append(PruneEntry(name=name, method=method, options=e, finetune_after_table=after, source=where))
    return PipelineConfig(
        source=source, title=top.title, device=top.device, seed=top.seed, nproc=top.nproc, threads=top.threads,
        synth=dict(synth) if synth is not None else None, manifest=manifest, images_root=images_root,
        allow_outside_root=data.allow_outside_root, model=model, prune=tuple(entries),
        export=_export_table(top.export, source), validate=dict(top.validate),
    )


def _check_keys(table: dict[str, Any], hints: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check the keys of a table that map onto no dataclass field (the others: fairdeploy.schema)."""
    for key, hint in hints.items():
        if key in table:
            check_type(table[key], hint, f"{where} {key}")
    return table


def _export_table(table: dict[str, Any], source: str) -> dict[str, Any]:
    """[export]: ExportOptions' nested table (checked by resolve_export_options); a profile given as a relative
    .toml path is relative to the pipeline file, like the manifest."""
    export = dict(table)
    prof = export.get("profile")
    if isinstance(prof, str) and prof.endswith(".toml"):
        export["profile"] = beside(Path(source), prof)
    return export
