"""The epoch loop shared by train and finetune: AMP on CUDA, cosine LR, best-on-validation, resumable.

Under torchrun the model is wrapped in DistributedDataParallel, --batch-size is the global batch (split evenly
over the ranks, each rank taking its share of the one-process sample order), validation is computed on the
whole split gathered on every rank, and only rank 0 writes (the others wait at a barrier)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.data.loading import ImageDataset, check_batch, make_loader
from fairdeploy.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_module,
    broadcast_object,
    gather_rows,
    rank_seed,
    world,
)
from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_path
from fairdeploy.files.json_files import write_json
from fairdeploy.metrics import MetricsReport, compute_metrics
from fairdeploy.models.checkpoint import ModelSpec, check_resumable, load_checkpoint, save_checkpoint
from fairdeploy.progress import Progress, no_progress
from fairdeploy.training.constrained import ConstrainedRecovery, GroupDropConstraint
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE, predict

SELECT_CHOICES = ("f1_macro", "accuracy", "worst_group_accuracy")
OPTIMIZERS = ("adamw", "sgd")
GROUP_WEIGHTS = ("none", "balanced")
OPTIMIZER_FILE = "optimizer.safetensors"  # in OUT/last while the run can be resumed


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    balance: str = "none"
    select: str = "f1_macro"
    amp: bool = True  # only takes effect on CUDA
    workers: int = 0
    seed: int = 0
    # knowledge distillation from a teacher given to fit(): loss = (1 - a) * CE + a * T^2 * KL(teacher || student)
    distill: float = 0.0
    distill_temperature: float = 4.0
    # "balanced": each sample's loss weighted by N / (G * n_g) of its group (worst-group emphasis)
    group_weight: str = "none"
    # constrained recovery (fairdeploy.training.constrained): no group may lose more than ε accuracy against the
    # teacher given to fit() (the dense reference); None: off
    constrained: ConstrainedRecovery | None = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise FairdeployError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise FairdeployError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise FairdeployError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.select not in SELECT_CHOICES:
            raise FairdeployError(f"unknown selection metric {self.select!r}; choose one of {', '.join(SELECT_CHOICES)}")
        if self.batch_size < 1:
            raise FairdeployError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.distill <= 1.0:
            raise FairdeployError(f"distillation weight must be in [0, 1], got {self.distill}")
        if self.distill_temperature <= 0:
            raise FairdeployError(f"distillation temperature must be > 0, got {self.distill_temperature}")
        if self.group_weight not in GROUP_WEIGHTS:
            raise FairdeployError(f"unknown group weighting {self.group_weight!r}; choose one of {', '.join(GROUP_WEIGHTS)}")
        if self.constrained is not None:
            self.constrained.validate()


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_score: float
    history: tuple[dict[str, Any], ...]
    best_dir: Path


def selection_score(report: MetricsReport, select: str) -> float:
    if select == "accuracy":
        return report.overall_accuracy
    if select == "worst_group_accuracy":
        return min(m.accuracy for _, m in report.groups)
    return report.overall_f1_macro


def named_present_groups(groups: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each sample's group name (`names` indexed by its group index) and the names present, in `names` order
    (compute_metrics' group_order): shared by evaluate_model, pruning.choose and pruning.paired."""
    group_names = np.asarray(names)[groups]
    present = set(group_names.tolist())
    return group_names, [g for g in names if g in present]


def evaluate_model(model: nn.Module, dataset: ImageDataset, spec: ModelSpec, device: torch.device,
                   batch_size: int = DEFAULT_EVAL_BATCH_SIZE, workers: int = 0, bootstrap: int = 0,
                   seed: int = 0, progress: Progress = no_progress) -> MetricsReport:
    """Predict a dataset and compute the per-group metrics with the model's class and group names."""
    p = predict(model, dataset, device, batch_size, workers, progress, task="evaluate")
    group_names, present = named_present_groups(p.groups, spec.groups)
    return compute_metrics(p.labels, p.predicted, group_names, spec.num_classes, spec.classes,
                           group_order=present, bootstrap=bootstrap, seed=seed)


