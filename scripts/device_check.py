"""The device check behind scripts/device-check.sh: on a machine with a CUDA GPU, run the GPU-marked tests and the
GPU benchmarks, each part in its own process under coreutils `timeout`, and write one JSON summary.

Parts, in order (each gets its own time box, cut to what is left of --budget-s; a part that fails or runs out of
time is recorded, never aborts the rest):

    probe      versions, GPU, ONNX Runtime providers, TensorRT, missing Python modules (always runs)
    tests      pytest -m gpu (the GPU-marked tests), counts and failures from its JUnit XML; a test module that
               cannot be imported for want of a missing package is listed as not collected, with the package
    curvature  benchmarks/curvature.py --device cuda at 224 px, batch 64 and 128 (train step, curvature, loop)
    steps      training and distillation fine-tuning speed through fairdeploy.training.loop.fit (224 px)
    ort_cuda   ONNX Runtime's CUDA provider vs PyTorch CUDA latency; "absent" when the provider is not there
    tensorrt   an FP16 engine built by run_export and its latency; "absent" when tensorrt is not importable

A bare GPU machine may have only Python and torch (with its own requirements). Two things make the check run there:
* a wheelhouse of fairdeploy's pure-Python requirements and pytest, built here with internet
  (`python scripts/device_check.py --build-wheelhouse .whl/device-check`: the versions installed here, for Python
  3.12 on manylinux x86_64, plus the binary wheels those pure packages need; see wheelhouse_plan) and carried to
  the machine; given with --wheelhouse DIR or FAIRDEPLOY_WHEELHOUSE=DIR, the wheels of the distributions missing
  there are installed into a temporary folder on the parts' PYTHONPATH (pip --no-index --no-deps --target: nothing
  of the machine's own is replaced, no editable install, no internet);
* a part that needs a module that is still missing (a binary requirement the image lacks, such as onnx) is skipped
  with that module named (exit EXIT_PART_SKIPPED from the part's process), not failed.
Every skipped part is printed with its reason, and recorded in the summary.

Without a CUDA device it writes the summary with the reason and exits 3 at once (--allow-cpu runs the parts anyway,
with --device cpu: a check of this script, not a measurement). Exit 0: every part ok (or absent / skipped for a
missing module); 1: some part failed or timed out, or the wheelhouse could not be installed. The summary is
OUT/device-check.json (OUT: --out-dir, else $OUT, else runs/device-check), each part's output in OUT/logs/PART.log.
This file imports no torch itself, so a broken torch is a recorded failure, not a crash.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "curvature", "steps", "ort_cuda", "tensorrt")
TIME_BOX_S = {"probe": 60, "tests": 150, "curvature": 150, "steps": 110, "ort_cuda": 60, "tensorrt": 120}
BUDGET_S = 460  # all parts together: under 8 minutes with the probe and the summary
MIN_BOX_S = 15  # a part that would get less time than this (what is left of the budget) is skipped
# import name -> distribution, for every runtime requirement and the test runner
MODULES = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow", "typer": "typer",
           "rich": "rich", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxslim": "onnxslim",
           "safetensors": "safetensors", "torch_pruning": "torch-pruning", "matplotlib": "matplotlib",
           "pytest": "pytest"}
# Modules each part needs that a bare machine may lack, checked against the probe before the part starts, so no
# device time goes into a part that cannot finish (steps writes checkpoints with safetensors after training); a
# missing module not listed here is still caught when the part imports it (run_part).
PART_NEEDS = {"tests": ("pytest",), "curvature": ("torch_pruning",), "steps": ("PIL", "safetensors"),
              "ort_cuda": ("onnx", "onnxruntime", "onnxslim", "safetensors"),
              "tensorrt": ("onnx", "onnxruntime", "onnxslim", "safetensors")}
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
EXIT_PART_SKIPPED = 4  # a part's process: a module it needs is not installed (its result file names it)
# The wheelhouse is for the lent GPU machines: Python 3.12 on x86-64 Linux (see the device tool's README).
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux1_x86_64")
PROVIDED = ("torch", "torchvision")  # the machine's own CUDA builds and what they require: never carried
WHEELHOUSE_INDEX = "wheelhouse.json"
# Modules of this checkout (tests' helpers included): a missing one is a bug, never a missing dependency.
OWN_MODULES = ("fairdeploy", "fake_tensorrt", "pruning_oracles", "distributed_worker", "device_check", "_common")


# ---------------------------------------------------------------------------------------------------------
# parts (each runs in a child process: `python scripts/device_check.py --part NAME --result FILE`)
# ---------------------------------------------------------------------------------------------------------

def part_probe(args: argparse.Namespace) -> dict[str, Any]:
    absent = sorted(mod for mod in MODULES if importlib.util.find_spec(mod) is None)
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "missing": sorted(MODULES[mod] for mod in absent), "missing_modules": absent}
    import torch

    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["devices"] = [{"name": torch.cuda.get_device_name(i),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                       "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                      for i in range(torch.cuda.device_count())] if out["cuda_available"] else []
    if not out["cuda_available"]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        out["reason"] = ("torch.cuda.is_available() is False"
                         + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                         + ("" if torch.version.cuda else "; this torch is a CPU-only build"))
    try:
        import onnxruntime as ort

        out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        out["onnxruntime"] = {"error": f"{type(exc).__name__}: {exc}"}
    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt"] = {"absent": "the tensorrt package is not installed"}
    else:
        try:
            import tensorrt

            out["tensorrt"] = {"version": tensorrt.__version__}
        except Exception as exc:  # noqa: BLE001
            out["tensorrt"] = {"absent": f"import tensorrt failed: {type(exc).__name__}: {exc}"}
    return out


def _checkpoint(tmp: Path, arch: str, image_size: int) -> Path:
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    spec = ModelSpec(arch=arch, classes=("a", "b", "c"), groups=("g0", "g1"), image_size=image_size)
    return save_checkpoint(create_model(arch, 3), spec, tmp / f"{arch}-{image_size}")


def _latency(path: Path, backend: str, device: str, batch_sizes: tuple[int, ...], image_size: int) -> list[dict]:
    import numpy as np

    from fairdeploy.runtime.base import runner_from_artifact
    from fairdeploy.validation.latency import LatencyConfig, measure_latency

    images = np.random.default_rng(0).standard_normal((8, 3, image_size, image_size)).astype(np.float32)
    with runner_from_artifact(path, backend=backend, device=device) as runner:
        stats = measure_latency(runner, images, LatencyConfig(batch_sizes=batch_sizes, warmup=5, iterations=20))
        described = runner.describe()
    return [{"backend": backend, "runner": described, **s.to_dict()} for s in stats]


def part_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Samples/s of fit() for training and for distillation fine-tuning (the budget runs' recovery step: student
    and teacher forward, distillation loss), data loading included, on synthetic images at --image-size."""
    import copy

    import torch

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.data.synth import SynthConfig, generate_synthetic
    from fairdeploy.device import resolve_device
    from fairdeploy.models import ModelSpec, create_model
    from fairdeploy.training.loop import FitConfig, fit
    from fairdeploy.training.train import spec_datasets

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = read_manifest(generate_synthetic(Path(tmp) / "data", SynthConfig(
            n_images=args.n_images, image_size=args.image_size, seed=0)))
        spec = ModelSpec(arch="resnet18", classes=tuple(manifest.classes), groups=tuple(manifest.groups),
                         image_size=args.image_size)
        train_ds, val_ds = spec_datasets(manifest, spec)
        torch.manual_seed(0)
        dense = create_model("resnet18", len(spec.classes)).to(device)
        results: dict[str, Any] = {"device": str(device), "image_size": args.image_size, "batch_size": args.batch,
                                   "train_images": len(train_ds), "epochs": args.epochs, "workers": args.workers,
                                   "note": "samples/s of each epoch's training loop (data loading included); "
                                           "the first epoch includes warm-up"}
        for name, teacher, distill in (("train", None, 0.0), ("finetune_distill", copy.deepcopy(dense).eval(), 0.5)):
            cfg = FitConfig(epochs=args.epochs, batch_size=args.batch, workers=args.workers, distill=distill)
            start = time.perf_counter()
            result = fit(copy.deepcopy(dense), spec, train_ds, val_ds, cfg, Path(tmp) / name, device,
                         teacher=teacher)
            results[name] = {"samples_per_s": [round(h["train_samples_per_s"], 1) for h in result.history],
                             "seconds": round(time.perf_counter() - start, 2), "amp": cfg.amp and device.type == "cuda"}
    return results


