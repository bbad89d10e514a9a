"""PipelineConfig -> the library's own configuration objects (ResolvedPipeline): every table of a pipeline file
mapped onto the dataclasses the stages run with, checked before anything is written. The resolved objects, not
the file's text, are each stage's inputs (fairdeploy.pipeline.stages): a changed library default reruns what it
affects."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.pipeline.config import PipelineConfig, PruneEntry
from fairdeploy.schema import Layer, build, check_type, load


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
    export: Any  # ExportOptions
    validate: Any  # ValidationConfig


def resolve_pipeline(cfg: PipelineConfig) -> ResolvedPipeline:
    """Every section parsed and checked (one FairdeployError naming the file, table and key otherwise)."""
    return ResolvedPipeline(
        cfg=cfg, synth=_synth_config(cfg), train=_train_plan(cfg),
        prune=tuple(_budget_options(e, cfg.seed) if e.is_budget else _split_options(e, cfg.seed) for e in cfg.prune),
        export=_export_options(cfg), validate=_validation_config(cfg))


def _split_options(entry: PruneEntry, seed: int) -> Any:
    """Map a [[prune]] table onto PruneConfig: each key goes to the config that has a field of that name."""
    from fairdeploy.pruning.fairprune import FairPruneConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.pruning.selection import Guard, StopRule
    from fairdeploy.pruning.snnl_prune import SnnlConfig
    from fairdeploy.training.finetune import FINETUNE_LR

    where = f"[[prune]] {entry.name}"
    method_cls = FairPruneConfig if entry.method == "fairprune" else SnnlConfig
    buckets: dict[type, dict[str, Any]] = {method_cls: {}, StopRule: {}, Guard: {}}
    top: dict[str, Any] = {"seed": seed}
    ft: dict[str, Any] = {}
    for key, value in entry.options.items():
        if key.startswith("finetune_"):
            ft[key.removeprefix("finetune_")] = value
            continue
        if key == "batch_size":  # evaluation (as `prune --batch-size`) and, as before, the method's scoring batches
            top[key] = value
        for cls in buckets:
            if key in {f.name for f in fields(cls)}:
                buckets[cls][key] = value
                break
        else:
            if key in ("privileged", "batch_size", "workers"):
                top[key] = value
            else:
                valid = sorted({f.name for c in buckets for f in fields(c)} | {"privileged", "batch_size",
                                                                                "finetune_epochs", "finetune_lr"})
                raise FairdeployError(f"{where}: unknown option {key!r}; valid options: {', '.join(valid)}")
    # finetune_epochs = 0: no fine-tuning, as `prune --finetune-epochs 0`
    finetune = (_finetune_config({"seed": seed, "lr": FINETUNE_LR, **ft}, where)
                if ft and ft.get("epochs") != 0 else None)
    kwargs = {"fairprune" if entry.method == "fairprune" else "snnl": load(method_cls, buckets[method_cls], where)}
    cfg = load(PruneConfig, top, where, base=PruneConfig(
        method=entry.method, stop=load(StopRule, buckets[StopRule], where), guard=load(Guard, buckets[Guard], where),
        finetune=finetune, **kwargs))
    cfg.validate()
    return cfg


def _finetune_config(options: dict[str, Any], where: str, base: Any = None) -> Any:
    """FitConfig from a [[prune]] table's finetune_<field> keys (an error names the key as written)."""
    from fairdeploy.training.loop import FitConfig

    layer = Layer(options, where, names={k: f"{where}: finetune_{k}" for k in options})
    return build(FitConfig, [layer], base)[0]


# Budget-table keys that are BudgetConfig fields set another way (the table's `criterion`, the budget keys,
# finetune_* and the pipeline's seed).
_BUDGET_RESERVED = ("criterion", "metric", "target", "finetune", "seed")


def _budget_options(entry: PruneEntry, seed: int) -> Any:
    """Map a budget [[prune]] table onto BudgetConfig: its fields by name, one of target_macs / target_params /
    speedup, and finetune_<FitConfig field> onto the recovery fine-tuning (BudgetConfig's defaults otherwise)."""
    from fairdeploy.pipeline.config import BUDGET_KEYS
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.training.loop import FitConfig

    where = f"[[prune]] {entry.name}"
    cfg_fields = {f.name for f in fields(BudgetConfig)} - set(_BUDGET_RESERVED)
    fit_fields = {f.name for f in fields(FitConfig)} - {"seed"}
    top: dict[str, Any] = {}
    ft: dict[str, Any] = {}
    budget: dict[str, float] = {}
    for key, value in entry.options.items():
        if key in BUDGET_KEYS:
            budget[key] = value
        elif key.startswith("finetune_") and key.removeprefix("finetune_") in fit_fields:
            ft[key.removeprefix("finetune_")] = value
        elif key in cfg_fields:
            top[key] = value
        else:
            valid = sorted(cfg_fields | set(BUDGET_KEYS)) + ["finetune_<" + "|".join(sorted(fit_fields)) + ">"]
            raise FairdeployError(f"{where}: unknown option {key!r}; valid options: {', '.join(valid)}")
    if len(budget) != 1:
        raise FairdeployError(f"{where}: a budget run needs exactly one of {', '.join(BUDGET_KEYS)} "
                              f"(got {', '.join(budget) or 'none'})")
    (key, value), = budget.items()
    value = check_type(value, float, f"{where}: {key}")
    if key == "speedup":
        if value <= 1.0:
            raise FairdeployError(f"{where}: speedup must be > 1, got {value}")
        metric, fraction = "macs", 1.0 / value
    else:
        metric, fraction = ("macs" if key == "target_macs" else "params"), value
    base = BudgetConfig()
    if ft.get("epochs") == 0:
        raise FairdeployError(f"{where}: a budget run fine-tunes after every round: finetune_epochs must be >= 1")
    # control None: BudgetConfig picks the criterion's blind twin (fine-tuning alone for a blind criterion)
    finetune = _finetune_config({"seed": seed, **ft}, where, base.finetune)
    cfg = load(BudgetConfig, {"control": None, **top}, where, base=replace(
        base, criterion=entry.criterion, metric=metric, target=fraction, seed=seed, finetune=finetune, control=None))
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
    from fairdeploy.models.checkpoint import resolve_checkpoint
    from fairdeploy.models.registry import ARCHITECTURES
    from fairdeploy.training.loop import FitConfig

    model_cfg = dict(cfg.model)
    if "checkpoint" in model_cfg:
        return resolve_checkpoint(model_cfg["checkpoint"])
    arch = str(model_cfg.pop("arch", "resnet18"))
    if arch not in ARCHITECTURES:
        raise FairdeployError(f"{cfg.source}: [model] unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    image_size = int(model_cfg.pop("image_size", 224))
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


