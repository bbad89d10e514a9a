"""INT8 on real faces: calibration methods and sizes, Q/DQ placement, mixed precision, and speed per target.

UTKFace (../shared/data/utkface-64), task gender, groups race (5), a stratified sample split 60/20/20. A small
model is trained from scratch on the CPU (cached under --work, default runs/int8-bench, and reused by a later
run). Every INT8 graph is compared with the FP32 ONNX graph on the test split: overall and worst-group accuracy,
per-group top-1 agreement with FP32, the validation gate's verdict (default tolerances of `fairdeploy validate`),
Q/DQ node counts and the layers kept in FP32. Group-aware mixed precision chooses its layers on the val split only.

Two parts (--part):
* calibration: methods x sizes, Q/DQ placement, vanilla vs group-aware mixed precision (skipped without UTKFace);
* targets (issue 19): FP32 against INT8 for each quantization target on ONNX Runtime's CPU provider, one ORT
  thread, batch 1 and 8, all artifacts timed round-robin in one run (median of --repeats interleaved calls), the
  ratios printed as measured in that run, with the CPU's ISA flags; the ort-cpu target's alternatives (7-bit
  weights, ORT's placement over Conv/Gemm/Add only, the TensorRT placement with U8, QOperator format) beside it;
  each graph's gate verdict on the test split. Without UTKFace it runs on the demo's synthetic data.

    python benchmarks/int8.py                       # both parts, resnet18 + mobilenet_v3_small, ~8-12 min
    python benchmarks/int8.py --part targets        # the speed table only, ~3-5 min once the models are cached
    python benchmarks/int8.py --arch resnet18 --sizes 100 --methods minmax --part calibration
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
    p.add_argument("--part", choices=["all", "calibration", "targets"], default="all")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="targets: batch sizes timed")
    p.add_argument("--repeats", type=int, default=200, help="targets: interleaved timed calls per graph and batch size")
    p.add_argument("--target-calib-size", type=int, default=500, help="targets: calibration images (shared by all)")
    p.add_argument("--synth-images", type=int, default=1200, help="targets without UTKFace: synthetic images")
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


# ---- targets: FP32 vs INT8 per quantization target on ONNX Runtime's CPU provider ----

# (name, target, placement (None: the target's own), reduce_range, format); the first two are the targets as
# fairdeploy exports them, the rest the ort-cpu alternatives measured beside them.
TARGET_VARIANTS = (
    ("int8 tensorrt", "tensorrt", None, False, "QDQ"),
    ("int8 ort-cpu", "ort-cpu", None, False, "QDQ"),
    ("ort-cpu + reduce_range", "ort-cpu", None, True, "QDQ"),
    ("ort-cpu, ort-default placement", "ort-cpu", "ort-default", False, "QDQ"),
    ("ort-cpu, tensorrt placement", "ort-cpu", "tensorrt", False, "QDQ"),
    ("ort-cpu, QOperator", "ort-cpu", None, False, "QOperator"),
)


def target_model(arch: str, work: Path, args) -> tuple[Path, Path, Any]:
    """(manifest, checkpoint, images root) of `arch`: UTKFace when present, else the demo's synthetic data."""
    if UTKFACE.is_dir():
        manifest, ckpt = trained(arch, work, args)
        return manifest, ckpt, UTKFACE
    from fairdeploy.data.manifest import read_manifest

    manifest, ckpt = common.synthetic_checkpoint(work, args.seed, args.synth_images, args.image_size, args.epochs,
                                                 "cpu", arch)
    if not (ckpt.parent / "bn" / "model.json").is_file():
        reestimate_batchnorm(ckpt, read_manifest(manifest), ckpt.parent / "bn")
    return manifest, ckpt.parent / "bn", None


