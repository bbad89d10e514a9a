"""run_pipeline: data -> train -> prune (+ finetune) -> export -> validate -> report, skipping up-to-date stages."""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fairdeploy.data.manifest import read_manifest
from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.files.json_files import read_json
from fairdeploy.pipeline.config import PipelineConfig, PruneEntry
from fairdeploy.pipeline.resolve import ResolvedPipeline, resolve_pipeline
from fairdeploy.pipeline.stages import HashOf, Stage, StageOutcome, hash_path, run_stage
from fairdeploy.progress import Progress, no_progress
from fairdeploy.report.from_validation import stages_from_validation
from fairdeploy.report.render import REPORT_FILES
from fairdeploy.report.stages import STAGES_FILE, RunStages, StageRecord, Trajectory, write_stages


@dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    outcomes: tuple[StageOutcome, ...]
    stages: RunStages
    report_html: Path
    gate_failures: tuple[str, ...]
    notes: tuple[str, ...]


def _trajectories(name: str, prune_json: dict[str, Any]) -> list[Trajectory]:
    """Validation accuracy, macro-F1 and Eodd of every pruning step (step 0 = the input model); for a compression
    run, the frontier: every round of the candidate and of its control after fine-tuning (step = round; step 0 =
    the input model), with the MACs kept and whether the guard accepted the round."""
    if prune_json.get("kind") == "budget":
        def point(step: int, val: dict[str, Any], size: dict[str, Any] | None, passed: bool) -> dict[str, Any]:
            p = {"step": step, "accuracy": val["accuracy"], "f1_macro": val["f1_macro"],
                 "eodd": val["fairness"].get("eodd"), "worst_group_accuracy": val["worst_group_accuracy"],
                 "passed": passed}
            if size:
                p["macs"] = size["macs"]
            return p

        inp = prune_json["input"]
        start = point(0, inp["val"], inp.get("size") or (prune_json.get("budget") or {}).get("input"), True)
        out = []
        for run_name, run in prune_json["runs"].items():
            points = [start] + [point(r["round"], r["finetuned"]["val"], r["finetuned"].get("size"),
                                      r.get("passed", r["finetuned"].get("eligible", False)))
                                for r in run["rounds"]]
            label = name if run_name == "candidate" else f"{name}-control ({run['criterion']})"
            out.append(Trajectory(label, tuple(points)))
        return out
    points = []
    for rec in prune_json.get("steps", []):
        val = rec["val"]
        points.append({"step": rec["step"], "accuracy": val["accuracy"], "f1_macro": val["f1_macro"],
                       "eodd": val["fairness"]["eodd"]})
    return [Trajectory(name, tuple(points))]


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str | os.PathLike[str],
    progress: Progress = no_progress,
    allow_missing_trt: bool = True,
) -> PipelineResult:
    """Run every stage of `cfg` under run_dir; a stage whose inputs are unchanged is not run again."""
    plan = resolve_pipeline(cfg)  # every section parsed and checked before anything is written
    run = Path(run_dir)
    stages, models = plan_stages(plan, run, progress, allow_missing_trt)  # reads a given manifest: checked too
    run.mkdir(parents=True, exist_ok=True)
    outcomes = [stage.execute() for stage in stages]
    notes = [n for o in outcomes for n in o.notes]
    run_stages, gate_failures = collect(plan, run, models, notes)
    _write_if_changed(run / STAGES_FILE, run_stages)
    outcomes.append(report_stage(run))
    return PipelineResult(run, tuple(outcomes), run_stages, run / "report.html", tuple(gate_failures),
                          run_stages.notes)


@dataclass(frozen=True)
class ModelOut:
    """A model the pipeline exports and validates: its name in the report, its checkpoint, and the [[prune]] entry
    it comes from (None for the vanilla model)."""

    name: str
    checkpoint: Path
    entry: PruneEntry | None = None


