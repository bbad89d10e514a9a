"""INT8 on real faces: calibration methods and sizes, Q/DQ placement, vanilla vs group-aware mixed precision.

UTKFace (../shared/data/utkface-64; skipped when absent), task gender, groups race (5), a stratified sample
split 60/20/20. A small model is trained from scratch on the CPU (cached under --work, default runs/int8-bench,
and reused by a later run). Every INT8 graph is compared with the FP32 ONNX graph on the test split: overall
and worst-group accuracy, per-group top-1 agreement with FP32, the validation gate's verdict (default
tolerances of `fairdeploy validate`), Q/DQ node counts and the layers kept in FP32. Group-aware mixed
precision chooses its layers on the val split only.

    python benchmarks/int8.py                       # resnet18 + mobilenet_v3_small, ~6-9 min at 1 thread
    python benchmarks/int8.py --arch resnet18 --sizes 100 --methods minmax
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common as common
from fair_compression import UTKFACE, utkface_manifest


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/int8.json")
    p.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    p.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile"])
    p.add_argument("--sizes", nargs="+", type=int, default=[50, 500], help="calibration set sizes (group x class balanced)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--utk-images", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/int8-bench", help="folder for the manifest, checkpoints and ONNX files")
    return p.parse_args(argv)


def trained(arch: str, work: Path, args) -> tuple[Path, Path]:
    """The manifest and a checkpoint trained on it (reused when this benchmark's earlier run left one)."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import SPEC_FILE
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    manifest = utkface_manifest(work, args.utk_images, args.seed)
    run = work / f"utk-{arch}-e{args.epochs}-n{args.utk_images}-s{args.image_size}-seed{args.seed}"
    m = read_manifest(manifest, UTKFACE)
    if not (run / "best" / SPEC_FILE).is_file():
        t0 = time.perf_counter()
        cfg = FitConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=args.seed)
        train_model(m, arch, run, cfg, image_size=args.image_size, device="cpu")
        print(f"[{arch}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (run / "bn" / SPEC_FILE).is_file():
        reestimate_batchnorm(run / "best", m, run / "bn")
    return manifest, run / "bn"


def reestimate_batchnorm(ckpt: Path, manifest, out: Path) -> None:
    """BatchNorm running statistics re-estimated over the train split (a cumulative average, no weight
    change). torchvision's MobileNetV3 uses BN momentum 0.01: after a few short epochs its running
    statistics lag the weights so far that every eval prediction is one class. Done for every arch alike."""
    import torch

    from fairdeploy.data.loading import Encoding, eval_transform, make_loader, split_dataset
    from fairdeploy.models.checkpoint import load_checkpoint, save_checkpoint

    model, spec = load_checkpoint(ckpt, "cpu")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    ds = split_dataset(manifest, "train", Encoding(spec.classes, spec.groups),
                       eval_transform(spec.image_size, spec.mean, spec.std))
    with torch.no_grad():
        for batch in make_loader(ds, 64):
            model(batch[0])
    for bn in bns:
        bn.momentum = 0.1
    save_checkpoint(model.eval(), spec, out)


def count_qdq(model) -> dict[str, int]:
    ops = [n.op_type for n in model.graph.node]
    return {"q": ops.count("QuantizeLinear"), "dq": ops.count("DequantizeLinear")}


def score(logits, fp32_logits, data, tol) -> dict[str, Any]:
    """Test-split numbers of one graph against the FP32 graph."""
    from fairdeploy.export.mixed_precision import evaluate

    e = evaluate(logits, fp32_logits, data, tol)
    return {"accuracy": e.accuracy, "worst_group_accuracy": min(e.accuracy_per_group.values()),
            "accuracy_per_group": e.accuracy_per_group, "agreement": e.agreement,
            "worst_group_agreement": min(e.agreement_per_group.values()), "agreement_per_group": e.agreement_per_group,
            "gate_passed": e.passed, "gate_failures": e.failing()}


def run_arch(arch: str, work: Path, args) -> list[dict[str, Any]]:
    import onnx

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.export.calibration import draw_calibration_set, load_recipe
    from fairdeploy.export.exporter import load_check_data
    from fairdeploy.export.int8 import group_aware_int8, quantize_int8
    from fairdeploy.export.mixed_precision import EvalSet, graph_logits
    from fairdeploy.export.onnx_export import export_onnx
    from fairdeploy.models import read_spec
    from fairdeploy.validation.tolerances import Tolerances

    manifest_path, ckpt = trained(arch, work, args)
    manifest = read_manifest(manifest_path, UTKFACE)
    spec = read_spec(ckpt)
    fp32_path = work / f"{arch}.fp32.onnx"
    export_onnx(ckpt, fp32_path)
    fp32 = onnx.load(str(fp32_path))

    def evalset(split: str) -> EvalSet:
        d = load_check_data(manifest, spec, split, args.seed)
        return EvalSet(d.inputs, d.labels, d.groups, tuple(spec.groups), spec.num_classes, d.source)

    test, val = evalset("test"), evalset("val")
    tol = Tolerances()
    fp32_test = graph_logits(fp32, test.inputs, threads=args.threads)
    rows = [{"arch": arch, "variant": "fp32", **score(fp32_test, fp32_test, test, tol), "q": 0, "dq": 0,
             "kept_fp32": [], "n_test": len(test.inputs), "n_val": len(val.inputs)}]
    print(f"[{arch}] fp32: accuracy {rows[0]['accuracy']:.4f}, worst group {rows[0]['worst_group_accuracy']:.4f}",
          flush=True)
    base = load_recipe(dirs=[common.REPO / "calibration"])
    grid = [(m, s, "tensorrt", "off") for m in args.methods for s in args.sizes]
    grid += [("minmax", max(args.sizes), "ort-default", "off"), ("minmax", max(args.sizes), "tensorrt", "group-aware")]
    for method, size, placement, mixed in grid:
        recipe = replace(base, method=method, size=size, placement=placement, mixed_precision=mixed).validate()
        cal = draw_calibration_set(manifest, spec, recipe)
        out = work / f"{arch}.{method}.{size}.{placement}.{mixed}.int8.onnx"
        t0 = time.perf_counter()
        plan = None
        if mixed == "group-aware":
            model, plan = group_aware_int8(fp32_path, cal, val, tol, threads=args.threads)
            quantize_int8(fp32_path, out, cal, model=model)
        else:
            quantize_int8(fp32_path, out, cal)
        seconds = time.perf_counter() - t0
        model = onnx.load(str(out))
        row = {"arch": arch, "variant": "int8", "method": method, "calib_size": len(cal), "placement": placement,
               "mixed_precision": mixed, **score(graph_logits(model, test.inputs, threads=args.threads), fp32_test,
                                                  test, tol),
               **count_qdq(model), "kept_fp32": list(plan.kept_fp32) if plan else [], "seconds": seconds,
               "val_vanilla_gate_passed": plan.vanilla.passed if plan else None,
               "val_vanilla_failures": plan.vanilla.failing() if plan else None}
        rows.append(row)
        print(f"[{arch}] {method} n={len(cal)} {placement} {mixed}: {_line(row)} ({seconds:.0f} s)", flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    return (f"acc {r['accuracy']:.4f}, worst group {r['worst_group_accuracy']:.4f}, agreement {r['agreement']:.4f} "
            f"(worst group {r['worst_group_agreement']:.4f}), gate {'pass' if r['gate_passed'] else 'FAIL'}, "
            f"Q/DQ {r['q']}/{r['dq']}, FP32 layers {len(r['kept_fp32'])}")


def render(rows: list[dict[str, Any]]) -> str:
    head = ["arch", "calibration", "n", "placement", "mixed", "acc", "worst-group acc", "agree", "worst-group agree",
            "gate (test)", "Q / DQ", "FP32 layers", "s"]
    body = []
    for r in rows:
        if r["variant"] == "fp32":
            body.append([r["arch"], "FP32", "", "", "", common.fmt(r["accuracy"], 4),
                         common.fmt(r["worst_group_accuracy"], 4), "", "", "", "", "", ""])
            continue
        body.append([r["arch"], r["method"], r["calib_size"], r["placement"], r["mixed_precision"],
                     common.fmt(r["accuracy"], 4), common.fmt(r["worst_group_accuracy"], 4),
                     common.fmt(r["agreement"], 4), common.fmt(r["worst_group_agreement"], 4),
                     "pass" if r["gate_passed"] else "fail", f"{r['q']} / {r['dq']}",
                     len(r["kept_fp32"]), f"{r['seconds']:.0f}"])
    kept = [f"{r['arch']} {r['method']} n={r['calib_size']} keeps in FP32: {', '.join(r['kept_fp32'])}"
            for r in rows if r.get("kept_fp32")]
    return "\n".join([common.table(head, body), *kept])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not UTKFACE.is_dir():
        print(f"skipping: {UTKFACE} is absent", flush=True)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    info = common.machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="int8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [r for arch in args.arch for r in run_arch(arch, work, args)]
    print(render(rows))
    path = common.write_results(args.out, "int8", args, info, rows)
    print(f"machine: {common.describe_machine(info)}\ntotal {time.perf_counter() - t0:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
