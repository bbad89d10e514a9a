"""Deployed speed-up vs MACs: dense vs channel-pruned models through ONNX Runtime (and PyTorch CUDA, TensorRT).

One run, on one trained model (resnet18 on the synthetic biased data, 32x32, trained here or given):

1. pruned variants, all physically smaller models (torch-pruning), all from the same dense weights:
   * ``magnitude-uniform-0.5``  every prunable channel group keeps half its channels (lowest L1 of the coupled
                                weights removed, counts aligned to 8): the issue's "about half the channels";
   * ``fairprune-channel-R``    one FairPrune channel step at ratio R (fisher curvature, the library's
                                FairPruneStep: global selection, counts aligned to 8);
   * ``magnitude-R``            the same number of channels per group as fairprune-channel-R, chosen by L1
                                magnitude: identical shapes (checked), so identical speed, a fairness control;
   * ``snnl-F``                 one SNNL round removing a fraction F of the last conv layer's channels.
2. validation accuracy and Eodd of each FairPrune / magnitude pair, before and after the same short fine-tune;
3. every variant exported with ``run_export`` at ``--image-size`` (FP32, and INT8 Q/DQ for ``--int8`` models),
   timed with ``measure_latency`` through ``runner_from_artifact`` at batch 1 and 8, round-robin over models;
4. speed-up vs dense (same runtime, precision, batch) against the MAC ratio, INT8 vs FP32.

    python benchmarks/latency.py                      # CPU defaults, a few minutes
    python benchmarks/latency.py --device cuda        # adds PyTorch CUDA (and TensorRT when importable)
"""

from __future__ import annotations

import copy
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

TARGET_SPEEDUP_OVER_MACS = 0.85  # issue 5: ORT CPU speed-up at batch 8 >= 0.85x the MAC ratio (about half channels)


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/latency.json")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (default: train one on synthetic data)")
    p.add_argument("--data", default=None, help="manifest of --checkpoint (needed with it)")
    p.add_argument("--work", default=None, help="folder for the trained model and exports (default: a temp dir)")
    p.add_argument("--train-images", type=int, default=1200)
    p.add_argument("--train-size", type=int, default=32, help="image size the model is trained and evaluated at")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224, help="image size the exported models are timed at")
    p.add_argument("--fairprune-ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--snnl-fractions", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--uniform", type=float, default=0.5, help="fraction of channels removed per group (0: skip)")
    p.add_argument("--score-samples", type=int, default=64, help="FairPrune curvature samples per group")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tune of each FairPrune/magnitude pair (0: none)")
    p.add_argument("--int8", nargs="*", default=["dense", "magnitude-uniform-0.5", "fairprune-channel-0.5"],
                   help="variants also exported and timed as INT8 Q/DQ")
    p.add_argument("--calib-size", type=int, default=48)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the models (median of rounds)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10, help="timed calls per model, batch size and round")
    p.add_argument("--torch-cpu", action="store_true", help="also time PyTorch on the CPU")
    p.add_argument("--bootstrap", type=int, default=500)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------
# building the variants
# ------------------------------------------------------------------------------------------------------

def _groups(model, arch: str, image_size: int):
    from fairdeploy.models.registry import classifier_head_name
    from fairdeploy.pruning.structured import channel_groups, dependency_graph

    dg = dependency_graph(model, image_size, next(model.parameters()).device)
    return dg, channel_groups(dg, model, ignored=[classifier_head_name(arch)])


def prunable_channels(model, arch: str, image_size: int) -> int:
    return sum(g.channels for g in _groups(model, arch, image_size)[1])


