"""run_pipeline: data -> train -> prune (+ finetune) -> export -> validate -> report, skipping up-to-date stages."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fairdeploy.data.manifest import read_manifest
from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.io import read_json
from fairdeploy.pipeline.config import PipelineConfig, PruneEntry
from fairdeploy.pipeline.stages import StageOutcome, hash_path, run_stage
from fairdeploy.progress import Progress, no_progress
from fairdeploy.report.from_validation import stages_from_validation
from fairdeploy.report.render import REPORT_FILES
from fairdeploy.report.stages import STAGES_FILE, RunStages, StageRecord, Trajectory, write_stages
from fairdeploy.schema import Layer, build, check_type, load


@dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    outcomes: tuple[StageOutcome, ...]
    stages: RunStages
    report_html: Path
    gate_failures: tuple[str, ...]
    notes: tuple[str, ...]


def _split_options(entry: PruneEntry, seed: int) -> Any:
    """Map a [[prune]] table onto PruneConfig: each key goes to the config that has a field of that name."""
    from fairdeploy.pruning.fairprune import FairPruneConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.pruning.selection import Guard, StopRule
    from fairdeploy.pruning.snnl_prune import SnnlConfig
    from fairdeploy.training.finetune import FINETUNE_LR
    from fairdeploy.training.loop import FitConfig

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


def _trajectory(name: str, prune_json: dict[str, Any]) -> Trajectory:
    """Validation accuracy, macro-F1 and Eodd of every pruning step (step 0 = the input model); for a budget run,
    of the candidate's rounds after fine-tuning (step = round; step 0 = the input model)."""
    if prune_json.get("kind") == "budget":
        def point(step: int, val: dict[str, Any], size: dict[str, Any] | None) -> dict[str, Any]:
            p = {"step": step, "accuracy": val["accuracy"], "f1_macro": val["f1_macro"],
                 "eodd": val["fairness"].get("eodd"), "worst_group_accuracy": val["worst_group_accuracy"]}
            if size:
                p["macs"] = size["macs"]
            return p

        points = [point(0, prune_json["input"]["val"], prune_json.get("budget", {}).get("input"))]
        for r in prune_json["runs"]["candidate"]["rounds"]:
            points.append(point(r["round"], r["finetuned"]["val"], r["finetuned"].get("size")))
        return Trajectory(name, tuple(points))
    points = []
    for rec in prune_json.get("steps", []):
        val = rec["val"]
        points.append({"step": rec["step"], "accuracy": val["accuracy"], "f1_macro": val["f1_macro"],
                       "eodd": val["fairness"]["eodd"]})
    return Trajectory(name, tuple(points))


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str | os.PathLike[str],
    progress: Progress = no_progress,
    allow_missing_trt: bool = True,
) -> PipelineResult:
    """Run every stage of `cfg` under run_dir; a stage whose inputs are unchanged is not run again."""
    from fairdeploy.export.exporter import run_export
    from fairdeploy.io import write_json
    from fairdeploy.pruning.run import prune_checkpoint
    from fairdeploy.training.finetune import finetune_checkpoint
    from fairdeploy.training.train import train_model
    from fairdeploy.validation.validate import validate

    # Every section is parsed and checked before anything is written.
    synth_cfg = _synth_config(cfg)
    train_plan = _train_plan(cfg)
    prune_cfgs = [_budget_options(entry, cfg.seed) if entry.is_budget else _split_options(entry, cfg.seed)
                  for entry in cfg.prune]
    options = _export_options(cfg)
    precisions = options.precisions
    vcfg = _validation_config(cfg)
    if cfg.manifest is not None:
        read_manifest(cfg.manifest, cfg.images_root, allow_outside_root=cfg.allow_outside_root)

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    outcomes: list[StageOutcome] = []
    notes: list[str] = []

    # 1. data
    if synth_cfg is not None:
        from fairdeploy.data.synth import generate_synthetic

        outcomes.append(run_stage(run / "data", "data", {"synth": synth_cfg.__dict__}, ["manifest.csv", "images"],
                                  lambda: generate_synthetic(run / "data", synth_cfg)))
        manifest_path, images_root = run / "data" / "manifest.csv", None
    else:
        manifest_path, images_root = Path(cfg.manifest or ""), cfg.images_root
    manifest = read_manifest(manifest_path, images_root, allow_outside_root=cfg.allow_outside_root)
    data_hash = hash_path(manifest_path)

    # 2. train (or a given checkpoint)
    if isinstance(train_plan, Path):
        vanilla = train_plan
    else:
        arch, image_size, fit = train_plan
        outcomes.append(run_stage(
            run / "train", "train", {"arch": arch, "image_size": image_size, "fit": fit.__dict__, "data": data_hash,
                                     "device": cfg.device, **_nproc(cfg)},
            ["best"],
            lambda: _launch(cfg, "train", run / "train", manifest, run / "train", fit, arch=arch, image_size=image_size)
            if cfg.nproc > 1 else
            train_model(manifest, arch, run / "train", fit, image_size, None, cfg.device, False, progress)))
        vanilla = run / "train" / "best"
    vanilla_hash = hash_path(_weights(vanilla))
    models: list[tuple[str, Path]] = [("vanilla", vanilla)]
    trajectories: list[Trajectory] = []

    # 3. prune (+ finetune)
    for entry, pcfg in zip(cfg.prune, prune_cfgs):
        stage_dir = run / f"prune-{entry.name}"
        if entry.is_budget:
            models += _budget_stage(entry, pcfg, stage_dir, vanilla, vanilla_hash, manifest, data_hash, cfg,
                                    progress, outcomes, trajectories, notes)
            continue
        outcomes.append(run_stage(
            stage_dir, f"prune {entry.name}",
            {"method": entry.method, "options": entry.options, "source": vanilla_hash, "data": data_hash, "device": cfg.device,
             **_nproc(cfg), **({"finetune": pcfg.finetune.__dict__} if pcfg.finetune is not None else {})},
            ["model", "model/prune.json"],
            lambda pcfg=pcfg, stage_dir=stage_dir: _launch(cfg, "prune", stage_dir, manifest, stage_dir / "model", pcfg,
                                                           model=vanilla)
            if cfg.nproc > 1 else
            prune_checkpoint(vanilla, manifest, stage_dir / "model", pcfg, cfg.device, progress)))
        pruned = stage_dir / "model"
        prune_record = read_json(pruned / "prune.json")
        trajectories.append(_trajectory(entry.name, prune_record))
        if prune_record.get("selected_step") == 0:
            notes.append(f"{entry.name}: no pruned step passed the levelling-down guard on validation "
                         f"({prune_record.get('stopped_because')}); this stage hands the input model on")
        models.append((entry.name, pruned))
        ft_cfg = entry.finetune_after(cfg.seed)
        if ft_cfg is not None:
            ft_dir = run / f"finetune-{entry.name}"
            outcomes.append(run_stage(
                ft_dir, f"finetune {entry.name}",
                {"epochs": ft_cfg.epochs, "lr": ft_cfg.lr, "source": hash_path(pruned / "model.safetensors"), "data": data_hash,
                 **_nproc(cfg)},
                ["model"],
                lambda pruned=pruned, ft_dir=ft_dir, ft_cfg=ft_cfg: _launch(
                    cfg, "finetune", ft_dir, manifest, ft_dir / "model", ft_cfg, model=pruned)
                if cfg.nproc > 1 else
                finetune_checkpoint(pruned, manifest, ft_dir / "model", ft_cfg, cfg.device, progress)))
            models.append((f"{entry.name}+ft", ft_dir / "model"))

    # 4. export and 5. validate every model (a budget run's control too, as "<name>-control")
    all_stages: list[StageRecord] = []
    gate_failures: list[str] = []
    for name, ckpt in models:
        ckpt_hash = hash_path(_weights(ckpt))
        exp_dir = run / f"export-{_slug(name)}"
        onnx_names = [f"model.{p}.onnx" for p in precisions]

        def do_export(ckpt=ckpt, exp_dir=exp_dir):
            try:
                run_export(ckpt, exp_dir, options, data=manifest_path, images_root=images_root, seed=cfg.seed,
                           allow_outside_root=cfg.allow_outside_root,
                           progress=progress)
            except MissingDependencyError as exc:
                if not allow_missing_trt:
                    raise
                notes.append(f"TensorRT engines not built: {exc}")

        outcomes.append(run_stage(exp_dir, f"export {name}",
                                  {"options": options.to_dict(), "source": ckpt_hash, "data": data_hash},
                                  [*onnx_names, "export.json"], do_export))
        val_dir = run / f"validate-{_slug(name)}"
        candidates = [exp_dir / n for n in onnx_names] + sorted(exp_dir.glob("*.engine"))

        def do_validate(ckpt=ckpt, candidates=candidates, val_dir=val_dir):
            result = validate(ckpt, candidates, manifest, vcfg, device=cfg.device, progress=progress)
            write_json(val_dir / "validation.json", result.to_dict())

        outcomes.append(run_stage(val_dir, f"validate {name}",
                                  {"config": str(vcfg), "source": ckpt_hash,
                                   "candidates": [hash_path(c) for c in candidates], "data": data_hash},
                                  ["validation.json"], do_validate))
        vj = read_json(val_dir / "validation.json")
        gate_failures.extend(f"{name}: {f}" for f in vj.get("failures", []))
        stages = stages_from_validation(vj, str(val_dir / "validation.json"), prefix=name).stages
        # every artifact of a model has its architecture: the MACs and parameters validate counted on the reference
        # (a validation.json cached before it recorded them: counted here)
        size = vj.get("model_size") or _size(ckpt).to_dict()
        guard = _guard_failure(ckpt)  # a budget run's model that failed its pruning guard: no artifact of it passes
        all_stages.extend(replace(s, macs=size["macs"], params=size["params"], guard_failure=guard) for s in stages)

    run_stages = RunStages(tuple(all_stages), tuple(trajectories), vcfg.split, cfg.title, tuple(notes))
    _write_if_changed(run / STAGES_FILE, run_stages)
    outcomes.append(report_stage(run))  # 6. report
    return PipelineResult(run, tuple(outcomes), run_stages, run / "report.html", tuple(gate_failures), tuple(notes))


