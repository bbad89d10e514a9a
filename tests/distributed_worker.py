"""Run by tests/test_distributed.py: a list of scenarios in ONE process, either as a plain process (a world of 1,
the reference) or as each rank of ONE torchrun job (2 ranks) -- instead of a Python process (or a torchrun job of
three) per scenario, which is what made the file the suite's largest cost.

usage: python [-m torch.distributed.run --standalone --nproc-per-node N] tests/distributed_worker.py PLAN.json

PLAN.json: {"results": DIR, "scenarios": [{"name": ..., "run": "fit" | "scores" | "cli", "args": [...]}, ...]}

fit MANIFEST OUT:    one epoch of the training loop on a BatchNorm-free convnet with deterministic inputs, SGD and
                     group x class balanced sampling (OUT/last, OUT/trainer.json): with no per-rank statistics and
                     no augmentation, two ranks must reproduce one process up to float rounding.
scores MANIFEST OUT: FairPrune (Fisher, first-order) and SNNL scores and selections on a fixed model and score set
                     (OUT/scores.safetensors, OUT/picks.json).
cli ARGS...:         `fairdeploy ARGS...` through fairdeploy.cli.main, as `[torchrun -m] fairdeploy ARGS...` runs it.

Every rank writes DIR/rank{R}.json after each scenario: {name: {"code", "stdout", "stderr", "seconds"}} (code: the
command's exit status; for fit/scores 0, or 1 with the traceback in "stderr"), so the test can check what each
rank printed and that the others print nothing.

Each scenario joins its own process group, as a separate torchrun job would: fairdeploy's `distributed_run` inits
the default group from the environment (env://) and destroys it at the end. A second init against the SAME store
is racy (a rank can read its peer's address left by the previous group and fail with "Connection refused"), so
before each scenario rank 0 picks a free port, as `torchrun --standalone` does, and hosts a fresh store there
(TORCHELASTIC_USE_AGENT_STORE=False); the others learn the port through torchrun's own store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

PORT_KEY = "fairdeploy-test-worker/port/{}"


def fit_one_epoch(manifest_path: str, out: str) -> None:
    from torch import nn

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run
    from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from fairdeploy.training.loop import FitConfig, fit

    class NoNorm(nn.Module):  # module names of a resnet18 (conv1, fc), so save_checkpoint can describe it
        def __init__(self, k: int):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.fc = nn.Linear(64, k)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv1(x)).mean((2, 3)))

    with distributed_run("cpu"):
        manifest = read_manifest(manifest_path)
        spec = ModelSpec(arch="resnet18", classes=tuple(manifest.classes), groups=tuple(manifest.groups),
                         image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        enc = Encoding(spec.classes, spec.groups)
        tf = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)
        train, val = split_dataset(manifest, "train", enc, tf), split_dataset(manifest, "val", enc, tf)
        torch.manual_seed(0)
        model = NoNorm(len(spec.classes))
        cfg = FitConfig(epochs=1, batch_size=16, lr=0.05, optimizer="sgd", balance="group-class", seed=4)
        fit(model, spec, train, val, cfg, Path(out), torch.device("cpu"))


def scores(manifest_path: str, out: str) -> None:
    from safetensors.torch import save_file

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run, world
    from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
    from fairdeploy.models.registry import create_model
    from fairdeploy.pruning.curvature import group_curvature
    from fairdeploy.pruning.fairprune import FairPruneConfig, FairPruneStep
    from fairdeploy.pruning.scoresets import balanced_batch_order, group_score_sets
    from fairdeploy.pruning.snnl_prune import SnnlConfig, SnnlStep

    with distributed_run("cpu"):
        manifest = read_manifest(manifest_path)
        enc = Encoding(tuple(manifest.classes), tuple(manifest.groups))
        ds = split_dataset(manifest, "train", enc, eval_transform(32, IMAGENET_MEAN, IMAGENET_STD))
        torch.manual_seed(0)
        model = create_model("resnet18", len(enc.classes)).eval()
        dark, light = enc.groups.index("dark"), enc.groups.index("light")
        # 10 images per group in batches of 4: 3 batches of 4, 4, 2 -> rank 0 scores 2 batches, rank 1 one
        sets = group_score_sets(ds.labels, ds.groups, [dark, light], 10, seed=0)
        cfg = FairPruneConfig(granularity="weight", curvature="fisher", mc_samples=2, first_order=True, ratio=0.05,
                              batch_size=4)
        step = FairPruneStep(cfg, "resnet18", 32, ds, {"dark": sets[dark], "light": sets[light]}, "dark", "light",
                             torch.device("cpu"), seed=3)
        fisher = group_curvature(model, step.sets["unprivileged"], "fisher", "cpu", batch_size=4, mc_samples=2,
                                 seed=5)
        hutch = group_curvature(model, step.sets["privileged"], "hutchinson", "cpu", layers=["layer4.1.conv2", "fc"],
                                batch_size=4, seed=5)
        fp = step(model, {}, 1)
        order, bs = balanced_batch_order(ds.groups, [dark, light], 8, 3, seed=0)
        snnl = SnnlStep(SnnlConfig(layers="layer4.1.conv2,layer3.1.conv2", channels_per_round=16, round_to=8,
                                   batch_size=8, batches=3),
                        "resnet18", 32, ds, order, bs, torch.device("cpu"))(model, {}, 1)
        if world().is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            tensors = {f"fisher/{k}": v for k, v in fisher.items()}
            tensors.update({f"hutchinson/{k}": v for k, v in hutch.items()})
            tensors.update({f"mask/{k}": v.to(torch.uint8) for k, v in fp.masks.items()})
            save_file(tensors, str(Path(out) / "scores.safetensors"))
            picks = {"world": world().size, "fairprune": fp.removed, "snnl": snnl.removed}
            (Path(out) / "picks.json").write_text(json.dumps(picks, indent=1))


def cli(*args: str) -> int:
    from fairdeploy.cli import main

    saved = sys.argv
    sys.argv = ["fairdeploy", *args]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_store():
    """torchrun's own key-value store (the launcher hosts it at MASTER_ADDR:MASTER_PORT), or None outside torchrun."""
    from fairdeploy.distributed import launched_by_torchrun

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return None
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)


def _fresh_rendezvous(store, index: int) -> None:
    """This scenario's process group gets a store of its own: rank 0 hosts it on a new free port."""
    if store is None:
        return
    key = PORT_KEY.format(index)
    if int(os.environ["RANK"]) == 0:
        store.set(key, str(_free_port()))
    os.environ["MASTER_PORT"] = store.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


RUNS = {"fit": fit_one_epoch, "scores": scores, "cli": cli}


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(1)  # this process's one setting: the references and the ranks compute alike
    rank = int(os.environ.get("RANK", "0"))
    results_dir = Path(plan["results"])
    results_dir.mkdir(parents=True, exist_ok=True)
    store = _agent_store()
    results: dict[str, dict] = {}
    for index, scenario in enumerate(plan["scenarios"]):
        _fresh_rendezvous(store, index)
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = RUNS[scenario["run"]](*scenario["args"]) or 0
            except Exception:  # noqa: BLE001 - recorded for the test to show; the next scenario still runs
                traceback.print_exc()
                code = 1
        results[scenario["name"]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                                     "seconds": round(time.perf_counter() - start, 2)}
        tmp = results_dir / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_dir / f"rank{rank}.json")


if __name__ == "__main__":
    main(sys.argv[1])
