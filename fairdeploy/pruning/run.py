"""prune_checkpoint: the library call behind `fairdeploy prune` (load, decide groups, iterate, write atomically)."""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import Manifest
from fairdeploy.device import resolve_device, seed_everything
from fairdeploy.distributed import barrier, main_scratch, world
from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_dir
from fairdeploy.files.hashing import sha256_file, sha256_if_file
from fairdeploy.files.json_files import write_json
from fairdeploy.metrics import METRIC_DEFINITIONS, MetricsReport
from fairdeploy.models.checkpoint import WEIGHTS_FILE, load_checkpoint, resolve_checkpoint, save_checkpoint
from fairdeploy.models.size import ModelSize, model_size
from fairdeploy.models.sparsity import spec_masks
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.fairprune import FairPruneConfig, FairPruneStep
from fairdeploy.pruning.iterate import LoopContext, run_steps
from fairdeploy.pruning.layers import resolve_feature_layers
from fairdeploy.pruning.roles import GroupRoles, decide_roles
from fairdeploy.pruning.scoresets import balanced_batch_order, group_score_sets
from fairdeploy.pruning.selection import Guard, StepRecord, StopRule
from fairdeploy.pruning.snnl_prune import SnnlConfig, SnnlStep, check_channel_budget, check_feature_layers
from fairdeploy.training.loop import FitConfig, evaluate_model
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE
from fairdeploy.schema import load
from fairdeploy.training.train import spec_datasets

METHODS = ("fairprune", "snnl")
PRUNE_FILE = "prune.json"


@dataclass(frozen=True)
class PruneConfig:
    """Everything `fairdeploy prune` needs besides its inputs and output."""

    method: str = "fairprune"
    fairprune: FairPruneConfig = field(default_factory=FairPruneConfig)
    snnl: SnnlConfig = field(default_factory=SnnlConfig)
    stop: StopRule = field(default_factory=StopRule)
    guard: Guard = field(default_factory=Guard)
    privileged: str | None = None
    finetune: FitConfig | None = None  # None: no fine-tuning between steps
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE  # evaluation batch size
    workers: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise FairdeployError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        (self.fairprune if self.method == "fairprune" else self.snnl).validate()
        self.stop.validate()
        self.guard.validate()
        if self.finetune is not None:
            self.finetune.validate()

    def params(self) -> dict[str, Any]:
        method = self.fairprune.to_dict() if self.method == "fairprune" else self.snnl.to_dict()
        return {"method": self.method, self.method: method, "stop": asdict(self.stop), "guard": self.guard.to_dict(),
                "privileged": self.privileged, "finetune": asdict(self.finetune) if self.finetune else None,
                "seed": self.seed}


def load_prune_config(values: Mapping[str, Any], source: str, table: str = "",
                      base: PruneConfig | None = None) -> PruneConfig:
    """PruneConfig from a TOML table of its fields (a `prune --config` file, a pipeline's [[prune]] table) by the one
    loader (fairdeploy.schema.load), over `base` (default PruneConfig()): a `finetune` table fine-tunes after every
    step, its keys left out keeping FINETUNE_CONFIG's values as `prune --finetune-epochs N` does (`epochs = 0` or
    `finetune = false`: none), and a `seed` the table sets is the fine-tuning's too unless `finetune` sets its own."""
    from fairdeploy.training.finetune import FINETUNE_CONFIG

    base = base if base is not None else PruneConfig()
    if "finetune" in values and base.finetune is None:
        base = replace(base, finetune=replace(FINETUNE_CONFIG, seed=base.seed))
    cfg = load(PruneConfig, values, source, table, base=base)
    if cfg.finetune is None:
        return cfg
    if cfg.finetune.epochs == 0:
        return replace(cfg, finetune=None)
    finetune_table = values.get("finetune")
    if "seed" in values and not (isinstance(finetune_table, Mapping) and "seed" in finetune_table):
        cfg = replace(cfg, finetune=replace(cfg.finetune, seed=cfg.seed))
    return cfg


@dataclass(frozen=True)
class PruneData:
    """The images a pruning run used: the manifest, the split it scored on (validation for the rest; the test split
    never), and how the score sets were drawn (FairPrune: images per group; SNNL: its group-balanced batches)."""

    manifest: str
    manifest_sha256: str | None  # None when the manifest is not a file
    score_split: str
    val_images: int
    score_samples_per_group: int | None = None  # FairPrune
    snnl_batches: dict[str, Any] | None = None  # SNNL: count, batch_size, groups

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
                               "score_split": self.score_split, "val_images": self.val_images,
                               "test_split_used": False}
        if self.score_samples_per_group is not None:
            out["score_samples_per_group"] = self.score_samples_per_group
        if self.snnl_batches is not None:
            out["snnl_batches"] = self.snnl_batches
        return out