REPORT_RECORD = "report.stage.json"


def report_stage(run: Path) -> StageOutcome:
    """report.md / report.html / report_files from run/stages.json, keyed on that file's content and the report
    code: a rerun with nothing changed leaves the files as they are (same bytes, same mtimes)."""
    from fairdeploy.report import build_report

    return run_stage(run, "report", {"stages": hash_path(run / STAGES_FILE), "code": _report_code_hash()},
                     list(REPORT_FILES), lambda: build_report(run), record=REPORT_RECORD)


def _write_if_changed(path: Path, run_stages: RunStages) -> None:
    """Write stages.json unless it already holds exactly these stages."""
    import json
    from dataclasses import asdict

    if path.is_file():
        try:
            if read_json(path) == json.loads(json.dumps(asdict(run_stages), default=str)):
                return
        except FairdeployError:
            pass
    write_stages(path, run_stages)


def _report_code_hash() -> str:
    """Hash of the report package's sources: a new report layout re-renders an unchanged run."""
    import hashlib

    import fairdeploy.report as report_pkg

    h = hashlib.sha256()
    for f in sorted(Path(report_pkg.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _budget_stage(entry: PruneEntry, bcfg: Any, stage_dir: Path, vanilla: Path, vanilla_hash: str, manifest: Any,
                  data_hash: str, cfg: PipelineConfig, progress: Progress, outcomes: list[StageOutcome],
                  trajectories: list[Trajectory], notes: list[str]) -> list[tuple[str, Path]]:
    """compress_checkpoint into stage_dir/model; the selected candidate and (unless control = "none") the
    control's selected checkpoint go on to export and validation, the latter as "<name>-control"."""
    from fairdeploy.pruning.budget import compress_checkpoint

    has_control = bcfg.control != "none"
    out = stage_dir / "model"
    outcomes.append(run_stage(
        stage_dir, f"prune {entry.name}",
        {"criterion": entry.criterion, "options": entry.options, "config": bcfg.to_dict(), "source": vanilla_hash,
         "data": data_hash, "device": cfg.device, **_nproc(cfg)},
        ["model", "model/prune.json", *(["model/control"] if has_control else [])],
        lambda: _launch(cfg, "budget", stage_dir, manifest, out, bcfg, model=vanilla) if cfg.nproc > 1 else
        compress_checkpoint(vanilla, manifest, out, bcfg, cfg.device, progress)))
    rec = read_json(out / "prune.json")
    trajectories.append(_trajectory(entry.name, rec))
    sel, budget = rec["selected"], rec["budget"]
    line = (f"{entry.name}: {rec['criterion']} pruning to {budget['metric']} x{budget['fraction']:g} of the input "
            f"model; selected {sel['model']} keeps x{sel['macs_fraction']:.3f} of its MACs "
            f"(x{sel['params_fraction']:.3f} of its parameters)")
    models = [(entry.name, out)]
    if has_control:
        ctrl = rec["runs"]["control"]
        what = ("fine-tuning alone (no pruning)" if rec["control"] == "finetune-only"
                else f"the fairness-blind {rec['control']} criterion at the same budget")
        line += (f"; stage {entry.name}-control is its control: {what}, with the same rounds, fine-tuning, data order "
                 f"and seed; x{ctrl['selected_size']['macs'] / budget['input']['macs']:.3f} of the MACs")
        models.append((f"{entry.name}-control", out / "control"))
    notes.append(line)
    notes.append(f"{entry.name}: {rec['comparison']['verdict']}")
    if not sel["guard_passed"]:
        where = (f"kept under {stage_dir.name}/model/rounds" if bcfg.keep_rounds
                 else "in prune.json (keep_rounds = true also keeps their checkpoints)")
        notes.append(f"{entry.name}: no model at the budget passed the guard on validation (every group within "
                     f"{bcfg.max_group_drop} accuracy of the input model, macro-F1 within {bcfg.max_f1_drop}); the "
                     f"stage hands on the one closest to passing (smallest shortfall beyond the tolerances), "
                     f"flagged; every round is {where}")
    return models


def _nproc(cfg: PipelineConfig) -> dict[str, int]:
    """The process count in a stage's inputs when it is not 1 (one-process stages keep their earlier hashes)."""
    return {"nproc": cfg.nproc} if cfg.nproc > 1 else {}


def _launch(cfg: PipelineConfig, kind: str, stage_dir: Path, manifest: Any, out: Path, config: Any, **kw: Any) -> None:
    """A train / prune / budget / finetune stage under torchrun with cfg.nproc processes (fairdeploy.pipeline.launch)."""
    from fairdeploy.pipeline.launch import run_under_torchrun

    run_under_torchrun(kind, cfg.nproc, stage_dir, manifest=manifest.source, images_root=str(manifest.root),
                       allow_outside_root=cfg.allow_outside_root, out=out, config=config, device=cfg.device, **kw)


def _guard_failure(ckpt: Path) -> str | None:
    """For the candidate (ckpt/prune.json) or control (ckpt/../prune.json) of a budget run: why its selected model
    failed the pruning guard on validation; None when it passed or ckpt is no budget run's model."""
    for rec_path, run_name in ((ckpt / "prune.json", "candidate"), (ckpt.parent / "prune.json", ckpt.name)):
        if rec_path.is_file():
            rec = read_json(rec_path)
            run_rec = rec.get("runs", {}).get(run_name) if rec.get("kind") == "budget" else None
            if run_rec is not None:
                if run_rec.get("guard_passed", True):
                    return None
                cfg = rec.get("params", {})
                return (f"pruning guard failed on validation: no model at the budget kept every group within "
                        f"{cfg.get('max_group_drop', '?')} accuracy of the input model and macro-F1 within "
                        f"{cfg.get('max_f1_drop', '?')} (the closest one was handed on)")
    return None


def _size(ckpt: Path) -> Any:
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size

    model, spec = load_checkpoint(ckpt, "cpu")
    return model_size(model, spec.image_size)


def _synth_config(cfg: PipelineConfig) -> Any:
    if cfg.synth is None:
        return None
    from fairdeploy.data.synth import SynthConfig

    synth = dict(cfg.synth)
    synth_cfg = load(SynthConfig, {"seed": cfg.seed, **synth}, cfg.source, "data.synth")
    synth_cfg.validate()
    return synth_cfg


def _train_plan(cfg: PipelineConfig) -> Path | tuple[str, int, Any]:
    """A given checkpoint, or (arch, image_size, FitConfig) to train one."""
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
    return arch, image_size, fit


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


def _weights(ckpt: Path) -> Path:
    from fairdeploy.models.checkpoint import WEIGHTS_FILE, resolve_checkpoint

    return resolve_checkpoint(ckpt) / WEIGHTS_FILE


def _slug(name: str) -> str:
    return name.replace("+", "-").replace("/", "-")