def part_ort_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of the same FP32 ONNX through ONNX Runtime's CUDA provider, and PyTorch CUDA on the checkpoint."""
    from fairdeploy.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), "resnet18", args.image_size)
        onnx_path = Path(tmp) / "model.fp32.onnx"
        export_onnx(ckpt, onnx_path)
        sizes = tuple(args.latency_batches)
        rows = _latency(onnx_path, args.ort_backend, args.device, sizes, args.image_size)
        rows += _latency(ckpt, "torch", args.device, sizes, args.image_size)
    return {"image_size": args.image_size, "latency": rows}


def part_tensorrt(args: argparse.Namespace) -> dict[str, Any]:
    """An FP16 engine through fairdeploy's export (the TensorRT builder) and its latency beside PyTorch CUDA."""
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), "resnet18", args.image_size)
        start = time.perf_counter()
        result = run_export(ckpt, Path(tmp) / "out", resolve_options(None, {"onnx": {"precision": ("fp16",)}, "tensorrt": {"enabled": True}}))
        build_s = time.perf_counter() - start
        engine = result.engines["fp16"]
        sizes = tuple(args.latency_batches)
        rows = _latency(engine, "auto", "cuda", sizes, args.image_size) + _latency(ckpt, "torch", "cuda", sizes,
                                                                                   args.image_size)
    return {"image_size": args.image_size, "export_seconds": round(build_s, 2), "latency": rows}