def _make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Optimizer tensors to safetensors (no pickle); returns the JSON-able param_groups."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}/{name}"] = t.detach().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fit(
    model: nn.Module,
    spec: ModelSpec,
    train_ds: ImageDataset,
    val_ds: ImageDataset,
    cfg: FitConfig,
    out_dir: Path,
    device: torch.device,
    after_step: Callable[[nn.Module], None] | None = None,
    resume: bool = False,
    progress: Progress = no_progress,
    task: str = "train",
    teacher: nn.Module | None = None,
    keep_optimizer_state: bool = False,
) -> FitResult:
    """Train `model`; write out_dir/best (best on validation), out_dir/last (+ optimizer) and history.

    Epochs are numbered from 1 everywhere (history, trainer.json, FitResult.best_epoch, what the CLI prints).
    The optimizer state in out_dir/last is kept while the run can be resumed and removed when it finishes,
    unless `keep_optimizer_state`.

    `after_step` runs after every optimiser step (fine-tuning re-applies pruning masks there).
    With `resume`, continue from out_dir/last when it exists. With `teacher` and `cfg.distill` > 0, the loss
    mixes in distillation from the teacher's logits. With `cfg.constrained`, the teacher is the dense reference of
    constrained recovery (fairdeploy.training.constrained): its penalty joins the loss, its dual step follows each
    optimiser step, and each epoch's history records the multipliers and each group's drop (`constraint`). Each
    epoch's history records a hash of the order in which the training samples were seen (two runs with the same
    seed see the same order).
    """
    cfg.validate()
    if cfg.distill > 0 and teacher is None:
        raise FairdeployError("distillation needs a teacher model (the input model of the pruning run)")
    if cfg.constrained is not None and teacher is None:
        raise FairdeployError("constrained recovery needs a dense reference model (the teacher) to measure each "
                              "group's accuracy drop against")
    # under torchrun every rank holds the same multipliers (the dual step gathers the whole global batch)
    constraint = GroupDropConstraint(cfg.constrained, len(spec.groups)) if cfg.constrained is not None else None
    ranks = world()
    if cfg.batch_size % ranks.size:
        raise FairdeployError(f"--batch-size {cfg.batch_size} (the global batch) cannot be split evenly over "
                              f"{ranks.size} processes: use a multiple of {ranks.size}")
    local_batch = cfg.batch_size // ranks.size
    out_dir = Path(out_dir)
    model.to(device)
    opt = _make_optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    group_w = _group_weights(train_ds, cfg.group_weight).to(device)
    if teacher is not None:
        teacher.to(device).eval()
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch = 0, -math.inf, 0  # best_epoch 0: none yet (epochs count from 1)
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    state_file = out_dir / "trainer.json"

    # rank 0 reads the earlier run (the other ranks' file system may not hold it) and sends it to the others
    resumed = resume and ranks.is_main and state_file.is_file()
    if resumed:
        state = json.loads(state_file.read_text())
        if state.get("config", {}).get("epochs") != cfg.epochs or state.get("arch") != spec.arch:
            raise FairdeployError(
                f"{state_file}: cannot resume, the earlier run used a different configuration "
                f"(epochs {state.get('config', {}).get('epochs')}, arch {state.get('arch')}); use a new --out"
            )
        check_resumable(last_dir, spec)  # another manifest's classes: one line, not a state-dict size mismatch
        state = _one_based(state)
        if int(state["epoch"]) >= cfg.epochs:
            raise FairdeployError(f"{out_dir}: the earlier run already finished its {cfg.epochs} epochs; nothing "
                                  "to resume (use a new --out, or --overwrite to train again there)")
        if not (last_dir / OPTIMIZER_FILE).is_file():
            raise FairdeployError(f"{out_dir}: cannot resume, {last_dir / OPTIMIZER_FILE} is missing")
        loaded, _ = load_checkpoint(last_dir, device)
        model.load_state_dict(loaded.state_dict())
        opt = _make_optimizer(model, cfg)
        _load_optimizer(opt, last_dir / OPTIMIZER_FILE, state["optimizer"])
    if ranks.active and resume:
        sent = broadcast_object((state, _cpu_state(opt)) if resumed else None)
        if sent is not None:
            state, opt_state = sent  # type: ignore[misc]
            broadcast_module(model)
            opt = _make_optimizer(model, cfg)
            opt.load_state_dict(opt_state)
            resumed = True
    if resumed:
        start_epoch = int(state["epoch"])  # epochs done (1-based: the last one finished)
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        history = list(state["history"])
        if constraint is not None and "constraint_state" in state:  # else (it was off before) λ starts at 0
            constraint.load_state(state["constraint_state"])

    gen = torch.Generator()
    steps_per_epoch = max(1, len(train_ds) // cfg.batch_size)
    trained: nn.Module = model
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 1000 + epoch)  # the sample order: the same on every rank
        torch.manual_seed(rank_seed(cfg.seed * 1000 + epoch))  # augmentation and dropout: each rank its own
        loader = make_loader(train_ds, local_batch, shuffle=True, balance=cfg.balance, workers=cfg.workers,
                             generator=gen, pin_memory=device.type == "cuda",
                             drop_last=len(train_ds) > cfg.batch_size,  # a 1-sample batch breaks BatchNorm
                             shard=(ranks.rank, ranks.size) if ranks.active else None)
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        seen_idx: list[np.ndarray] = []
        for step, (x, y, g, ok, idx) in enumerate(loader):
            check_batch(train_ds, ok, idx)
            seen_idx.append(idx.numpy().astype(np.int64))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = trained(x)
                loss = (loss_fn(logits.float(), y) * group_w[g.to(device)]).mean()
                t_logits = None
                if teacher is not None and (cfg.distill > 0 or constraint is not None):
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                if cfg.distill > 0 and t_logits is not None:
                    loss = (1 - cfg.distill) * loss + cfg.distill * distillation_loss(
                        logits.float(), t_logits, cfg.distill_temperature)
                # the Lagrangian; `loss` (what train_loss reports) stays the objective of plain fine-tuning
                objective = loss + constraint.penalty(logits, t_logits, y, g) if constraint is not None else loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(opt)
            scaler.update()
            if after_step is not None:
                after_step(model)
            if constraint is not None and t_logits is not None:
                with torch.no_grad():
                    constraint.dual_step(logits.argmax(1) == y, t_logits.argmax(1) == y, g)
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            progress(f"{task} epoch {epoch + 1}/{cfg.epochs}", step + 1, steps_per_epoch)
        if ranks.active:  # the whole job's samples and loss; every rank's BatchNorm statistics are rank 0's
            totals = all_reduce_sum(torch.tensor([float(seen), loss_sum], dtype=torch.float64))
            seen, loss_sum = int(totals[0]), float(totals[1])
            broadcast_module(model, buffers_only=True)
        train_time = time.perf_counter() - t0
        order = _order_hash(seen_idx)
        report = evaluate_model(model, val_ds, spec, device, cfg.batch_size, cfg.workers)
        score = selection_score(report, cfg.select)
        entry = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_samples_per_s": seen / max(train_time, 1e-9),
            "data_order": order,
            "val_accuracy": report.overall_accuracy,
            "val_f1_macro": report.overall_f1_macro,
            "val_group_accuracy": {g: m.accuracy for g, m in report.groups},
            "val_eodd": report.gap("eodd"),
            "score": score,
        }
        if constraint is not None:
            entry["constraint"] = constraint.record(spec.groups)
        history.append(entry)
        better = score > best_score
        if better:
            best_score, best_epoch = score, epoch + 1
        worst = min(m.accuracy for _, m in report.groups)
        # one finished task per epoch: a plain log line (`train ... > log`) with the time and the key metrics
        progress(f"{task} epoch {epoch + 1}/{cfg.epochs} done: train loss {entry['train_loss']:.4f}, "
                 f"val {cfg.select} {score:.4f}, worst-group accuracy {worst:.4f}"
                 f"{_constraint_summary(entry)}{' (best so far)' if better else ''}", 1, 1)
        if ranks.is_main:
            if better:
                save_checkpoint(model, spec, best_dir)
            save_checkpoint(model, spec, last_dir)
            opt_meta = _save_optimizer(opt, last_dir / OPTIMIZER_FILE)
            write_json(state_file, {
                "arch": spec.arch, "epoch": epoch + 1, "epoch_numbering": 1, "best_epoch": best_epoch,
                "best_score": best_score,
                "config": asdict(cfg), "history": history, "optimizer": opt_meta, "device": str(device),
                "processes": ranks.size,
                **({"constraint_state": constraint.state()} if constraint is not None else {}),
            })
        barrier()
    if best_epoch < 1:
        raise FairdeployError(f"{out_dir}: no epoch was run (already finished {cfg.epochs} epochs?)")
    if ranks.is_main and not keep_optimizer_state:
        (last_dir / OPTIMIZER_FILE).unlink(missing_ok=True)  # the run is finished: nothing will resume it
    return FitResult(best_epoch=best_epoch, best_score=best_score, history=tuple(history), best_dir=best_dir)


