"""Distributed training throughput: samples/s of the training loop with 1 vs N processes under torchrun (DDP).

Each configuration runs `fairdeploy.training.loop.fit` (DistributedDataParallel, the sharded sampler, the global
batch split over the ranks, validation gathered) inside `torchrun --standalone --nproc-per-node P` on a synthetic
data set, and reads the loop's own train_samples_per_s (the whole job's samples over the training time of an epoch,
validation and checkpoints excluded). The first epoch is warm-up; the rate is the best of the later epochs (other
processes on a shared machine only ever slow an epoch down), the median is in the JSON. Configurations alternate
(1, P, 1, P, ...) so that a change in the machine's load hits both. Scaling efficiency = (rate P / rate 1) / P,
reported, not asserted.

CPU: gloo, one torch thread per process (`--nproc 2` on a 2-core machine). CUDA: NCCL, one GPU per process.

    python benchmarks/distributed.py                            # CPU: 1 vs 2 processes
    python benchmarks/distributed.py --device cuda --nproc 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/distributed.json")
    p.add_argument("--nproc", nargs="+", type=int, default=None,
                   help="process counts to compare (default: 1 2 on the CPU, 1 and every GPU count up to all)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=480, help="synthetic images (60%% train)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over the processes)")
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    p.add_argument("--repeats", type=int, default=2, help="runs of each process count, alternating")
    p.add_argument("--worker", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: Any) -> None:
    """One rank of one run (started by torchrun): fit for --epochs, rank 0 writes the history."""
    import torch

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run, world
    from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from fairdeploy.models.registry import create_model
    from fairdeploy.training.loop import FitConfig, fit
    from fairdeploy.training.train import spec_datasets

    manifest_path, out = args.worker
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(1)
    with distributed_run(args.device) as device:
        manifest = read_manifest(manifest_path)
        spec = ModelSpec(arch=args.arch, classes=tuple(manifest.classes), groups=tuple(manifest.groups),
                         image_size=args.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        train, val = spec_datasets(manifest, spec)
        torch.manual_seed(args.seed)
        model = create_model(args.arch, len(spec.classes))
        cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        result = fit(model, spec, train, val, cfg, Path(out) / "run", torch.device(common.resolve(device)))
        if world().is_main:
            (Path(out) / "history.json").write_text(json.dumps({"processes": world().size,
                                                                 "history": list(result.history)}))


def run_one(args: Any, manifest: Path, nproc: int, scratch: Path, index: int) -> dict[str, Any]:
    out = scratch / f"run{index}-p{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--device", args.device, "--arch", args.arch,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--worker", str(manifest), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        common.fail(f"{nproc}-process run failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}")
    rec = json.loads((out / "history.json").read_text())
    rates = [h["train_samples_per_s"] for h in rec["history"][1:]] or [rec["history"][0]["train_samples_per_s"]]
    return {"processes": rec["processes"], "rates": rates, "val_accuracy": rec["history"][-1]["val_accuracy"],
            "data_order": [h["data_order"] for h in rec["history"]]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    import torch

    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    dev = common.resolve(args.device)
    if dev.type == "cuda":
        counts = args.nproc or sorted({1, *[n for n in (2, 4, 8) if n <= torch.cuda.device_count()],
                                       torch.cuda.device_count()})
        args.device = "cuda"
    else:
        counts = args.nproc or [1, 2]
        args.device = "cpu"
    if any(args.batch_size % n for n in counts):
        common.fail(f"--batch-size {args.batch_size} must split evenly over {counts} processes")
    info = common.machine(dev)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="fd-dist-bench.") as tmp:
        scratch = Path(tmp)
        manifest = generate_synthetic(scratch / "data", SynthConfig(n_images=args.images, image_size=args.image_size,
                                                                    seed=args.seed))
        i = 0
        for _ in range(args.repeats):
            for n in counts:
                runs[n].append(run_one(args, manifest, n, scratch, i))
                i += 1
                print(f"  {n} process(es), run {len(runs[n])}: best {max(runs[n][-1]['rates']):.1f} samples/s",
                      flush=True)
    info["load_average_end"] = common.load_average()
    best = {n: max(r for run in runs[n] for r in run["rates"]) for n in counts}
    median = {n: statistics.median(r for run in runs[n] for r in run["rates"]) for n in counts}
    rows = []
    for n in counts:
        speedup = best[n] / best[counts[0]]
        rows.append([n, common.fmt(best[n], 1), common.fmt(median[n], 1), common.fmt(speedup, 2),
                     common.fmt(speedup / n * counts[0], 2)])
    print(f"\n{args.arch} {args.image_size}x{args.image_size}, global batch {args.batch_size}, {args.device} "
          f"({'NCCL' if args.device == 'cuda' else 'gloo, 1 thread per process'}); load "
          f"{info['load_average_1_5_15']} -> {info['load_average_end']}")
    print(common.table(["processes", "samples/s (best epoch)", "samples/s (median)", "speed-up", "efficiency"], rows))
    same_order = len({tuple(run["data_order"]) for n in counts for run in runs[n]}) == 1
    print(f"same sample order in every run: {same_order}")
    result = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "machine": info,
              "runs": {str(n): runs[n] for n in counts}, "best_samples_per_s": {str(n): best[n] for n in counts},
              "median_samples_per_s": {str(n): median[n] for n in counts},
              "speedup": {str(n): best[n] / best[counts[0]] for n in counts},
              "efficiency": {str(n): best[n] / best[counts[0]] / n * counts[0] for n in counts},
              "same_sample_order": same_order}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