@dataclass(frozen=True)
class PruneRecord:
    """What prune.json holds (to_dict() is the file): the run's settings and inputs, every step on validation,
    the selected step and why the run stopped."""

    config: PruneConfig
    source: str  # the input checkpoint
    source_sha256: str  # of its weights
    arch: str
    data: PruneData
    groups: GroupRoles
    device: str
    versions: dict[str, str]
    steps: tuple[StepRecord, ...]  # step 0 = the input model
    selected_step: int
    stopped_because: str
    size_after: ModelSize  # of the selected step's model
    sparsity: dict[str, Any] | None  # the output checkpoint's weight-level sparsity (kind, layers)
    val_selected: MetricsReport
    seconds: float = 0.0

    @property
    def selected(self) -> StepRecord:
        return self.steps[self.selected_step]

    @property
    def selection_note(self) -> str:
        return ("no pruned step passed the guard and beat the input model: the output is the input model"
                if self.selected_step == 0 else "best eligible step on validation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "params": self.config.params(),
            "input": {"checkpoint": self.source, "sha256": self.source_sha256, "arch": self.arch},
            "data": self.data.to_dict(),
            "groups": self.groups.to_dict(),
            "device": self.device,
            "versions": dict(self.versions),
            "steps": [s.to_dict() for s in self.steps],
            "selected_step": self.selected_step,
            "selection": {"criterion": self.config.guard.select, "target": self.config.stop.target,
                          "note": self.selection_note},
            "stopped_because": self.stopped_because,
            "size": {"before": self.steps[0].size.to_dict(), "after": self.size_after.to_dict()},
            "sparsity": self.sparsity,
            "val_selected": self.val_selected.to_dict(),
            "seconds": self.seconds,
            "metric_definitions": METRIC_DEFINITIONS,
        }


@dataclass(frozen=True)
class PruneResult:
    out_dir: Path
    record: PruneRecord  # what prune.json holds


def _versions() -> dict[str, str]:
    import torch_pruning as tp
    import torchvision

    import fairdeploy

    return {"fairdeploy": getattr(fairdeploy, "__version__", "unknown"), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_pruning": tp.__version__,
            "python": platform.python_version()}


def _check_sparsity(kind: str | None, method: str, granularity: str) -> None:
    if kind is None or method == "snnl" or granularity == "channel":
        return
    if granularity != kind:
        raise FairdeployError(
            f"the checkpoint already has {kind} sparsity; --granularity {granularity} cannot be added on top "
            f"(use --granularity {kind} or channel, or start from a dense checkpoint)"
        )