def qoperator_int8(fp32_path: Path, out: Path, cal) -> None:
    """The ort-cpu target's types and op set in ONNX Runtime's QOperator format (QLinearConv, QLinearAdd, ... as
    nodes instead of Q/DQ pairs around float ops): what quantize_int8 writes, in the other format."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fairdeploy.export.calibration import reader_class
    from fairdeploy.export.int8 import _quiet
    from fairdeploy.export.qdq_placement import ort_settings
    from fairdeploy.export.quant_target import TARGETS

    options = TARGETS["ort-cpu"].quantize_static_options()
    op_types, extra = ort_settings("ort-cpu")
    pre = out.with_suffix(".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=True)
        quantize_static(str(pre), str(out), reader_class()(cal), quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={**options.pop("extra_options"), **extra}, **options)
    onnx.checker.check_model(str(out))
    pre.unlink()


def run_targets(arch: str, work: Path, args) -> list[dict[str, Any]]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.export.calibration import draw_calibration_set, load_recipe
    from fairdeploy.export.exporter import load_check_data
    from fairdeploy.export.int8 import quantize_int8
    from fairdeploy.export.mixed_precision import EvalSet, graph_logits
    from fairdeploy.export.onnx_export import export_onnx
    from fairdeploy.models import read_spec
    from fairdeploy.runtime.ort_runner import session_options
    from fairdeploy.validation.tolerances import Tolerances

    manifest_path, ckpt, root = target_model(arch, work, args)
    manifest = read_manifest(manifest_path, root)
    spec = read_spec(ckpt)
    fp32_path = work / f"{arch}.targets.fp32.onnx"
    export_onnx(ckpt, fp32_path)
    d = load_check_data(manifest, spec, "test", args.seed)
    test = EvalSet(d.inputs, d.labels, d.groups, tuple(spec.groups), spec.num_classes, d.source)
    tol = Tolerances()
    fp32_test = graph_logits(onnx.load(str(fp32_path)), test.inputs, threads=args.threads)
    # the size as a recipe's own: lowered (with a warning) to the largest balanced set the split allows
    base = replace(load_recipe(dirs=[common.REPO / "calibration"]), size=args.target_calib_size, fit_size=True)
    cal = draw_calibration_set(manifest, spec, base)  # one set for every target (its hash is in each file)
    paths = {"fp32": fp32_path}
    rows = [{"part": "targets", "arch": arch, "variant": "fp32", "data": d.source, "calib_size": len(cal),
             **score(fp32_test, fp32_test, test, tol), "q": 0, "dq": 0}]
    for name, target, placement, reduce_range, fmt in TARGET_VARIANTS:
        out = work / f"{arch}.targets.{name.replace(' ', '_').replace(',', '').replace('+', '')}.onnx"
        recipe = replace(base, target=target, placement=placement, reduce_range=reduce_range).validate()
        if fmt == "QOperator":
            qoperator_int8(fp32_path, out, replace(cal, recipe=recipe))
        else:
            quantize_int8(fp32_path, out, replace(cal, recipe=recipe))
        model = onnx.load(str(out))
        rows.append({"part": "targets", "arch": arch, "variant": name, "target": target,
                     "placement": recipe.qdq_placement, "reduce_range": reduce_range, "format": fmt,
                     **score(graph_logits(model, test.inputs, threads=args.threads), fp32_test, test, tol),
                     **count_qdq(model), "qlinear": sum(n.op_type.startswith(("QLinear", "QGemm"))
                                                        for n in model.graph.node)})
        paths[name] = out
    sessions = {name: ort.InferenceSession(str(p), session_options(threads=1), providers=["CPUExecutionProvider"])
                for name, p in paths.items()}
    for bs in args.batch_sizes:
        x = np.ascontiguousarray(np.concatenate([test.inputs] * (-(-bs // len(test.inputs))))[:bs])
        fns = {name: (lambda s=s, x=x: s.run(None, {"input": x})) for name, s in sessions.items()}
        timings = common.time_interleaved(fns, {name: bs for name in fns}, args.repeats, warmup=10)
        base_s = timings["fp32"].median_s
        for row in rows:
            t = timings[row["variant"]]
            row.setdefault("timing", {})[str(bs)] = {"median_ms": t.median_s * 1e3, "images_per_s": t.per_second,
                                                     "vs_fp32": base_s / t.median_s, "timing": t.to_dict()}
        print(f"[{arch}] batch {bs}: " + ", ".join(f"{n} {timings[n].median_s * 1e3:.2f} ms "
                                                  f"({base_s / timings[n].median_s:.2f}x)" for n in timings), flush=True)
    return rows


def render_targets(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    head = ["arch", "artifact", "Q / DQ (QLinear)"]
    head += [h for bs in batch_sizes for h in (f"batch {bs} median ms", f"batch {bs} vs FP32")]
    head += ["acc", "worst-group acc", "worst-group agree", "gate (test)"]
    body = []
    for r in rows:
        timing = r.get("timing", {})
        cells = [c for bs in batch_sizes for c in (f"{timing[str(bs)]['median_ms']:.2f}",
                                                  f"{timing[str(bs)]['vs_fp32']:.2f}x")]
        qdq = "" if r["variant"] == "fp32" else f"{r['q']} / {r['dq']}" + (f" ({r['qlinear']})" if r["qlinear"] else "")
        body.append([r["arch"], r["variant"], qdq, *cells, common.fmt(r["accuracy"], 4),
                     common.fmt(r["worst_group_accuracy"], 4),
                     "" if r["variant"] == "fp32" else common.fmt(r["worst_group_agreement"], 4),
                     "" if r["variant"] == "fp32" else ("pass" if r["gate_passed"] else "fail")])
    return common.table(head, body)


def isa_line() -> str:
    from fairdeploy.validation.fingerprint import cpu_isa

    isa = cpu_isa()
    if isa is None:
        return "ISA: unknown (no /proc/cpuinfo)"
    vnni = isa["avx512_vnni"] or isa["avx_vnni"]
    return (f"ISA: avx2 {isa['avx2']}, avx512 {isa['avx512f']}, vnni {vnni}, amx {isa['amx_int8']} "
            f"({', '.join(k for k, v in isa.items() if v)})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    calibration = args.part in ("all", "calibration") and UTKFACE.is_dir()
    if args.part in ("all", "calibration") and not UTKFACE.is_dir():
        print(f"skipping the calibration part: {UTKFACE} is absent", flush=True)
    targets = args.part in ("all", "targets")
    if not calibration and not targets:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    info = common.machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="int8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [r for arch in args.arch for r in run_arch(arch, work, args)] if calibration else []
    if rows:
        print(render(rows))
    target_rows = [r for arch in args.arch for r in run_targets(arch, work, args)] if targets else []
    if target_rows:
        print(isa_line())
        print(render_targets(target_rows, args.batch_sizes))
    path = common.write_results(args.out, "int8", args, info, rows + target_rows)
    print(f"machine: {common.describe_machine(info)}\ntotal {time.perf_counter() - t0:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
