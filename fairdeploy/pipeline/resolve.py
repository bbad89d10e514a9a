"""PipelineConfig -> the library's own configuration objects (ResolvedPipeline): every table of a pipeline file
mapped onto the dataclasses the stages run with, checked before anything is written. The resolved objects, not
the file's text, are each stage's inputs (fairdeploy.pipeline.stages): a changed library default reruns what it
affects."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.pipeline.config import PipelineConfig, PruneEntry
from fairdeploy.schema import Layer, check_type, keys, load


@dataclass(frozen=True)
class TrainPlan:
    arch: str
    image_size: int
    fit: Any  # FitConfig


@dataclass(frozen=True)
class ResolvedPipeline:
    cfg: PipelineConfig
    synth: Any  # SynthConfig, or None for a manifest
    train: TrainPlan | Path  # a plan, or the checkpoint given under [model]
    prune: tuple[Any, ...]  # PruneConfig or BudgetConfig per [[prune]] entry
    finetune_after: tuple[Any, ...]  # per entry: the FitConfig of its fine-tuning stage after pruning, or None
    export: Any  # ExportOptions
    validate: Any  # ValidationConfig


def resolve_pipeline(cfg: PipelineConfig) -> ResolvedPipeline:
    """Every section parsed and checked (one FairdeployError naming the file, table and key otherwise)."""
    return ResolvedPipeline(
        cfg=cfg, synth=_synth_config(cfg), train=_train_plan(cfg),
        prune=tuple(_budget_options(e, cfg.seed) if e.is_budget else _split_options(e, cfg.seed) for e in cfg.prune),
        finetune_after=tuple(e.finetune_after(cfg.seed) for e in cfg.prune),
        export=_export_options(cfg), validate=_validation_config(cfg))


def _split_options(entry: PruneEntry, seed: int) -> Any:
    """A method [[prune]] table -> PruneConfig by the generic loader: its top-level keys are PruneConfig's
    (privileged, batch_size = the evaluation batch, workers), the sub-tables its parts (`fairprune = {...}`,
    `snnl = {...}`, `stop`, `guard`, and `finetune`: per-step fine-tuning, keys left out keeping FINETUNE_CONFIG's
    values as `prune --finetune-epochs N` does, epochs = 0 for none)."""
    from fairdeploy.pruning.run import PruneConfig, load_prune_config

    options = dict(entry.options)
    if "method" in options or "seed" in options:
        raise FairdeployError(f"{entry.where}: {'method' if 'method' in options else 'seed'} is set by the table's "
                              "`method` and the pipeline's `seed`")
    cfg = load_prune_config(options, entry.where, base=PruneConfig(method=entry.method, seed=seed))
    cfg.validate()
    return cfg


# Budget-table keys that are BudgetConfig fields set another way (the table's `criterion`, the budget keys and the
# pipeline's seed).
_BUDGET_RESERVED = ("criterion", "metric", "target", "seed")


def _budget_options(entry: PruneEntry, seed: int) -> Any:
    """A budget [[prune]] table -> BudgetConfig by the generic loader: its fields by name, `finetune = {...}` the
    recovery fine-tuning after every round, and one of target_macs / target_params / speedup for the budget."""
    from fairdeploy.pipeline.config import BUDGET_KEYS
    from fairdeploy.pruning.budget import BudgetConfig, budget_from

    options = dict(entry.options)
    reserved = [k for k in _BUDGET_RESERVED if k in options]
    if reserved:
        raise FairdeployError(f"{entry.where}: {reserved[0]} is set by the table's criterion, its "
                              f"{' / '.join(BUDGET_KEYS)} and the pipeline's seed")
    # at most one of BUDGET_KEYS: checked by load_pipeline_config; none: a search to the tolerance
    budget = {k: check_type(options.pop(k), float, f"{entry.where}: {k}") for k in BUDGET_KEYS if k in options}
    metric, fraction = budget_from(**budget, label=lambda k: f"{entry.where}: {k}")
    default = BudgetConfig()
    # control None: BudgetConfig.control_run picks the default for the criterion and recovery
    base = replace(default, criterion=entry.criterion, metric=metric, target=fraction, seed=seed,
                   finetune=replace(default.finetune, seed=seed), control=None)
    cfg = load(BudgetConfig, options, entry.where, base=base)
    if cfg.finetune.epochs == 0:
        raise FairdeployError(f"{entry.where}: a budget run fine-tunes after every round: finetune.epochs must "
                              "be >= 1")
    cfg.validate()
    return cfg


def _synth_config(cfg: PipelineConfig) -> Any:
    if cfg.synth is None:
        return None
    from fairdeploy.data.synth import SynthConfig

    synth = dict(cfg.synth)
    synth_cfg = load(SynthConfig, {"seed": cfg.seed, **synth}, cfg.source, "data.synth")
    synth_cfg.validate()
    return synth_cfg


def _train_plan(cfg: PipelineConfig) -> Path | TrainPlan:
    """A given checkpoint, or the architecture, image size and FitConfig to train one."""
    from fairdeploy.models.checkpoint import ModelSpec, resolve_checkpoint
    from fairdeploy.models.registry import ARCHITECTURES
    from fairdeploy.training.loop import FitConfig

    model_cfg = dict(cfg.model)
    if "checkpoint" in model_cfg:
        extra = [k for k in model_cfg if k != "checkpoint"]
        if extra:
            raise FairdeployError(f"{cfg.source}: [model] {extra[0]}: a given checkpoint is used as it is; training "
                                  "keys go with `arch = ...` instead of `checkpoint`")
        return resolve_checkpoint(model_cfg["checkpoint"])
    valid = ["arch", "image_size", *keys(FitConfig)]
    unknown = [k for k in model_cfg if k not in valid]
    if unknown:
        raise FairdeployError(f"{cfg.source}: unknown key {unknown[0]!r} in [model]; valid keys: {', '.join(valid)}")
    arch = str(model_cfg.pop("arch"))  # load_pipeline_config checked that [model] has one
    if arch not in ARCHITECTURES:
        raise FairdeployError(f"{cfg.source}: [model] unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    image_size = int(model_cfg.pop("image_size", ModelSpec.image_size))
    fit = load(FitConfig, {"seed": cfg.seed, **model_cfg}, cfg.source, "model")
    fit.validate()
    return TrainPlan(arch, image_size, fit)


def _export_options(cfg: PipelineConfig) -> Any:
    """[export]: the same nested table as an export profile (ExportOptions; `profile = NAME` gives the starting
    values, which the table's own keys override)."""
    from fairdeploy.export.profiles import resolve_export_options

    return resolve_export_options([Layer(cfg.export, cfg.source, "export")])


def _validation_config(cfg: PipelineConfig) -> Any:
    """[validate]: ValidationConfig's table, with [validate.tolerances] and [validate.latency] (`latency = false`:
    no latency); the pipeline's seed unless the table gives one."""
    from fairdeploy.validation.validate import ValidationConfig

    vcfg = load(ValidationConfig, cfg.validate, cfg.source, "validate", base=ValidationConfig(seed=cfg.seed))
    vcfg.validate()
    return vcfg