def _constraint_summary(entry: dict[str, Any]) -> str:
    """', multipliers dark 0.41 light 0, train drop dark 0.025 light -0.025 (max 0.01)' for an epoch of constrained
    recovery (the drop over each group's window of recent training samples; n/a: not full yet), else ''."""
    c = entry.get("constraint")
    if c is None:
        return ""
    lam = " ".join(f"{g} {v:.3g}" for g, v in c["multipliers"].items())
    drop = " ".join(f"{g} {'n/a' if v is None else format(v, '.3f')}" for g, v in c["group_drop"].items())
    return f", multipliers {lam}, train drop {drop} (max {c['max_group_drop']:g})"


def _one_based(state: dict[str, Any]) -> dict[str, Any]:
    """trainer.json of a run written before epochs were numbered from 1 (no `epoch_numbering`), renumbered."""
    if state.get("epoch_numbering") == 1:
        return state
    history = [{**h, "epoch": int(h["epoch"]) + 1} for h in state.get("history", [])]
    return {**state, "epoch": int(state["epoch"]) + 1, "best_epoch": int(state["best_epoch"]) + 1,
            "history": history, "epoch_numbering": 1}


def _order_hash(local: list[np.ndarray]) -> str:
    """Hash of the order the job saw the training samples in: one process's batches, or under torchrun the
    ranks' local batches put back together (rank r held positions r, r + R, ... of each global batch)."""
    order = hashlib.sha256()
    ranks = world()
    if not ranks.active:
        for idx in local:
            order.update(idx.tobytes())
        return order.hexdigest()[:16]
    sizes = [len(i) for i in local]  # the same on every rank: equal shares, equal local batches
    parts = gather_rows(np.concatenate(local) if local else np.zeros(0, np.int64))
    starts = np.cumsum([0, *sizes])
    for a, b in itertools.pairwise(starts):
        batch = np.empty(sum(int(b - a) for _ in parts), dtype=np.int64)
        for r, p in enumerate(parts):
            batch[r::len(parts)] = p[a:b]
        order.update(batch.tobytes())
    return order.hexdigest()[:16]


def _cpu_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": {k: {n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in st.items()}
                      for k, st in sd["state"].items()}, "param_groups": sd["param_groups"]}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def _group_weights(dataset: ImageDataset, mode: str) -> torch.Tensor:
    """Per-group loss weights indexed by group id: ones, or N / (G * n_g) over the groups present."""
    groups = np.asarray(dataset.groups, dtype=np.int64)
    size = int(groups.max()) + 1 if len(groups) else 1
    if mode == "none" or len(groups) == 0:
        return torch.ones(size)
    counts = np.bincount(groups, minlength=size).astype(np.float64)
    present = counts > 0
    w = np.zeros(size)
    w[present] = len(groups) / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def with_fit_history(spec: ModelSpec, stage: str, cfg: FitConfig, result: FitResult, **extra: Any) -> ModelSpec:
    return replace(spec).with_history(
        {"stage": stage, "config": asdict(cfg), "best_epoch": result.best_epoch, "best_score": result.best_score, **extra}
    )