def part_curvature(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/curvature.py at 224 px, batch 64 and 128, in this process (so a missing module is a skip)."""
    import runpy

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "curvature.json"
        argv = sys.argv
        sys.argv = ["benchmarks/curvature.py", "--device", args.device, "--sizes", "224", "--batch-sizes", "64",
                    "128", "--optimizers", "sgd", "adamw", "--out", str(out)]
        try:
            runpy.run_path(str(REPO / "benchmarks" / "curvature.py"), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
        finally:
            sys.argv = argv
        return json.loads(out.read_text())


PART_FUNCTIONS = {"probe": part_probe, "curvature": part_curvature, "steps": part_steps, "ort_cuda": part_ort_cuda,
                  "tensorrt": part_tensorrt}


def missing_dependency(exc: ImportError) -> str | None:
    """The top-level name of a third-party module an ImportError says is not installed; None for anything else
    (a module of this checkout, or a package that is there but broken)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or not name or name in OWN_MODULES:
        return None
    return name if importlib.util.find_spec(name) is None else None


def run_part(name: str, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Run one part here: (EXIT_OK, its result), or (EXIT_PART_SKIPPED, {"skipped": why}) when a module it needs
    is not installed; any other error propagates (the part fails, its traceback in its log)."""
    try:
        return EXIT_OK, PART_FUNCTIONS[name](args)
    except ImportError as exc:
        module = missing_dependency(exc)
        if module is None:
            raise
        return EXIT_PART_SKIPPED, {"skipped": needs_reason([module]), "module": module}


# ---------------------------------------------------------------------------------------------------------
# the wheelhouse: built here, installed on the bare machine
# ---------------------------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_env(python_version: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def wheelhouse_plan(python_version: str = DEVICE_PYTHON, roots: tuple[str, ...] = ("pytest",),
                    package: str = "fairdeploy") -> dict[str, Any]:
    """What the wheelhouse carries, from this Python's installed metadata (the versions the project runs with here):
    the runtime requirements of `package` (no extras) and `roots`, followed through their requirements for
    `python_version` on x86-64 Linux.

    carried:      pure-Python distributions (Root-Is-Purelib), and the binary ones a pure distribution requires
                  (small helpers such as pydantic-core), downloaded for the device's Python and platform
    not_carried:  binary distributions the project requires directly (numpy, onnx, onnxruntime, ...): the machine's
                  image must have them, else the parts that need them are skipped with the module named
    provided:     PROVIDED and everything they require (the machine's CUDA torch brings them)"""
    from importlib import metadata

    from packaging.requirements import Requirement

    env = _marker_env(python_version)

    def applies(req: Requirement) -> bool:
        return req.marker is None or req.marker.evaluate(env)

    def pure(dist: Any) -> bool:
        return "Root-Is-Purelib: true" in (dist.read_text("WHEEL") or "")

    provided: set[str] = set()
    stack = list(PROVIDED)
    while stack:
        name = canonical(stack.pop())
        if name in provided:
            continue
        provided.add(name)
        try:
            stack += [Requirement(r).name for r in metadata.requires(name) or [] if applies(Requirement(r))]
        except metadata.PackageNotFoundError:
            continue
    try:
        top = [Requirement(r) for r in metadata.requires(package) or []]
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"error: {package} is not installed in {sys.executable}; the wheelhouse follows its "
                         "installed requirements") from exc
    todo: list[tuple[Requirement, str | None]] = [(r, None) for r in top if applies(r)]
    todo += [(Requirement(r), None) for r in roots]
    carried: dict[str, dict[str, Any]] = {}
    not_carried: dict[str, dict[str, Any]] = {}
    while todo:
        req, via = todo.pop(0)
        name = canonical(req.name)
        if name in provided or name in carried or name in not_carried:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            not_carried[name] = {"name": name, "why": "not installed here either"}
            continue
        is_pure = pure(dist)  # reads the WHEEL file: once per distribution
        if is_pure or via is not None:
            carried[name] = {"name": name, "version": dist.version, "pure": is_pure, "via": via}
            if is_pure:
                todo += [(r, name) for r in map(Requirement, dist.requires or []) if applies(r)]
        else:
            not_carried[name] = {"name": name, "version": dist.version,
                                 "why": "a binary requirement of the project: the machine's image must have it"}
    return {"python": python_version, "platforms": list(DEVICE_PLATFORMS), "carried": list(carried.values()),
            "not_carried": list(not_carried.values()), "provided": sorted(provided)}


def build_wheelhouse(dest: Path, python_version: str = DEVICE_PYTHON) -> dict[str, Any]:
    """Download the planned wheels (pip download --no-deps --only-binary=:all: for the device's Python and platform)
    into `dest` and write its index (wheelhouse.json)."""
    plan = wheelhouse_plan(python_version)
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               *[a for plat in DEVICE_PLATFORMS for a in ("--platform", plat)], "-d", str(dest),
               *[f"{c['name']}=={c['version']}" for c in plan["carried"]]]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise SystemExit(f"error: pip download failed: {lines[-1] if lines else proc.returncode}")
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    plan["wheels"] = wheels
    plan["bytes"] = sum((dest / w).stat().st_size for w in wheels)
    write_summary(dest / WHEELHOUSE_INDEX, plan)
    return plan


def wheel_distribution(path: Path) -> str:
    """The canonical distribution name of a wheel file (PEP 427: the name before the first '-')."""
    return canonical(path.name.split("-", 1)[0])


def install_wheelhouse(wheelhouse: Path, target: Path) -> dict[str, Any]:
    """Install, into `target`, the wheels of `wheelhouse` whose distribution this Python lacks (pip --no-index
    --no-deps --target): nothing installed here is replaced or shadowed. The record says what was installed, what
    was there already and, on failure, pip's last line."""
    from importlib import metadata

    record: dict[str, Any] = {"dir": str(wheelhouse), "target": str(target)}
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if not wheels:
        return {**record, "status": "failed", "error": f"no wheels in {wheelhouse}"}

    def have(name: str) -> bool:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            return False

    missing = [w for w in wheels if not have(wheel_distribution(w))]
    record["already_there"] = sorted(wheel_distribution(w) for w in wheels if w not in missing)
    record["installed"] = sorted(wheel_distribution(w) for w in missing)
    if not missing:
        return {**record, "status": "ok"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                           "--no-deps", "--no-compile", "--target", str(target), *map(str, missing)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return {**record, "installed": [], "status": "failed",
                "error": f"pip install exited {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    return {**record, "status": "ok"}


# ---------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------

def run_boxed(name: str, command: list[str], box_s: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `command` under coreutils timeout (TERM at box_s, KILL 10 s later); status ok/failed/timeout."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(["timeout", "-k", "10", f"{max(box_s, 1):.0f}", *command], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False)
    seconds = round(time.perf_counter() - start, 1)
    status = "ok" if proc.returncode == 0 else "timeout" if proc.returncode in (124, 137) else "failed"
    out: dict[str, Any] = {"status": status, "exit_code": proc.returncode, "seconds": seconds,
                           "time_box_s": round(box_s), "log": str(log)}
    if status != "ok":
        lines = log.read_text(errors="replace").strip().splitlines()
        out["log_tail"] = lines[-15:]
        if status == "timeout":
            out["reason"] = f"{name} ran past its time box of {box_s:.0f} s"
    return out


_NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts, failures and skips of a pytest JUnit XML. A test module that could not be collected because a
    third-party module is missing (pytest --continue-on-collection-errors) is listed under not_collected with the
    module, and not counted as an error; any other collection error is one."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped, not_collected = [], [], []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        for child in case:
            if child.tag == "error" and child.get("message") == "collection failure":
                found = _NO_MODULE.search(child.text or "")
                module = found.group(1).split(".")[0] if found else None
                if module is not None and module not in OWN_MODULES:
                    not_collected.append({"module_file": case.get("name"), "needs": module})
                    counts["errors"] -= 1
                    counts["tests"] -= 1
                    continue
            if child.tag in ("failure", "error"):
                failed.append({"test": test_id, "message": (child.get("message") or "")[:300]})
            elif child.tag == "skipped":
                skipped.append({"test": test_id, "reason": (child.get("message") or "")[:200]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skipped_tests": skipped, "not_collected": not_collected}


def part_command(python: str, part: str, args: argparse.Namespace, result: Path) -> list[str]:
    base = [python, str(Path(__file__).resolve()), "--part", part, "--result", str(result),
            "--device", args.device, "--image-size", str(args.image_size)]
    if part == "steps":
        return base + ["--n-images", str(args.n_images), "--epochs", str(args.epochs), "--batch", str(args.batch),
                       "--workers", str(args.workers)]
    return base + ["--ort-backend", args.ort_backend, "--latency-batches", *map(str, args.latency_batches)]


def needs_reason(modules: list[str], no_wheelhouse: bool = False) -> str:
    """Why a part is skipped: the modules it needs that are not installed (the same words as run_part's)."""
    which = ", ".join(repr(m) for m in modules)
    hint = " (a wheelhouse brings the pure-Python ones: --wheelhouse DIR)" if no_wheelhouse else ""
    return (f"needs the Python module{'s' if len(modules) > 1 else ''} {which}, which "
            f"{'are' if len(modules) > 1 else 'is'} not installed here{hint}")


def wheelhouse_dir(args: argparse.Namespace) -> Path | None:
    given = args.wheelhouse or os.environ.get("FAIRDEPLOY_WHEELHOUSE")
    return Path(given).resolve() if given else None


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out_dir or os.environ.get("OUT") or REPO / "runs" / "device-check")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)


def orchestrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = out_dir(args)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary_path = out / "device-check.json"
    python = sys.executable
    summary: dict[str, Any] = {"check": "fairdeploy device check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "python_executable": python, "budget_s": args.budget_s, "status": "running",
                               "parts": {}}
    paths = [str(REPO)]
    wheelhouse = wheelhouse_dir(args)
    if wheelhouse is None:
        summary["wheelhouse"] = {"status": "none", "reason": "no --wheelhouse / FAIRDEPLOY_WHEELHOUSE given: "
                                 "only what this Python has is used"}
    else:
        target = Path(tempfile.mkdtemp(prefix="fairdeploy-device-site-"))
        summary["wheelhouse"] = install_wheelhouse(wheelhouse, target)
        paths.append(str(target))
        print(f"device check: wheelhouse {wheelhouse}: {summary['wheelhouse']['status']}; installed "
              f"{', '.join(summary['wheelhouse'].get('installed') or []) or 'nothing'}"
              + (f"; {summary['wheelhouse']['error']}" if "error" in summary["wheelhouse"] else ""))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (*paths, os.environ.get("PYTHONPATH")) if p)}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    def finish(status: str, code: int) -> int:
        summary["status"] = status
        summary["seconds"] = round(time.perf_counter() - start, 1)
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_summary(summary_path, summary)
        for part, record in summary["parts"].items():
            if record["status"] in ("skipped", "absent"):
                print(f"device check: {part} {record['status']}: {record['reason']}")
            for item in record.get("result", {}).get("not_collected", []) if part == "tests" else []:
                print(f"device check: tests: {item['module_file']} not collected: needs {item['needs']!r}")
        print(f"device check: {status}; summary {summary_path}")
        return code

    probe_file = out / "probe.json"
    probe_run = run_boxed("probe", part_command(python, "probe", args, probe_file),
                          min(TIME_BOX_S["probe"], left()), logs / "probe.log", env)
    probe = json.loads(probe_file.read_text()) if probe_run["status"] == "ok" else {}
    summary["probe"] = {**probe_run, **probe}
    if probe_run["status"] != "ok":
        summary["cuda"] = {"available": False, "reason": "the probe failed (torch did not import?): see its log"}
        for part in PARTS:
            summary["parts"][part] = {"status": "skipped", "reason": "the probe failed"}
        return finish("failed", EXIT_FAILED)
    summary["cuda"] = {"available": probe["cuda_available"], "devices": probe["devices"],
                       **({"reason": probe["reason"]} if "reason" in probe else {})}
    if not probe["cuda_available"] and not args.allow_cpu:
        for part in PARTS:
            summary["parts"][part] = {"status": "skipped", "reason": f"no CUDA device: {probe['reason']}"}
        return finish("no-cuda", EXIT_NO_CUDA)

    for part in args.parts:
        box = min(TIME_BOX_S[part], left())
        if box < MIN_BOX_S:
            summary["parts"][part] = {"status": "skipped", "reason": f"no time left of the {args.budget_s} s budget"}
            continue
        if part == "ort_cuda" and "CUDAExecutionProvider" not in probe.get("onnxruntime", {}).get("providers", []):
            summary["parts"][part] = {"status": "absent", "reason": "onnxruntime has no CUDAExecutionProvider "
                                      f"here (providers: {probe.get('onnxruntime')}); install onnxruntime-gpu alone"}
            continue
        if part == "tensorrt" and "absent" in probe.get("tensorrt", {}):
            summary["parts"][part] = {"status": "absent", "reason": probe["tensorrt"]["absent"]}
            continue
        result_file = out / f"{part}.json"
        result_file.unlink(missing_ok=True)
        lacking = [m for m in PART_NEEDS[part] if m in probe.get("missing_modules", [])]
        if lacking:
            summary["parts"][part] = {"status": "skipped", "reason": needs_reason(lacking, wheelhouse is None)}
            continue
        if part == "tests":
            junit = out / "gpu-tests.xml"
            junit.unlink(missing_ok=True)
            command = [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
            record = run_boxed(part, command, box, logs / f"{part}.log", env)
            if junit.is_file():
                record["result"] = junit_summary(junit)
                counts = record["result"]
                if record["status"] == "failed" and counts["failures"] == 0 and counts["errors"] == 0:
                    record["status"] = "ok"  # pytest's exit 1 came from modules not collected for a missing package
                    record.pop("log_tail", None)
        else:
            record = run_boxed(part, part_command(python, part, args, result_file), box, logs / f"{part}.log", env)
            if record["exit_code"] == EXIT_PART_SKIPPED and result_file.is_file():
                skipped = json.loads(result_file.read_text())
                record = {"status": "skipped", "reason": skipped["skipped"], "log": record["log"]}
        if part != "tests" and record["status"] != "skipped" and result_file.is_file():
            record["result"] = json.loads(result_file.read_text())
        summary["parts"][part] = record
        write_summary(summary_path, summary)  # what is done so far survives a kill of the whole script
    bad = [p for p, r in summary["parts"].items() if r["status"] in ("failed", "timeout")]
    if summary["wheelhouse"]["status"] == "failed":
        bad.insert(0, "wheelhouse")
    return finish("failed: " + ", ".join(bad) if bad else "ok", EXIT_FAILED if bad else EXIT_OK)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=None, help="where device-check.json goes (default: $OUT, else runs/device-check)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="all parts together, seconds")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the parts without CUDA too (a check of this script's plumbing with --device cpu; "
                        "its numbers are not a device measurement)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-images", type=int, default=1200, help="steps: synthetic images (60 %% train)")
    p.add_argument("--epochs", type=int, default=2, help="steps: epochs of each fit")
    p.add_argument("--batch", type=int, default=64, help="steps: batch size")
    p.add_argument("--workers", type=int, default=4, help="steps: data-loading workers")
    p.add_argument("--ort-backend", default="ort-cuda", help="ort_cuda: the runner backend timed")
    p.add_argument("--latency-batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--wheelhouse", default=None,
                   help="folder of wheels (--build-wheelhouse) to install what this Python lacks from "
                        "(default: $FAIRDEPLOY_WHEELHOUSE; none: use only what is installed)")
    p.add_argument("--build-wheelhouse", type=Path, default=None, metavar="DIR",
                   help="with internet, here: download the wheels a bare GPU machine needs into DIR and exit")
    # internal: run one part in this process and write its JSON
    p.add_argument("--part", choices=sorted(PART_FUNCTIONS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_wheelhouse is not None:
        plan = build_wheelhouse(args.build_wheelhouse)
        print(f"wheelhouse {args.build_wheelhouse}: {len(plan['wheels'])} wheels, {plan['bytes'] / 2**20:.1f} MiB "
              f"for Python {plan['python']}; not carried (the machine's image must have them): "
              f"{', '.join(c['name'] for c in plan['not_carried']) or 'none'}")
        return EXIT_OK
    if args.part is None:
        return orchestrate(args)
    code, result = run_part(args.part, args)
    write_summary(args.result, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
