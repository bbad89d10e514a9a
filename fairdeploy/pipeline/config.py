"""PipelineConfig: the TOML file `fairdeploy pipeline` runs (see fairdeploy/pipeline/demo.toml)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_CONFIG = Path(__file__).with_name("demo.toml")
TOP_KEYS = ("title", "device", "seed", "data", "model", "prune", "export", "validate")


BUDGET_KEYS = ("target_macs", "target_params", "speedup")


@dataclass(frozen=True)
class PruneEntry:
    """One [[prune]] table: FairPrune / SNNL steps (`method = ...`), or a budget run (`criterion = ...` and one
    of target_macs / target_params / speedup) that also runs its fairness-blind control."""

    name: str
    method: str  # "fairprune", "snnl", or "budget" for a `criterion = ...` table
    options: dict[str, Any] = field(default_factory=dict)
    finetune_epochs: int = 0  # `finetune_after_epochs`: a separate fine-tuning stage after pruning (0 = none)
    finetune_lr: float = 5e-4  # `finetune_after_lr`
    criterion: str | None = None  # budget runs only

    @property
    def is_budget(self) -> bool:
        return self.criterion is not None


@dataclass(frozen=True)
class PipelineConfig:
    source: str
    title: str = "fairdeploy pipeline"
    device: str = "auto"
    seed: int = 0
    synth: dict[str, Any] | None = None
    manifest: str | None = None
    images_root: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    prune: tuple[PruneEntry, ...] = ()
    export: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] = field(default_factory=dict)

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
            export={**self.export, **(export or {})},
            validate={**self.validate, **(validate or {})},
        )


def _table(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise FairdeployError(f"{source}: [{key}] must be a table")
    return dict(value)


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"pipeline config {p} not found")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FairdeployError(f"{p}: not valid TOML ({exc})") from exc
    source = str(p)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise FairdeployError(f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    data = _table(raw, "data", source)
    synth, manifest = data.get("synth"), data.get("manifest")
    if (synth is None) == (manifest is None):
        raise FairdeployError(f"{source}: [data] needs exactly one of `synth = {{...}}` or `manifest = \"path\"`")
    if manifest is not None:
        manifest = str((p.parent / manifest).resolve()) if not os.path.isabs(manifest) else manifest
    images_root = data.get("images_root")
    if images_root is not None and not os.path.isabs(images_root):
        images_root = str((p.parent / images_root).resolve())
    model = _table(raw, "model", source)
    if "checkpoint" in model and not os.path.isabs(model["checkpoint"]):
        model["checkpoint"] = str((p.parent / model["checkpoint"]).resolve())
    entries = []
    names: set[str] = set()
    for i, e in enumerate(raw.get("prune", [])):
        if not isinstance(e, dict) or ("method" in e) == ("criterion" in e):
            raise FairdeployError(f"{source}: [[prune]] entry {i + 1} needs a `method` (fairprune or snnl) or, for a "
                                  "budget run, a `criterion` (with target_macs, target_params or speedup), not both")
        e = dict(e)
        criterion = str(e.pop("criterion")) if "criterion" in e else None
        name = str(e.pop("name", criterion or e["method"]))
        if name in names or name == "vanilla" or name.endswith("-control"):
            raise FairdeployError(f"{source}: [[prune]] name {name!r} is used twice (or is reserved: vanilla, "
                                  "*-control)")
        names.add(name)
        if criterion is not None:
            if "finetune_after_epochs" in e or "finetune_after_lr" in e:
                raise FairdeployError(f"{source}: [[prune]] {name}: a budget run fine-tunes after every round "
                                      "(finetune_epochs, finetune_lr, ...); finetune_after_* is for method tables")
            given = [k for k in BUDGET_KEYS if k in e]
            if len(given) != 1:
                raise FairdeployError(f"{source}: [[prune]] {name}: a budget run needs exactly one of "
                                      f"{', '.join(BUDGET_KEYS)} (got {', '.join(given) or 'none'})")
            entries.append(PruneEntry(name=name, method="budget", options=e, criterion=criterion))
            continue
        method = str(e.pop("method"))
        ft = int(e.pop("finetune_after_epochs", 0))
        ft_lr = float(e.pop("finetune_after_lr", 5e-4))
        entries.append(PruneEntry(name=name, method=method, options=e, finetune_epochs=ft, finetune_lr=ft_lr))
    return PipelineConfig(
        source=source,
        title=str(raw.get("title", "fairdeploy pipeline")),
        device=str(raw.get("device", "auto")),
        seed=int(raw.get("seed", 0)),
        synth=dict(synth) if synth is not None else None,
        manifest=manifest,
        images_root=images_root,
        model=model,
        prune=tuple(entries),
        export=_table(raw, "export", source),
        validate=_table(raw, "validate", source),
    )


def dataclass_from_options(cls: type, options: dict[str, Any], where: str) -> Any:
    """Build a frozen dataclass from a TOML table; an unknown key names the valid ones."""
    valid = {f.name for f in fields(cls)}
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise FairdeployError(f"{where}: unknown option {unknown[0]!r}; valid options: {', '.join(sorted(valid))}")
    return cls(**options)