def prune_checkpoint(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    cfg: PruneConfig = PruneConfig(),
    device: str = "auto",
    progress: Progress = no_progress,
) -> PruneResult:
    """Prune a checkpoint for fairness and write OUT/model.safetensors, OUT/model.json and OUT/prune.json.

    Selection, stopping and the privileged-group decision use the validation split only; scores use the
    train (or validation) split; the test split is never read. Nothing is written unless the run succeeds.
    """
    cfg.validate()
    t_start = time.perf_counter()
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    src = resolve_checkpoint(model_dir)
    model, spec = load_checkpoint(src, dev)
    if cfg.privileged is not None and cfg.privileged not in spec.groups:
        raise FairdeployError(
            f"--privileged {cfg.privileged!r} is not a group of this model; choose one of {', '.join(spec.groups)}"
        )
    kind = (spec.sparsity or {}).get("kind")
    _check_sparsity(kind, cfg.method, cfg.fairprune.granularity)
    masks = spec_masks(model, spec)
    if cfg.method == "snnl":  # a model without the layer the method needs fails before any work
        layers = resolve_feature_layers(model, cfg.snnl.layers, spec.arch)
        check_channel_budget(model, layers, cfg.snnl)
        check_feature_layers(model, layers, spec.image_size)
    enc = Encoding(spec.classes, spec.groups)
    train_ds, val_ds = spec_datasets(manifest, spec)
    score_split = cfg.fairprune.score_split if cfg.method == "fairprune" else cfg.snnl.score_split
    score_ds = split_dataset(manifest, score_split, enc, eval_transform(spec.image_size, spec.mean, spec.std))
    baseline = evaluate_model(model, val_ds, spec, dev, cfg.batch_size, cfg.workers, progress=progress)
    roles = decide_roles(baseline, cfg.privileged)
    present = sorted(set(score_ds.groups))
    data_info = PruneData(manifest=manifest.source, manifest_sha256=sha256_if_file(manifest.source),
                          score_split=score_split, val_images=len(val_ds))
    if cfg.method == "fairprune":
        role_ids = [spec.groups.index(roles.unprivileged), spec.groups.index(roles.privileged)]
        for name, gid in zip((roles.unprivileged, roles.privileged), role_ids):
            if gid not in present:
                raise FairdeployError(f"group {name!r} has no images in the {score_split} split to score with")
        sets = group_score_sets(score_ds.labels, score_ds.groups, role_ids, cfg.fairprune.score_samples, cfg.seed)
        data_info = replace(data_info, score_samples_per_group=len(sets[role_ids[0]]))
        step_fn = FairPruneStep(cfg.fairprune, spec.arch, spec.image_size, score_ds,
                                {roles.unprivileged: sets[role_ids[0]], roles.privileged: sets[role_ids[1]]},
                                roles.unprivileged, roles.privileged, dev, cfg.seed, progress)
    else:
        if len(present) < 2:
            only = spec.groups[present[0]] if present else "none"
            raise FairdeployError(f"SNNL needs at least two groups in the {score_split} split; found only {only!r}")
        order, bs = balanced_batch_order(score_ds.groups, present, cfg.snnl.batch_size, cfg.snnl.batches, cfg.seed)
        data_info = replace(data_info, snnl_batches={"count": cfg.snnl.batches, "batch_size": bs,
                                                     "groups": [spec.groups[g] for g in present]})
        step_fn = SnnlStep(cfg.snnl, spec.arch, spec.image_size, score_ds, order, bs, dev, progress)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with main_scratch(out) as scratch:  # under torchrun only rank 0 writes (scratch and output)
        ctx = LoopContext(spec=spec, train_ds=train_ds, val_ds=val_ds, device=dev, unprivileged=roles.unprivileged,
                          stop=cfg.stop, guard=cfg.guard, finetune=cfg.finetune, scratch=scratch,
                          batch_size=cfg.batch_size, workers=cfg.workers, progress=progress)
        result = run_steps(model, masks, baseline, step_fn, ctx)
        final_kind = kind
        if cfg.method == "fairprune" and cfg.fairprune.granularity in ("weight", "2:4") and result.selected_step > 0:
            final_kind = cfg.fairprune.granularity
        sparsity = None
        if final_kind is not None and result.masks:
            sparsity = {"kind": final_kind, "layers": sorted(k.removesuffix(".weight") for k in result.masks)}
        record = PruneRecord(
            config=cfg, source=str(src), source_sha256=sha256_file(src / WEIGHTS_FILE), arch=spec.arch,
            data=data_info, groups=roles, device=str(dev), versions=_versions(), steps=tuple(result.records),
            selected_step=result.selected_step, stopped_because=result.stopped_because,
            size_after=model_size(result.model, spec.image_size, "cpu"), sparsity=sparsity,
            val_selected=result.selected_report,
        )
        history_entry = {
            "stage": "prune", "method": cfg.method, "params": cfg.params(),
            "source": str(src), "source_sha256": record.source_sha256, "manifest": manifest.source,
            "unprivileged": roles.unprivileged, "privileged": roles.privileged,
            "selected_step": result.selected_step, "steps_run": len(result.records) - 1,
            "removed": [r.removed for r in result.records[1:result.selected_step + 1]],
        }
        if cfg.method == "snnl":  # per-channel scores stay in prune.json, not in model.json
            history_entry["removed"] = [{k: v for k, v in r.items() if k != "scores"} for r in history_entry["removed"]]
        out_spec = replace(spec, sparsity=sparsity).with_history(history_entry)
        if world().is_main:
            staged = scratch / "final"
            save_checkpoint(result.model, out_spec, staged)
            record = replace(record, seconds=time.perf_counter() - t_start)
            write_json(staged / PRUNE_FILE, record.to_dict())
            with atomic_dir(out, owner=PRUNE_FILE) as tmp:  # replaces only an earlier prune output
                for f in staged.iterdir():
                    shutil.move(str(f), tmp / f.name)
        barrier()
    return PruneResult(out_dir=out, record=record)