def plan_stages(plan: ResolvedPipeline, run: Path, progress: Progress = no_progress,
                allow_missing_trt: bool = True) -> tuple[list[Stage], list[ModelOut]]:
    """The pipeline as data: data -> train -> prune (+ finetune) -> export and validate every model, each stage
    keyed on its resolved configuration and the hashes of the files it reads."""
    from fairdeploy.export.exporter import run_export
    from fairdeploy.files.json_files import write_json
    from fairdeploy.pruning.budget import compress_checkpoint
    from fairdeploy.pruning.run import prune_checkpoint
    from fairdeploy.training.finetune import finetune_checkpoint
    from fairdeploy.training.train import train_model
    from fairdeploy.validation.validate import validate

    cfg = plan.cfg
    stages: list[Stage] = []
    nproc = {"nproc": cfg.nproc} if cfg.nproc > 1 else {}  # one-process stages keep their earlier keys

    # 1. data
    if plan.synth is not None:
        from fairdeploy.data.synth import generate_synthetic

        stages.append(Stage("data", run / "data", {"synth": asdict(plan.synth)}, ("manifest.csv", "images"),
                            lambda: generate_synthetic(run / "data", plan.synth)))
        manifest_path, images_root = run / "data" / "manifest.csv", None
    else:
        manifest_path, images_root = Path(cfg.manifest or ""), cfg.images_root
    # read once, when a stage first needs it (the data stage writes a synthetic one first); a given one: now
    manifest = functools.cache(lambda: read_manifest(manifest_path, images_root,
                                                     allow_outside_root=cfg.allow_outside_root))
    if plan.synth is None:
        manifest()
    data = HashOf(manifest_path)

    # 2. train (or a given checkpoint)
    if isinstance(plan.train, Path):
        vanilla = plan.train
    else:
        tp = plan.train
        vanilla = run / "train" / "best"
        stages.append(Stage(
            "train", run / "train", {"arch": tp.arch, "image_size": tp.image_size, "fit": asdict(tp.fit), "data": data,
                                     "device": cfg.device, **nproc}, ("best",),
            lambda: _launch(cfg, "train", run / "train", manifest(), run / "train", tp.fit, arch=tp.arch,
                            image_size=tp.image_size) if cfg.nproc > 1 else
            train_model(manifest(), tp.arch, run / "train", tp.fit, tp.image_size, None, cfg.device, False, progress)))
    models = [ModelOut("vanilla", vanilla)]

    # 3. prune (+ finetune); a budget run's control is a model of its own, "<name>-control"
    for entry, pcfg, ft_cfg in zip(cfg.prune, plan.prune, plan.finetune_after):
        stage_dir = run / f"prune-{entry.name}"
        out = stage_dir / "model"
        common = {"source": HashOf(_weights_path(vanilla)), "data": data, "device": cfg.device, **nproc}
        if entry.is_budget:
            has_control = pcfg.control_run != "none"
            stages.append(Stage(
                f"prune {entry.name}", stage_dir, {"criterion": entry.criterion, "config": asdict(pcfg), **common},
                ("model", "model/prune.json", *(("model/control",) if has_control else ())),
                lambda pcfg=pcfg, stage_dir=stage_dir, out=out:
                _launch(cfg, "budget", stage_dir, manifest(), out, pcfg, model=vanilla) if cfg.nproc > 1 else
                compress_checkpoint(vanilla, manifest(), out, pcfg, cfg.device, progress)))
            models.append(ModelOut(entry.name, out, entry))
            if has_control:
                models.append(ModelOut(f"{entry.name}-control", out / "control", entry))
            continue
        stages.append(Stage(
            f"prune {entry.name}", stage_dir, {"method": entry.method, "config": asdict(pcfg), **common},
            ("model", "model/prune.json"),
            lambda pcfg=pcfg, stage_dir=stage_dir, out=out:
            _launch(cfg, "prune", stage_dir, manifest(), out, pcfg, model=vanilla) if cfg.nproc > 1 else
            prune_checkpoint(vanilla, manifest(), out, pcfg, cfg.device, progress)))
        models.append(ModelOut(entry.name, out, entry))
        if ft_cfg is not None:
            ft_dir = run / f"finetune-{entry.name}"
            stages.append(Stage(
                f"finetune {entry.name}", ft_dir, {"fit": asdict(ft_cfg), "source": HashOf(out / "model.safetensors"),
                                                   "data": data, **nproc}, ("model",),
                lambda out=out, ft_dir=ft_dir, ft_cfg=ft_cfg:
                _launch(cfg, "finetune", ft_dir, manifest(), ft_dir / "model", ft_cfg, model=out) if cfg.nproc > 1 else
                finetune_checkpoint(out, manifest(), ft_dir / "model", ft_cfg, cfg.device, progress)))
            models.append(ModelOut(f"{entry.name}+ft", ft_dir / "model", entry))

    # 4. export and 5. validate every model
    options, vcfg = plan.export, plan.validate
    onnx_names = tuple(f"model.{p}.onnx" for p in options.precisions)
    for m in models:
        exp_dir, val_dir = run / f"export-{_slug(m.name)}", run / f"validate-{_slug(m.name)}"

        def do_export(ckpt: Path = m.checkpoint, exp_dir: Path = exp_dir) -> list[str]:
            try:
                run_export(ckpt, exp_dir, options, data=manifest_path, images_root=images_root, seed=cfg.seed,
                           allow_outside_root=cfg.allow_outside_root, progress=progress)
            except MissingDependencyError as exc:
                if not allow_missing_trt:
                    raise
                return [f"TensorRT engines not built: {exc}"]
            return []

        def candidates(exp_dir: Path = exp_dir) -> list[Path]:
            return [exp_dir / n for n in onnx_names] + sorted(exp_dir.glob("*.engine"))

        def do_validate(ckpt: Path = m.checkpoint, candidates: Any = candidates, val_dir: Path = val_dir) -> None:
            result = validate(ckpt, candidates(), manifest(), vcfg, device=cfg.device, progress=progress)
            write_json(val_dir / "validation.json", result.to_dict())

        source = HashOf(_weights_path(m.checkpoint))
        stages.append(Stage(f"export {m.name}", exp_dir, {"options": options.to_dict(), "source": source, "data": data},
                            (*onnx_names, "export.json"), do_export))
        stages.append(Stage(f"validate {m.name}", val_dir, {"config": asdict(vcfg), "source": source,
                                                            "candidates": HashOf(exp_dir), "data": data},
                            ("validation.json",), do_validate))
    return stages, models


