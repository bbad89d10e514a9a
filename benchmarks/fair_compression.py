"""Fair compression: every pruning criterion and a fine-tune-only control, at 2x and 4x fewer MACs, same schedule.

For each seed: one dense resnet18 trained on the data; for each budget, each criterion runs through
``compress_checkpoint`` exactly as ``fairdeploy prune --criterion C --target-macs F`` would (rounds of global
channel removal with Torch-Pruning's pruner, recovery fine-tuning with distillation, selection on validation),
with the same rounds, fine-tuning epochs, data order and seed; the fine-tune-only control gets the same
fine-tuning without pruning. Each selected model is then measured ONCE on the test split (worst-group accuracy,
Eodd, macro-F1, MACs) and exported to ONNX for an ONNX Runtime latency (batch 1, CPU).

Reported per (dataset, budget, criterion): mean over seeds with a 95 % t-interval.

Datasets:
- ``synth``: the project's synthetic lesions (minority ``dark`` group with low-contrast lesions).
- ``utkface``: 12,000 real faces from ../shared/data/utkface-64 (skipped when absent). Task: gender; group: race
  (UTKFace's five labels). Gender classification is known to be least accurate for darker-skinned faces, and
  the 'others' and 'asian' groups are the rarest: a real, multi-group gap on the task a CPU can train.

    python benchmarks/fair_compression.py --dataset synth utkface --seeds 0 1 2
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

CRITERIA = ("magnitude", "taylor", "fairprune", "snnl", "group-taylor")
UTKFACE = common.REPO.parent / "shared" / "data" / "utkface-64"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/fair_compression.json")
    p.add_argument("--dataset", nargs="+", default=["synth", "utkface"], choices=["synth", "utkface"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25], help="fractions of the dense MACs kept")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--utk-images", type=int, default=6000, help="UTKFace images used (stratified sample)")
    p.add_argument("--synth-images", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for data and checkpoints (default: a temporary one)")
    return p.parse_args(argv)


def utkface_manifest(work: Path, n: int, seed: int) -> Path:
    """A manifest over a class x group stratified sample of UTKFace: label = gender, group = race."""
    from fairdeploy.data.manifest import Record, write_manifest
    from fairdeploy.data.splits import assign_splits

    with open(UTKFACE / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: r["image"])
    import random

    rng = random.Random(seed)
    rng.shuffle(rows)
    rows = rows[:n]
    records = [Record(image=f"images/{r['image']}", label=r["gender"], group=r["race"], split="") for r in rows]
    records = assign_splits(records, (0.6, 0.2, 0.2), seed=seed)
    out = work / f"utkface-n{n}-seed{seed}.csv"
    write_manifest(records, out)
    return out


def dense_checkpoint(dataset: str, work: Path, seed: int, args) -> tuple[Path, Path | None]:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import SPEC_FILE
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    if dataset == "synth":
        return common.synthetic_checkpoint(work, seed, args.synth_images, args.image_size, args.epochs, "cpu"
                                           if args.device == "auto" else args.device)
    manifest = utkface_manifest(work, args.utk_images, seed)
    run = work / f"utk-resnet18-e{args.epochs}-n{args.utk_images}-s{args.image_size}-seed{seed}"
    if not (run / "best" / SPEC_FILE).is_file():
        cfg = FitConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=seed)
        train_model(read_manifest(manifest, UTKFACE), "resnet18", run, cfg, image_size=args.image_size,
                    device=args.device)
    return manifest, run / "best"


def onnx_latency_ms(ckpt: Path, work: Path, repeats: int = 30) -> float:
    import numpy as np
    import onnxruntime as ort

    from fairdeploy.export.onnx_export import export_onnx
    from fairdeploy.models.checkpoint import read_spec
    from fairdeploy.runtime.ort_runner import session_options

    spec = read_spec(ckpt)
    path = work / f"{ckpt.parent.name}-{ckpt.name}.onnx"
    export_onnx(ckpt, path)
    sess = ort.InferenceSession(str(path), session_options(threads=1), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, spec.image_size, spec.image_size), np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    path.unlink()
    return 1000 * statistics.median(times)


def test_metrics(ckpt: Path, manifest: Path, root: Path | None) -> dict[str, Any]:
    import torch

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.models.size import model_size
    from fairdeploy.training.loop import evaluate_model

    model, spec = load_checkpoint(ckpt, "cpu")  # once: metrics and MACs from the same loaded model
    test = split_dataset(read_manifest(manifest, root), "test", Encoding(spec.classes, spec.groups),
                         eval_transform(spec.image_size, spec.mean, spec.std))
    rep = evaluate_model(model, test, spec, torch.device("cpu"))
    acc = {g: m.accuracy for g, m in rep.groups}
    return {"worst_group_accuracy": min(acc.values()), "eodd": rep.gap("eodd"), "f1_macro": rep.overall_f1_macro,
            "accuracy": rep.overall_accuracy, "group_accuracy": acc, "group_n": {g: m.n for g, m in rep.groups},
            "macs": model_size(model, spec.image_size).macs}


def mean_ci(values: list[float]) -> dict[str, float]:
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "half_width": float("nan"), "n": len(values)}
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": m, "half_width": half, "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint
    dev = common.resolve(args.device)
    info = common.machine(dev)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fair-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for dataset in args.dataset:
        if dataset == "utkface" and not UTKFACE.is_dir():
            print(f"skipping utkface: {UTKFACE} is absent", flush=True)
            continue
        root = UTKFACE if dataset == "utkface" else None
        for seed in args.seeds:
            t0 = time.perf_counter()
            manifest, dense = dense_checkpoint(dataset, work, seed, args)
            m = read_manifest(manifest, root)
            base = test_metrics(dense, manifest, root)
            base["latency_ms"] = onnx_latency_ms(dense, work)
            rows.append({"dataset": dataset, "seed": seed, "budget": 1.0, "criterion": "dense", **base,
                         "seconds": time.perf_counter() - t0})
            print(f"[{dataset} seed {seed}] dense: {_line(base)}", flush=True)
            for bi, budget in enumerate(args.budgets):
                for ci, criterion in enumerate(args.criteria):
                    control = "finetune-only" if bi == 0 and ci == 0 else "none"
                    cfg = BudgetConfig(criterion=criterion, control=control, target=budget, rounds=args.rounds,
                                       finetune=replace(BudgetConfig().finetune, epochs=args.finetune_epochs),
                                       keep_rounds=False, bootstrap=200, seed=seed)
                    out = work / f"{dataset}-s{seed}-b{budget:g}-{criterion}"
                    t0 = time.perf_counter()
                    res = compress_checkpoint(dense, m, out, cfg, device=args.device)
                    seconds = time.perf_counter() - t0
                    runs = [("criterion", criterion, out)]
                    if control != "none":
                        runs.append(("control", "finetune-only", out / "control"))
                    for _kind, name, ckpt in runs:
                        met = test_metrics(ckpt, manifest, root)
                        met["latency_ms"] = onnx_latency_ms(ckpt, work)
                        rec = res.record.runs["candidate" if name == criterion else "control"]
                        rows.append({"dataset": dataset, "seed": seed, "budget": budget if name != "finetune-only"
                                     else 1.0, "criterion": name, **met, "val_selected": rec.point.val.to_dict(),
                                     "guard_passed": rec.guard_passed, "seconds": seconds,
                                     "data_order": [list(r.finetune.data_order) for r in rec.rounds]})
                        print(f"[{dataset} seed {seed}] {name} @ {budget:g}: {_line(met)} ({seconds:.0f} s)", flush=True)
    summary = summarise(rows)
    print(render(summary))
    path = common.write_results(args.out, "fair_compression", args, info, rows, summary=summary)
    print(f"machine: {common.describe_machine(info)}\nresults: {path}")
    return 0


def _line(m: dict[str, Any]) -> str:
    return (f"worst-group {m['worst_group_accuracy']:.4f}, Eodd {m['eodd']:.4f}, macro-F1 {m['f1_macro']:.4f}, "
            f"MACs {m['macs'] / 1e6:.1f} M")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        keys.setdefault((r["dataset"], r["budget"], r["criterion"]), []).append(r)
    out = []
    for (dataset, budget, criterion), rs in keys.items():
        entry: dict[str, Any] = {"dataset": dataset, "budget": budget, "criterion": criterion, "seeds": len(rs)}
        for k in ("worst_group_accuracy", "eodd", "f1_macro", "macs", "latency_ms"):
            entry[k] = mean_ci([float(r[k]) for r in rs])
        out.append(entry)
    return out


def render(summary: list[dict[str, Any]]) -> str:
    headers = ["dataset", "MACs kept", "criterion", "worst-group acc", "Eodd", "macro-F1", "MACs (M)",
               "ORT ms (b=1)"]

    def ci(e: dict[str, float], scale: float = 1.0, d: int = 3) -> str:
        if math.isnan(e["half_width"]):
            return f"{e['mean'] * scale:.{d}f}"
        return f"{e['mean'] * scale:.{d}f} ± {e['half_width'] * scale:.{d}f}"

    rows = [[s["dataset"], f"{s['budget']:g}", s["criterion"], ci(s["worst_group_accuracy"]), ci(s["eodd"]),
             ci(s["f1_macro"]), f"{s['macs']['mean'] / 1e6:.1f}", ci(s["latency_ms"], d=2)] for s in summary]
    return common.table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