def magnitude_scores(model) -> dict[str, Any]:
    """|w| of every conv/linear weight: summed over a coupled group, the group's L1 magnitude."""
    from torch import nn

    return {f"{n}.weight": m.weight.detach().abs().float().cpu() for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_by_counts(model, arch: str, image_size: int, counts: dict[str, int]) -> dict[str, list[int]]:
    """Remove counts[root] lowest-magnitude channels of each coupled group, in place; returns the removed ids."""
    import torch

    from fairdeploy.pruning.structured import group_channel_scores, prune_out_channels

    dg, groups = _groups(model, arch, image_size)
    scores = magnitude_scores(model)
    plan = {g.root: group_channel_scores(dg, g.group, scores) for g in groups}  # all scored before any removal
    unknown = sorted(set(counts) - set(plan))
    if unknown:
        raise RuntimeError(f"no prunable group rooted at {unknown[0]}")
    modules = dict(model.named_modules())
    removed = {}
    for root, n in counts.items():
        if n <= 0:
            continue
        idxs = sorted(torch.argsort(plan[root], stable=True)[:n].tolist())
        prune_out_channels(dg, modules[root], idxs)
        removed[root] = idxs
    return removed


def uniform_counts(model, arch: str, image_size: int, fraction: float, round_to: int = 8) -> dict[str, int]:
    from fairdeploy.pruning.structured import aligned_removal

    return {g.root: aligned_removal(round(fraction * g.channels), g.channels, round_to)
            for g in _groups(model, arch, image_size)[1]}


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class Context:
    """The trained model, its data and the datasets every variant is scored / evaluated / fine-tuned on."""

    def __init__(self, manifest_path: Path, ckpt: Path, device, seed: int, score_samples: int):
        from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
        from fairdeploy.data.manifest import read_manifest
        from fairdeploy.models.checkpoint import load_checkpoint
        from fairdeploy.pruning.roles import decide_roles
        from fairdeploy.pruning.scoresets import group_score_sets
        from fairdeploy.training.loop import evaluate_model
        from fairdeploy.training.train import spec_datasets

        self.manifest_path, self.ckpt, self.device, self.seed = manifest_path, ckpt, device, seed
        self.manifest = read_manifest(manifest_path)
        self.model, self.spec = load_checkpoint(ckpt, device)
        self.train_ds, self.val_ds = spec_datasets(self.manifest, self.spec)
        enc = Encoding(self.spec.classes, self.spec.groups)
        self.score_ds = split_dataset(self.manifest, "train", enc,
                                      eval_transform(self.spec.image_size, self.spec.mean, self.spec.std))
        self.baseline = evaluate_model(self.model, self.val_ds, self.spec, device)
        self.roles = decide_roles(self.baseline)
        ids = [self.spec.groups.index(self.roles.unprivileged), self.spec.groups.index(self.roles.privileged)]
        sets = group_score_sets(self.score_ds.labels, self.score_ds.groups, ids, score_samples, seed)
        self.score_sets = {self.roles.unprivileged: sets[ids[0]], self.roles.privileged: sets[ids[1]]}

    def fresh(self):
        return copy.deepcopy(self.model)


def fairprune_channels(ctx: Context, ratio: float, score_samples: int):
    from fairdeploy.pruning.fairprune import FairPruneConfig, FairPruneStep

    cfg = FairPruneConfig(granularity="channel", curvature="fisher", ratio=ratio, score_samples=score_samples)
    step = FairPruneStep(cfg, ctx.spec.arch, ctx.spec.image_size, ctx.score_ds, ctx.score_sets,
                         ctx.roles.unprivileged, ctx.roles.privileged, ctx.device, ctx.seed)
    out = step(ctx.fresh(), {}, 1)
    return out.model, {root: len(ids) for root, ids in out.removed["channels"].items()}


def snnl_channels(ctx: Context, fraction: float):
    from fairdeploy.pruning.layers import resolve_feature_layers
    from fairdeploy.pruning.scoresets import balanced_batch_order
    from fairdeploy.pruning.snnl_prune import SnnlConfig, SnnlStep

    model = ctx.fresh()
    layer = resolve_feature_layers(model, "last", ctx.spec.arch)[0]
    channels = dict(model.named_modules())[layer].out_channels
    n = max(8, round(fraction * channels / 8) * 8)
    cfg = SnnlConfig(channels_per_round=n, max_channels=n, round_to=8)
    present = sorted(set(ctx.score_ds.groups))
    order, bs = balanced_batch_order(ctx.score_ds.groups, present, cfg.batch_size, cfg.batches, ctx.seed)
    out = SnnlStep(cfg, ctx.spec.arch, ctx.spec.image_size, ctx.score_ds, order, bs, ctx.device)(model, {}, 1)
    return out.model, {"layer": layer, "removed": out.removed["channels_removed"], "of": channels}


def metrics_summary(report) -> dict[str, Any]:
    iv = dict(report.intervals)
    return {"accuracy": report.overall_accuracy, "f1_macro": report.overall_f1_macro, "eodd": report.gap("eodd"),
            "eodd_ci": list(iv["eodd"]) if "eodd" in iv else None,
            "group_accuracy": {g: m.accuracy for g, m in report.groups}}


def evaluate(ctx: Context, model, bootstrap: int) -> dict[str, Any]:
    from fairdeploy.training.loop import evaluate_model

    return metrics_summary(evaluate_model(model, ctx.val_ds, ctx.spec, ctx.device, bootstrap=bootstrap,
                                          seed=ctx.seed))


def finetune(ctx: Context, model, epochs: int, scratch: Path):
    from fairdeploy.training.finetune import finetune_model
    from fairdeploy.training.loop import FitConfig

    cfg = FitConfig(epochs=epochs, batch_size=64, lr=5e-4, seed=ctx.seed)
    best, _ = finetune_model(model, ctx.spec, ctx.train_ds, ctx.val_ds, cfg, scratch, ctx.device)
    return best


# ------------------------------------------------------------------------------------------------------
# export and timing
# ------------------------------------------------------------------------------------------------------

def export_variant(ctx: Context, name: str, model, image_size: int, int8: bool, calib_size: int, work: Path,
                   tensorrt: bool) -> dict[str, Any]:
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options
    from fairdeploy.models.checkpoint import save_checkpoint

    ckpt = work / "checkpoints" / name
    save_checkpoint(model.to("cpu"), replace(ctx.spec, image_size=image_size), ckpt)
    precisions = ("fp32", "int8") if int8 else ("fp32",)
    options = resolve_options(None, {"onnx": {"precision": precisions}, "calibration": {"size": calib_size},
                                     "tensorrt": {"enabled": tensorrt, "opt_batch": 8, "max_batch": 8}})
    result = run_export(ckpt, work / "exports" / name, options, calib_data=ctx.manifest_path, seed=ctx.seed)
    return {"checkpoint": ckpt, "onnx": dict(result.onnx), "engines": dict(result.engines)}


def aggregate(stats: list) -> dict[str, Any]:
    """Rounds of LatencyStats of one (artifact, batch): median of the round p50s, overall throughput."""
    import statistics

    total_s = sum(s.mean_ms * s.iterations for s in stats) / 1e3
    images = sum(s.batch_size * s.iterations for s in stats)
    return {"batch_size": stats[0].batch_size, "rounds": len(stats), "iterations_per_round": stats[0].iterations,
            "p50_ms": statistics.median(s.p50_ms for s in stats), "p95_ms": max(s.p95_ms for s in stats),
            "min_ms": min(s.min_ms for s in stats), "throughput_ips": images / total_s if total_s else float("nan"),
            "round_p50_ms": [s.p50_ms for s in stats]}


def time_artifacts(artifacts: dict[tuple[str, str, str], tuple[str, str, Any]], image_size: int, args) -> dict:
    """artifacts: (variant, backend, precision) -> (path, backend name, device). Round-robin timing."""
    import numpy as np

    from fairdeploy.runtime import runner_from_artifact
    from fairdeploy.validation.latency import LatencyConfig, measure_latency

    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((max(args.batch_sizes), 3, image_size, image_size)).astype(np.float32)
    cfg = LatencyConfig(batch_sizes=tuple(args.batch_sizes), warmup=args.warmup, iterations=args.iterations)
    raw: dict[tuple, dict[int, list]] = {k: {b: [] for b in args.batch_sizes} for k in artifacts}
    for r in range(args.rounds):
        print(f"... timing round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for key, (path, backend, device) in artifacts.items():
            # One live runner at a time: ONNX Runtime sessions whose calls alternate in one process slow each
            # other down (their idle intra-op threads spin on the same cores), which is not the model's cost.
            with runner_from_artifact(path, backend=backend, device=device) as runner:
                for st in measure_latency(runner, images, cfg):
                    raw[key][st.batch_size].append(st)
    return {key: {b: aggregate(v) for b, v in per.items()} for key, per in raw.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from fairdeploy.models.size import model_size

    device = common.resolve(args.device)
    if (args.checkpoint is None) != (args.data is None):
        common.fail("--checkpoint and --data go together (the manifest the checkpoint was trained on)")
    torch.manual_seed(args.seed)
    info = common.machine(device)
    print(f"# deployed speed-up vs MACs on {common.describe_machine(info)}", flush=True)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="fairdeploy-latency-")
    work = Path(args.work) if args.work else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.checkpoint:
            manifest, ckpt = Path(args.data), Path(args.checkpoint)
        else:
            print("... training the dense model on synthetic data", file=sys.stderr, flush=True)
            manifest, ckpt = common.synthetic_checkpoint(work, args.seed, args.train_images, args.train_size,
                                                         args.epochs, str(device), args.arch)
        ctx = Context(manifest, ckpt, device, args.seed, args.score_samples)
        arch, train_size = ctx.spec.arch, ctx.spec.image_size
        total_channels = prunable_channels(ctx.model, arch, train_size)

        variants: dict[str, dict[str, Any]] = {"dense": {"method": "dense", "model": ctx.fresh()}}
        if args.uniform > 0:
            m = ctx.fresh()
            prune_by_counts(m, arch, train_size, uniform_counts(m, arch, train_size, args.uniform))
            variants[f"magnitude-uniform-{args.uniform:g}"] = {"method": "magnitude (uniform)", "model": m}
        pairs = []
        for r in args.fairprune_ratios:
            print(f"... FairPrune channel step, ratio {r}", file=sys.stderr, flush=True)
            fp_model, counts = fairprune_channels(ctx, r, args.score_samples)
            mag = ctx.fresh()
            prune_by_counts(mag, arch, train_size, counts)
            fp_name, mag_name = f"fairprune-channel-{r:g}", f"magnitude-{r:g}"
            variants[fp_name] = {"method": "FairPrune channel", "model": fp_model, "removed_per_group": counts}
            variants[mag_name] = {"method": "magnitude (same counts)", "model": mag, "removed_per_group": counts}
            pairs.append((r, fp_name, mag_name))
        for f in args.snnl_fractions:
            print(f"... SNNL round, fraction {f}", file=sys.stderr, flush=True)
            m, removed = snnl_channels(ctx, f)
            variants[f"snnl-{f:g}"] = {"method": "SNNL (last conv)", "model": m, "snnl": removed}

        dense_macs = None
        for name, v in variants.items():
            size = model_size(v["model"].to("cpu"), args.image_size)
            v["params"], v["macs"] = size.params, size.macs
            v["channels_kept"] = prunable_channels(v["model"], arch, train_size) / total_channels
            dense_macs = dense_macs or (size.macs if name == "dense" else None)
        for v in variants.values():
            v["mac_ratio"] = dense_macs / v["macs"]

        # fairness of the selected channels: FairPrune vs magnitude at the same counts (same shapes)
        comparisons = []
        for r, fp_name, mag_name in pairs:
            same = shapes(variants[fp_name]["model"]) == shapes(variants[mag_name]["model"])
            entry: dict[str, Any] = {"ratio": r, "fairprune": fp_name, "magnitude": mag_name, "identical_shapes": same,
                                     "before_finetune": {}, "after_finetune": {}}
            for name in (fp_name, mag_name):
                entry["before_finetune"][name] = evaluate(ctx, variants[name]["model"].to(device), args.bootstrap)
                if args.finetune_epochs > 0:
                    print(f"... fine-tuning {name}", file=sys.stderr, flush=True)
                    tuned = finetune(ctx, variants[name]["model"].to(device), args.finetune_epochs,
                                     work / "finetune" / name)
                    entry["after_finetune"][name] = evaluate(ctx, tuned, args.bootstrap)
            comparisons.append(entry)
        baseline = metrics_summary(ctx.baseline)

        # export (FP32 for all, INT8 for --int8) at the timing size, then time round-robin
        tensorrt = False
        if device.type == "cuda":
            try:
                import tensorrt as _trt  # noqa: F401

                tensorrt = True
            except ImportError:
                tensorrt = False
        artifacts: dict[tuple[str, str, str], tuple[str, str, Any]] = {}
        for name, v in variants.items():
            print(f"... exporting {name}", file=sys.stderr, flush=True)
            ex = export_variant(ctx, name, v["model"], args.image_size, name in args.int8, args.calib_size, work,
                                tensorrt)
            for precision, path in ex["onnx"].items():
                artifacts[(name, "onnxruntime-cpu", precision)] = (str(path), "onnxruntime", "cpu")
            if device.type == "cuda":
                artifacts[(name, "torch-cuda", "fp32")] = (str(ex["checkpoint"]), "torch", str(device))
            if args.torch_cpu:
                artifacts[(name, "torch-cpu", "fp32")] = (str(ex["checkpoint"]), "torch", "cpu")
            for precision, path in ex["engines"].items():
                artifacts[(name, "tensorrt", precision)] = (str(path), "tensorrt", str(device))
        timings = time_artifacts(artifacts, args.image_size, args)

        rows_out = []
        for (name, backend, precision), per in timings.items():
            v = variants[name]
            for b, t in per.items():
                dense = timings.get(("dense", backend, precision), {}).get(b)
                fp32 = timings.get((name, backend, "fp32"), {}).get(b)
                speedup = dense["p50_ms"] / t["p50_ms"] if dense else None
                speedup_min = dense["min_ms"] / t["min_ms"] if dense else None
                rows_out.append({
                    "variant": name, "method": v["method"], "backend": backend, "precision": precision,
                    "batch_size": b, "channels_kept": v["channels_kept"], "params": v["params"], "macs": v["macs"],
                    "mac_ratio": v["mac_ratio"], "p50_ms": t["p50_ms"], "p95_ms": t["p95_ms"],
                    "throughput_ips": t["throughput_ips"], "speedup_vs_dense": speedup,
                    "speedup_over_mac_ratio": speedup / v["mac_ratio"] if speedup else None,
                    "min_ms": t["min_ms"], "speedup_vs_dense_min": speedup_min,
                    "int8_speedup_vs_fp32": (fp32["p50_ms"] / t["p50_ms"]) if precision == "int8" and fp32 else None,
                    "round_p50_ms": t["round_p50_ms"],
                })
        checks = []
        for row in rows_out:
            if (row["backend"] == "onnxruntime-cpu" and row["precision"] == "fp32" and row["batch_size"] == 8
                    and row["variant"] != "dense" and 0.4 <= row["channels_kept"] <= 0.6):
                checks.append({"variant": row["variant"], "channels_kept": row["channels_kept"],
                               "mac_ratio": row["mac_ratio"], "speedup": row["speedup_vs_dense"],
                               "speedup_min": row["speedup_vs_dense_min"],
                               "speedup_over_mac_ratio": row["speedup_over_mac_ratio"],
                               "target": TARGET_SPEEDUP_OVER_MACS,
                               "met": row["speedup_over_mac_ratio"] >= TARGET_SPEEDUP_OVER_MACS})
        for c in comparisons:
            key = "after_finetune" if c["after_finetune"] else "before_finetune"
            fp, mag = c[key][c["fairprune"]], c[key][c["magnitude"]]
            c["fairprune_no_worse"] = {"compared": key, "eodd": fp["eodd"] <= mag["eodd"],
                                       "accuracy": fp["accuracy"] >= mag["accuracy"]}

        print()
        print(f"models timed at {args.image_size}x{args.image_size}; trained and evaluated at {train_size}x{train_size}; "
              f"MACs per image at {args.image_size}")
        print(common.table(
            ["variant", "backend", "prec", "batch", "channels kept", "GMACs", "MAC ratio", "p50 ms", "img/s",
             "speed-up", "speed-up / MAC ratio", "INT8 / FP32 speed"],
            [[r["variant"], r["backend"], r["precision"], r["batch_size"], r["channels_kept"], r["macs"] / 1e9,
              r["mac_ratio"], r["p50_ms"], r["throughput_ips"], r["speedup_vs_dense"], r["speedup_over_mac_ratio"],
              r["int8_speedup_vs_fp32"]] for r in rows_out]))
        print()
        print(f"validation ({len(ctx.val_ds)} images, {train_size}x{train_size}); dense: accuracy "
              f"{baseline['accuracy']:.3f}, Eodd {baseline['eodd']:.3f}; unprivileged = {ctx.roles.unprivileged}")
        rows = []
        for c in comparisons:
            for key in ("before_finetune", "after_finetune"):
                for name, m in c[key].items():
                    ci = m["eodd_ci"]
                    rows.append([c["ratio"], name, key.replace("_", " "), "yes" if c["identical_shapes"] else "NO",
                                 m["accuracy"], m["eodd"], f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-",
                                 *[m["group_accuracy"].get(g) for g in ctx.spec.groups]])
        print(common.table(["ratio", "variant", "when", "same shapes", "val acc", "val Eodd", "Eodd 95% CI",
                            *[f"acc {g}" for g in ctx.spec.groups]], rows))
        print()
        print(f"target: ORT CPU FP32 speed-up at batch 8 >= {TARGET_SPEEDUP_OVER_MACS}x the MAC ratio "
              "(models with 40-60% of the channels)")
        print(common.table(["variant", "channels kept", "MAC ratio", "speed-up (p50)", "speed-up / MAC ratio", "met",
                            "speed-up (min)"],
                           [[k["variant"], k["channels_kept"], k["mac_ratio"], k["speedup"],
                             k["speedup_over_mac_ratio"], "yes" if k["met"] else "NO", k["speedup_min"]]
                            for k in checks]))
        results = {
            "arch": arch, "train_image_size": train_size, "timing_image_size": args.image_size,
            "checkpoint": str(ckpt), "manifest": str(manifest), "roles": ctx.roles.to_dict(),
            "variants": {n: {k: val for k, val in v.items() if k != "model"} for n, v in variants.items()},
            "latency": rows_out, "dense_validation": baseline, "fairness_vs_magnitude": comparisons,
            "target_checks": checks,
        }
        out = common.write_results(args.out, "latency", args, info, results)
        print(f"\nwrote {out}")
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