def collect(plan: ResolvedPipeline, run: Path, models: list[ModelOut], notes: list[str]
            ) -> tuple[RunStages, list[str]]:
    """The run's stage records for the report (one per validated artifact, with its model's size and pruning
    guard), pruning trajectories, notes and gate failures, from the files the stages wrote."""
    notes = list(notes)
    trajectories: list[Trajectory] = []
    for entry, pcfg in zip(plan.cfg.prune, plan.prune):
        rec = read_json(run / f"prune-{entry.name}" / "model" / "prune.json")
        trajectories.extend(_trajectories(entry.name, rec))
        notes.extend(_budget_notes(entry, pcfg, rec) if entry.is_budget else _method_notes(entry, rec))
    all_stages: list[StageRecord] = []
    gate_failures: list[str] = []
    for m in models:
        val_path = run / f"validate-{_slug(m.name)}" / "validation.json"
        vj = read_json(val_path)
        gate_failures.extend(f"{m.name}: {f}" for f in vj.get("failures", []))
        # every artifact of a model has its architecture: the MACs and parameters validate counted on the reference
        size = vj.get("model_size") or _size(m.checkpoint).to_dict()  # (a validation.json from before that field)
        guard = _guard_failure(m.checkpoint)  # a budget model that failed its pruning guard: no artifact passes
        all_stages.extend(replace(s, macs=size["macs"], params=size["params"], guard_failure=guard)
                          for s in stages_from_validation(vj, str(val_path), prefix=m.name).stages)
    return (RunStages(tuple(all_stages), tuple(trajectories), plan.validate.split, plan.cfg.title, tuple(notes)),
            gate_failures)


def _method_notes(entry: PruneEntry, rec: dict[str, Any]) -> list[str]:
    if rec.get("selected_step") == 0:
        return [(f"{entry.name}: no pruned step passed the levelling-down guard on validation "
                 f"({rec.get('stopped_because')}); this stage hands the input model on")]
    return []


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


def _budget_notes(entry: PruneEntry, bcfg: Any, rec: dict[str, Any]) -> list[str]:
    """What a compression run did, its control, how far each reached (tolerance search), the paired verdict and,
    when no model passed the guard, what was handed on (from its prune.json)."""
    sel, budget = rec["selected"], rec.get("budget")
    if budget is not None:
        line = (f"{entry.name}: {rec['criterion']} pruning to {budget['metric']} x{budget['fraction']:g} of the input "
                f"model; selected {sel['model']} keeps x{sel['macs_fraction']:.3f} of its MACs "
                f"(x{sel['params_fraction']:.3f} of its parameters)")
    else:
        tol = rec["tolerance"]
        line = (f"{entry.name}: {rec['criterion']} compressing as far as every group stays within "
                f"{tol['max_group_drop']:g} validation accuracy of the input model (rounds of x{tol['step']:g} "
                f"{tol['metric']}); it hands on {sel['model']}, x{sel['macs_fraction']:.3f} of the MACs "
                f"(x{sel['params_fraction']:.3f} of the parameters); {rec['runs']['candidate']['stopped_because']}")
    input_macs = rec["input"].get("size", budget["input"] if budget else {})["macs"]
    if bcfg.control_run != "none":
        ctrl = rec["runs"]["control"]
        what = {"finetune-only": "fine-tuning alone (no pruning)",
                "plain-recovery": f"{rec['criterion']} with plain recovery (no per-group constraint)"}.get(
            rec["control"], f"the fairness-blind {rec['control']} criterion")
        line += (f"; stage {entry.name}-control is its control: {what}, with the same schedule, fine-tuning, data "
                 f"order and seed; x{ctrl['selected_size']['macs'] / input_macs:.3f} of the MACs")
    notes = [line, f"{entry.name}: {rec['comparison']['verdict']}"]
    if not sel["guard_passed"]:
        where = (f"kept under prune-{entry.name}/model/rounds" if bcfg.keep_rounds
                 else "in prune.json (keep_rounds = true also keeps their checkpoints)")
        notes.append(f"{entry.name}: no model at the budget passed the guard on validation (every group within "
                     f"{bcfg.max_group_drop} accuracy of the input model, macro-F1 within {bcfg.max_f1_drop}); the "
                     f"stage hands on the one closest to passing (smallest shortfall beyond the tolerances), "
                     f"flagged; every round is {where}")
    return notes


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
    from fairdeploy.models.size import checkpoint_size

    return checkpoint_size(ckpt)[0]


def _weights_path(ckpt: Path) -> Path:
    """A checkpoint folder's weights file (hashed when its stage is reached: it may not be written yet)."""
    from fairdeploy.models.checkpoint import WEIGHTS_FILE

    return ckpt / WEIGHTS_FILE


def _slug(name: str) -> str:
    return name.replace("+", "-").replace("/", "-")
