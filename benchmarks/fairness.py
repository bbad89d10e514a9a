"""Fairness after deployment: test Eodd / accuracy of vanilla, FairPrune (weight, channel) and SNNL models, in
PyTorch and as FP32 / INT8 ONNX, over several seeds, with confidence intervals.

For each seed: synthetic biased data (the seed also draws the data), a resnet18 trained on it, each pruning
method run through ``prune_checkpoint`` exactly as ``fairdeploy prune`` would (selection on validation, guard
against levelling down, so a method may keep the input model: the selected step is reported), every model
exported with ``run_export`` (FP32 + INT8 Q/DQ calibrated on a group x class balanced set), and the PyTorch
model and both ONNX files re-validated on the test split with ``validate`` (same images, same preprocessing).

The pruning methods run with the library's defaults (as ``fairdeploy prune`` and the demo do) unless a flag
changes them. Reported per (method, runtime): mean over seeds with a 95% t-interval of accuracy, each group's accuracy and
Eodd, the paired change of Eodd against vanilla in the same seed, and the per-seed bootstrap interval of Eodd;
and, from prune.json, the validation metrics of every pruning step (what the guard saw).

    python benchmarks/fairness.py                 # 3 seeds on the CPU, about 10 minutes on 2 idle cores
    python benchmarks/fairness.py --seeds 0 1 2 3 4 --device cuda
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

METHODS = ("vanilla", "fairprune-weight", "fairprune-channel", "snnl")
RUNTIMES = ("pytorch", "onnx-fp32", "onnx-int8")


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/fairness.json")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=1200, help="synthetic images per seed (60/20/20 split)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="pruning steps at most (default: the library's)")
    p.add_argument("--weight-ratio", type=float, default=None, help="FairPrune weight: fraction per step")
    p.add_argument("--channel-ratio", type=float, default=None, help="FairPrune channel: fraction per step")
    p.add_argument("--snnl-channels", type=int, default=None, help="SNNL: channels of the last conv per round")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune after each channel step (0: none, "
                                                                  "like the demo)")
    p.add_argument("--calib-size", type=int, default=96)
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--work", default=None, help="folder for data, models and exports (default: a temp dir)")
    return p.parse_args(argv)


def prune_config(method: str, args, seed: int):
    """The method as `fairdeploy prune` runs it by default; only the flags given here change it."""
    from fairdeploy.pruning import FairPruneConfig, PruneConfig, SnnlConfig, StopRule
    from fairdeploy.training.loop import FitConfig

    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
    stop = StopRule(**given(steps=args.steps))
    tune = FitConfig(epochs=args.finetune_epochs, batch_size=64, lr=5e-4, seed=seed) if args.finetune_epochs else None
    if method == "fairprune-weight":  # the paper: weight-level, no fine-tuning
        return PruneConfig(method="fairprune", stop=stop, seed=seed,
                           fairprune=FairPruneConfig(granularity="weight", **given(ratio=args.weight_ratio)))
    if method == "fairprune-channel":
        return PruneConfig(method="fairprune", stop=stop, finetune=tune, seed=seed,
                           fairprune=FairPruneConfig(granularity="channel", **given(ratio=args.channel_ratio)))
    return PruneConfig(method="snnl", snnl=SnnlConfig(**given(channels_per_round=args.snnl_channels)), stop=stop,
                       finetune=tune, seed=seed)


def summary(report) -> dict[str, Any]:
    iv = dict(report.intervals)
    return {"accuracy": report.overall_accuracy, "f1_macro": report.overall_f1_macro, "eodd": report.gap("eodd"),
            "eodd_ci": list(iv["eodd"]) if "eodd" in iv else None,
            "group_accuracy": {g: m.accuracy for g, m in report.groups}, "n": report.n}


def run_seed(seed: int, args, device, work: Path) -> dict[str, Any]:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options
    from fairdeploy.models.checkpoint import checkpoint_hash
    from fairdeploy.pruning import prune_checkpoint
    from fairdeploy.validation import ValidationConfig, validate

    print(f"... seed {seed}: data and vanilla model", file=sys.stderr, flush=True)
    manifest_path, vanilla = common.synthetic_checkpoint(work, seed, args.images, args.image_size, args.epochs,
                                                         str(device), args.arch)
    manifest = read_manifest(manifest_path)
    models: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for method in args.methods:
        if method == "vanilla":
            models[method] = vanilla
            continue
        print(f"... seed {seed}: {method}", file=sys.stderr, flush=True)
        res = prune_checkpoint(vanilla, manifest, work / f"seed{seed}" / method, prune_config(method, args, seed),
                               device=str(device))
        rec = res.record
        before, after = rec.steps[0].size, rec.size_after
        info[method] = {"selected_step": rec.selected_step, "steps_run": len(rec.steps) - 1,
                        "stopped_because": rec.stopped_because, "macs_ratio": before.macs / after.macs,
                        "nonzero_params_kept": after.nonzero_params / before.nonzero_params,
                        "seconds": rec.seconds, "unprivileged": rec.groups.unprivileged,
                        "val_steps": [{"step": st.step, "eligible": st.eligible,
                                       "accuracy": st.val.accuracy, "eodd": st.val.fairness["eodd"],
                                       "group_accuracy": st.val.group_accuracy, "macs": st.size.macs,
                                       "nonzero_params": st.size.nonzero_params} for st in rec.steps]}
        models[method] = res.out_dir
    out: dict[str, Any] = {"seed": seed, "manifest": str(manifest_path), "prune": info, "metrics": {}}
    done: dict[str, dict[str, Any]] = {}  # weights hash -> metrics: a method that kept its input is not redone
    for method, ckpt in models.items():
        digest = checkpoint_hash(ckpt)
        if digest in done:
            out["metrics"][method] = done[digest]
            continue
        print(f"... seed {seed}: export + validate {method}", file=sys.stderr, flush=True)
        ex = run_export(ckpt, work / f"seed{seed}" / "export" / method,
                        resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {"size": args.calib_size}}),
                        calib_data=manifest_path, seed=seed)
        cfg = ValidationConfig(split="test", bootstrap=args.bootstrap, seed=seed, latency=None)
        result = validate(ckpt, [ex.onnx["fp32"], ex.onnx["int8"]], manifest, cfg, backend="auto", device=str(device))
        out["metrics"][method] = done[digest] = {"pytorch": summary(result.reference.metrics),
                                                 "onnx-fp32": summary(result.candidates[0].run.metrics),
                                                 "onnx-int8": summary(result.candidates[1].run.metrics)}
    return out


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the t-interval across seeds (None with one seed)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    try:
        from scipy.stats import t

        q = float(t.ppf(0.5 + confidence / 2, len(values) - 1))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        q = 1.96
    return m, q * statistics.stdev(values) / math.sqrt(len(values))


def pm(m: float, h: float | None) -> str:
    return f"{m:.3f}" if h is None else f"{m:.3f} ± {h:.3f}"


def aggregate(seeds: list[dict[str, Any]], methods: list[str], groups: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        for runtime in RUNTIMES:
            per = [s["metrics"][method][runtime] for s in seeds]
            row: dict[str, Any] = {"method": method, "runtime": runtime, "seeds": len(per)}
            for key in ("accuracy", "f1_macro", "eodd"):
                row[key] = mean_ci([p[key] for p in per])
            for g in groups:
                row[f"accuracy[{g}]"] = mean_ci([p["group_accuracy"][g] for p in per])
            if "vanilla" in methods:
                row["eodd_change_vs_vanilla"] = mean_ci(
                    [p["eodd"] - s["metrics"]["vanilla"][runtime]["eodd"] for p, s in zip(per, seeds)])
            if runtime == "onnx-int8":
                row["eodd_int8_minus_fp32"] = mean_ci(
                    [p["eodd"] - s["metrics"][method]["onnx-fp32"]["eodd"] for p, s in zip(per, seeds)])
            if method != "vanilla":
                row["selected_steps"] = [s["prune"][method]["selected_step"] for s in seeds]
                row["macs_ratio"] = statistics.fmean(s["prune"][method]["macs_ratio"] for s in seeds)
                row["nonzero_params_kept"] = statistics.fmean(s["prune"][method]["nonzero_params_kept"] for s in seeds)
            rows.append(row)
    return rows


def trajectory(seeds: list[dict[str, Any]], methods: list[str], groups: list[str]) -> list[dict[str, Any]]:
    """Mean validation metrics of every pruning step over the seeds that ran it."""
    rows = []
    for method in methods:
        longest = max(len(s["prune"][method]["val_steps"]) for s in seeds)
        for step in range(longest):
            recs = [s["prune"][method]["val_steps"][step] for s in seeds if step < len(s["prune"][method]["val_steps"])]
            base = [s["prune"][method]["val_steps"][0] for s in seeds if step < len(s["prune"][method]["val_steps"])]
            row = {"method": method, "step": step, "seeds": len(recs), "eligible": sum(r["eligible"] for r in recs),
                   "accuracy": statistics.fmean(r["accuracy"] for r in recs),
                   "eodd": statistics.fmean(r["eodd"] for r in recs),
                   "macs_ratio": statistics.fmean(b["macs"] / r["macs"] for r, b in zip(recs, base)),
                   "nonzero_params_kept": statistics.fmean(r["nonzero_params"] / b["nonzero_params"]
                                                           for r, b in zip(recs, base))}
            for g in groups:
                row[f"accuracy[{g}]"] = statistics.fmean(r["group_accuracy"][g] for r in recs)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    device = common.resolve(args.device)
    torch.manual_seed(args.seed)
    info = common.machine(device)
    print(f"# fairness after deployment on {common.describe_machine(info)}", flush=True)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="fairdeploy-fairness-")
    work = Path(args.work) if args.work else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        seeds = [run_seed(s, args, device, work) for s in args.seeds]
    finally:
        if tmp is not None:
            tmp.cleanup()
    groups = list(seeds[0]["metrics"][args.methods[0]]["pytorch"]["group_accuracy"])
    rows = aggregate(seeds, args.methods, groups)
    n = len(args.seeds)
    print()
    print(f"test split, mean over {n} seed(s) ± half-width of the 95% t-interval across seeds; "
          f"unprivileged group: {', '.join(sorted({v['unprivileged'] for s in seeds for v in s['prune'].values()})) or '-'}")
    headers = ["method", "runtime", "accuracy", *[f"acc {g}" for g in groups], "Eodd", "ΔEodd vs vanilla (paired)",
               "INT8 − FP32 Eodd", "MAC ratio", "selected steps"]
    table_rows = []
    for r in rows:
        table_rows.append([
            r["method"], r["runtime"], pm(*r["accuracy"]), *[pm(*r[f"accuracy[{g}]"]) for g in groups], pm(*r["eodd"]),
            pm(*r["eodd_change_vs_vanilla"]) if "eodd_change_vs_vanilla" in r else "-",
            pm(*r["eodd_int8_minus_fp32"]) if "eodd_int8_minus_fp32" in r else "-",
            r.get("macs_ratio"), ",".join(str(x) for x in r["selected_steps"]) if "selected_steps" in r else "-",
        ])
    print(common.table(headers, table_rows))
    print()
    print("per seed (Eodd with its bootstrap 95% interval, resampling within groups)")
    per_rows = []
    for s in seeds:
        for method in args.methods:
            cells = []
            for runtime in RUNTIMES:
                m = s["metrics"][method][runtime]
                ci = m["eodd_ci"]
                cells.append(f"{m['eodd']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['eodd']:.3f}")
            acc = s["metrics"][method]["pytorch"]["accuracy"]
            per_rows.append([s["seed"], method, acc, *cells])
    print(common.table(["seed", "method", "acc (pytorch)", *[f"Eodd {r}" for r in RUNTIMES]], per_rows))
    print()
    print("validation split, every pruning step (step 0 = vanilla; 'eligible' = passed the guard), mean over seeds")
    traj = trajectory(seeds, [m for m in args.methods if m != "vanilla"], groups)
    print(common.table(["method", "step", "seeds", "eligible", "val acc", *[f"val acc {g}" for g in groups],
                        "val Eodd", "MAC ratio", "non-zero params kept"],
                       [[t["method"], t["step"], t["seeds"], f"{t['eligible']}/{t['seeds']}", t["accuracy"],
                         *[t[f"accuracy[{g}]"] for g in groups], t["eodd"], t["macs_ratio"],
                         t["nonzero_params_kept"]] for t in traj]))
    results = {"seeds": seeds, "trajectory": traj, "summary": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                                           for r in rows],
               "groups": groups, "interval": "mean ± half-width of the 95% t-interval across seeds"}
    out = common.write_results(args.out, "fairness", args, info, results)
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
