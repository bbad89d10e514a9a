"""torchrun / DDP (fairdeploy.distributed): 2 CPU processes on gloo against one process on the same data.

Starting Python (torch, fairdeploy) is most of what a small torchrun job costs, so the scenarios share launches:
one plain process runs every one-process reference (tests/distributed_worker.py), ONE torchrun job of 2 ranks runs
every scenario again in the same order (each in a process group of its own, as separate jobs would), and the test
functions below check what each wrote. Two launches stay separate because what they test is the launch itself:
`torchrun -m fairdeploy train` with a rank killed (the job must die), and the pipeline's own torchrun launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# Only a hang may trip these limits, never a slow machine. The longest launch (the 2-rank job) takes about 20 s on
# an idle 2-core machine; under load one of the old tests took 102 s, 7x its idle 14 s, against a 120 s limit. A
# collective whose peer died or went silent already fails on its own after FAIRDEPLOY_DIST_TIMEOUT (one clear
# error line, not a hang). So a launch is stopped only after HANG_S (90x the idle time), and a peer counts as
# silent after 300 s, which no rank's own work between two collectives (an epoch of 96 images at 32 px, a
# checkpoint write; about 1 s idle) comes near even 10x slower.
HANG_S = 1800
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FAIRDEPLOY_DIST_TIMEOUT": "300"}
EPOCHS = 4  # of the run whose rank 1 is killed during its second epoch
# `fairdeploy train` under torchrun and as one process; the pipeline's train stage runs the same FitConfig (its
# spec goes through JSON, so non-default seed and balance show that they arrive), in the same one-process order
TRAIN = ("--epochs", "1", "--batch-size", "16", "--seed", "3", "--balance", "class", "--image-size", "32",
         "--device", "cpu")
STAGE_FIT = {"epochs": 1, "batch_size": 16, "seed": 3, "balance": "class"}
# each method's options, and its --config settings (evaluation batch 16; SNNL's 3 batches, FairPrune's 10 images)
PRUNE_METHODS = {"snnl": (("--method", "snnl", "--channels-per-round", "16"),
                          "batch_size = 16\n[snnl]\nbatches = 3\n"),
                 "fairprune": (("--method", "fairprune", "--granularity", "channel", "--ratio", "0.1"),
                               "batch_size = 16\n[fairprune]\nscore_samples = 10\n")}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def ok(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_S, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's folder: the data, every launch's outputs and what each rank printed."""
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def synth(work: Path) -> Path:
    """160 synthetic 32x32 images: 96 train, 34 val (an even number of val images is not assumed)."""
    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    return generate_synthetic(work / "data", SynthConfig(n_images=160, image_size=32))


def last_epoch(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer.json").read_text())["history"][-1]


# ---- the launches -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Killed:
    """`torchrun -m fairdeploy train` whose rank 1 was killed: its exit, output, and a copy of its folder then."""

    out: Path  # the run folder (later resumed by the 2-rank job)
    args: tuple[str, ...]  # the `fairdeploy train` arguments
    returncode: int
    output: str
    at_exit: Path  # a copy of out's parent folder as the killed job left it


def _rank_pid(launcher: subprocess.Popen[str], rank: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        for child in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True,
                                    check=False).stdout.split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of the torchrun job never started")


@pytest.fixture(scope="module")
def killed(synth: Path, work: Path) -> Killed:
    """SIGKILL of rank 1 right after the first epoch's checkpoint (trainer.json appears)."""
    out = work / "killed" / "run"
    args = ("train", "--data", str(synth), "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", "16",
            "--image-size", "32", "--device", "cpu")
    launcher = subprocess.Popen(torchrun("-m", "fairdeploy", *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_S
        victim = _rank_pid(launcher, 1, deadline)
        while not (out / "trainer.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)  # rank 1 dies during the second epoch
        stdout, stderr = launcher.communicate(timeout=HANG_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    at_exit = work / "killed-at-exit"
    shutil.copytree(out.parent, at_exit)
    return Killed(out, args, launcher.returncode, stdout + stderr, at_exit)


@dataclass(frozen=True)
class Job:
    """A worker's scenarios: the folder of their outputs and, for each rank, what each scenario returned and
    printed ({name: {code, stdout, stderr, seconds}})."""

    out: Path
    printed: list[dict[str, dict]]

    def succeeded(self, name: str) -> str:
        """Every rank ran scenario `name` with exit 0 and only rank 0 printed to stdout; returns that output."""
        runs = [p[name] for p in self.printed]
        for rank, run in enumerate(runs):
            assert run["code"] == 0, f"{self.out.name} rank {rank}: {run['stdout'][-2000:]}{run['stderr'][-4000:]}"
        for run in runs[1:]:
            assert run["stdout"] == ""  # the other ranks print nothing
        return runs[0]["stdout"]


def run_worker(work: Path, name: str, scenarios: list[tuple[str, str, list[str]]], nproc: int) -> Job:
    """Run `scenarios` in one plain process (nproc 1) or in ONE torchrun job of `nproc` ranks."""
    out, printed = work / name, work / f"{name}-printed"
    plan = work / f"{name}-plan.json"
    plan.write_text(json.dumps({"results": str(printed), "scenarios": [
        {"name": n, "run": run, "args": args} for n, run, args in scenarios]}))
    ok(torchrun(str(WORKER), str(plan)) if nproc > 1 else [sys.executable, str(WORKER), str(plan)])
    return Job(out, [json.loads((printed / f"rank{r}.json").read_text()) for r in range(nproc)])


def _prune_args(synth: Path, base: Path, method: str, out: Path) -> list[str]:
    flags, settings = PRUNE_METHODS[method]
    config = out.parent.parent / f"prune-{method}.toml"  # the work folder, beside the runs' own folders
    config.write_text(settings)
    return ["prune", "--model", str(base), "--data", str(synth), "--device", "cpu", "--steps", "2", *flags,
            "--config", str(config), "--out", str(out)]


def _scenarios(synth: Path, out: Path, prune_base: Path) -> list[tuple[str, str, list[str]]]:
    return [
        ("fit", "fit", [str(synth), str(out / "fit")]),
        ("scores", "scores", [str(synth), str(out / "scores")]),
        ("train", "cli", ["train", "--data", str(synth), "--out", str(out / "train"), *TRAIN]),
        *[(f"prune-{m}", "cli", _prune_args(synth, prune_base, m, out / f"prune-{m}")) for m in PRUNE_METHODS],
    ]


@pytest.fixture(scope="module")
def one(synth: Path, work: Path) -> Job:
    """The one-process references, all in one plain process."""
    out = work / "one"
    return run_worker(work, "one", _scenarios(synth, out, out / "train" / "best"), nproc=1)


@pytest.fixture(scope="module")
def two(synth: Path, work: Path, one: Job, killed: Killed) -> Job:
    """The same scenarios in ONE torchrun job of 2 ranks (pruning starts from the one-process trained model, so
    that both prune the same checkpoint), then `finetune` of its trained model and `--resume` of the killed run."""
    out = work / "two"
    return run_worker(work, "two", [
        *_scenarios(synth, out, one.out / "train" / "best"),
        ("finetune", "cli", ["finetune", "--data", str(synth), "--model", str(out / "train"), "--epochs", "1",
                             "--batch-size", "16", "--lr", "1e-4", "--device", "cpu", "--out", str(out / "ft")]),
        ("resume", "cli", [*killed.args, "--resume"]),
    ], nproc=2)


@pytest.fixture(scope="module")
def stage(synth: Path, work: Path) -> Path:
    """The pipeline's train stage with nproc = 2: its own torchrun launch (fairdeploy.pipeline.launch)."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pipeline.launch import run_under_torchrun
    from fairdeploy.training.loop import FitConfig

    manifest = read_manifest(synth)
    folder = work / "stage" / "train"
    folder.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            mp.setenv(k, "1")
        run_under_torchrun("train", 2, folder, manifest=manifest.source, images_root=str(manifest.root),
                           allow_outside_root=False, out=folder, config=FitConfig(**STAGE_FIT), device="cpu",
                           arch="resnet18", image_size=32)
    return folder


# ---- what they wrote ----------------------------------------------------------------------------------------

def test_training_loop_two_ranks_reproduces_one_process(one: Job, two: Job) -> None:
    """No BatchNorm, no augmentation, SGD, group x class balanced sampling: DDP over 2 ranks with the global batch
    split in two must take the same steps as one process (same sample order, same averaged gradients)."""
    from safetensors.torch import load_file

    one.succeeded("fit")
    two.succeeded("fit")
    r1, r2 = last_epoch(one.out / "fit"), last_epoch(two.out / "fit")
    assert r1["data_order"] == r2["data_order"]  # the balanced draw, sharded and put back together
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)  # the loss summed over both ranks
    for key in ("val_accuracy", "val_f1_macro", "val_group_accuracy", "val_eodd"):
        assert r2[key] == r1[key], key
    w1 = load_file(str(one.out / "fit" / "last" / "model.safetensors"))
    w2 = load_file(str(two.out / "fit" / "last" / "model.safetensors"))
    torch.manual_seed(0)  # the worker's initial weights: training moved them far more than the tolerance
    start = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False).weight.detach()
    assert (w1["conv1.weight"] - start).abs().max() > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)


def test_cli_train_under_torchrun_reports_once_in_the_one_process_order(one: Job, two: Job) -> None:
    """`torchrun -m fairdeploy train`: one process reports and writes; the sample order is the one-process order."""
    assert two.succeeded("train").count("checkpoint:") == 1
    assert one.succeeded("train").count("checkpoint:") == 1
    assert last_epoch(two.out / "train")["data_order"] == last_epoch(one.out / "train")["data_order"]
    assert json.loads((two.out / "train" / "trainer.json").read_text())["processes"] == 2


def test_cli_finetune_under_torchrun_records_the_whole_split(synth: Path, two: Job) -> None:
    """`torchrun -m fairdeploy finetune`: the recorded validation metrics are those of the whole split (the saved
    model evaluated here in one process gives exactly them)."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.training.train import evaluate_checkpoint

    assert two.succeeded("finetune").count("checkpoint:") == 1
    rec = last_epoch(two.out / "ft")
    report = evaluate_checkpoint(two.out / "ft" / "last", read_manifest(synth), "val", "cpu", bootstrap=0)
    assert report.overall_accuracy == rec["val_accuracy"]
    assert report.overall_f1_macro == rec["val_f1_macro"]
    assert {g: m.accuracy for g, m in report.groups} == rec["val_group_accuracy"]


def test_no_rank_leaves_temporaries_or_scratch(one: Job, two: Job, killed: Killed) -> None:
    assert not [str(p) for d in (one.out, two.out, killed.out.parent) for p in d.rglob(".*")]


def test_fairprune_and_snnl_scores_and_selection_equal_one_process(one: Job, two: Job) -> None:
    """Curvature (Fisher with MC targets, Hutchinson), FairPrune's first-order gradients and SNNL scored over 2 ranks
    (3 batches per set: the ranks hold 2 and 1) equal one process's bit for bit, and so do the pruned weights and
    the removed channels."""
    from safetensors.torch import load_file

    one.succeeded("scores")
    two.succeeded("scores")
    s1 = load_file(str(one.out / "scores" / "scores.safetensors"))
    s2 = load_file(str(two.out / "scores" / "scores.safetensors"))
    assert s1.keys() == s2.keys() and any(k.startswith("mask/") for k in s1)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    p1 = json.loads((one.out / "scores" / "picks.json").read_text())
    p2 = json.loads((two.out / "scores" / "picks.json").read_text())
    assert (p1["world"], p2["world"]) == (1, 2)
    assert p1["fairprune"]["weights_pruned"] > 0 and p1["snnl"]["channels_removed"] == 16
    assert p2["fairprune"] == p1["fairprune"]
    assert p2["snnl"] == p1["snnl"]  # the channels removed and every channel's score


@pytest.mark.parametrize("method", list(PRUNE_METHODS))
def test_cli_prune_under_torchrun_writes_what_one_process_writes(method: str, one: Job, two: Job) -> None:
    """`torchrun -m fairdeploy prune` without fine-tuning between steps: every step's removal and validation
    metrics, the selection and the pruned weights equal one process's (SNNL and FairPrune channel steps)."""
    from safetensors.torch import load_file

    assert one.succeeded(f"prune-{method}").count("checkpoint:") == 1
    assert two.succeeded(f"prune-{method}").count("checkpoint:") == 1
    d1, d2 = one.out / f"prune-{method}", two.out / f"prune-{method}"
    r1, r2 = (json.loads((d / "prune.json").read_text()) for d in (d1, d2))
    assert len(r1["steps"]) == 3 and r1["steps"][1]["removed"]["channels_removed"] > 0
    for s1, s2 in zip(r1["steps"], r2["steps"], strict=True):
        assert s2["removed"] == s1["removed"]
        assert s2["val"] == s1["val"]
    assert r2["selected_step"] == r1["selected_step"]
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (d1, d2))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_killed_rank_fails_clearly_and_leaves_complete_checkpoints(killed: Killed) -> None:
    """A non-zero exit, one error line, the earlier complete checkpoint and no temporary."""
    from fairdeploy.models.checkpoint import load_checkpoint

    assert killed.returncode != 0
    lines = [ln for ln in killed.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, killed.output[-5000:]
    # rank 0 saw the broken connection, or torchrun stopped it first: either way one line naming the cause
    assert lines[0].startswith("error: rank 0 of 2: ") and "another process of" in lines[0], lines[0]
    run = killed.at_exit / killed.out.name
    state = json.loads((run / "trainer.json").read_text())
    assert state["epoch"] < EPOCHS  # it did not finish (epochs count from 1)
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "trainer.json"]
    assert not list(killed.at_exit.rglob(".*.tmp"))  # no half-written file
    load_checkpoint(run / "last", "cpu")  # complete: loads


def test_resume_under_torchrun_finishes_the_killed_run(killed: Killed, two: Job) -> None:
    """`--resume` under torchrun finishes the remaining epochs and keeps the finished ones as they were."""
    done = json.loads((killed.at_exit / killed.out.name / "trainer.json").read_text())["history"]
    assert two.succeeded("resume").count("checkpoint:") == 1
    final = json.loads((killed.out / "trainer.json").read_text())
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert final["history"][: len(done)] == done
    assert len({h["data_order"] for h in final["history"]}) == EPOCHS


def test_pipeline_stage_under_torchrun_trains_with_two_processes(stage: Path, one: Job) -> None:
    """The pipeline's train stage with nproc = 2: torchrun runs train_model on 2 ranks from the JSON spec (removed
    afterwards) with the configuration the pipeline holds, in the one-process sample order."""
    from fairdeploy.pipeline.launch import SPEC_FILE

    state = json.loads((stage / "trainer.json").read_text())
    assert state["processes"] == 2 and (stage / "best" / "model.safetensors").is_file()
    assert not (stage / SPEC_FILE).exists()
    reference = json.loads((one.out / "train" / "trainer.json").read_text())  # `fairdeploy train` with TRAIN
    assert {k: state["config"][k] for k in STAGE_FIT} == STAGE_FIT
    assert state["config"] == reference["config"] and reference["processes"] == 1
    assert state["history"][0]["data_order"] == reference["history"][0]["data_order"]


# ---- the pipeline's `nproc = N` (fairdeploy.pipeline.launch) ----

def test_stage_configs_survive_the_json_spec_unchanged() -> None:
    """What each rank rebuilds from the pipeline's JSON spec equals the configuration the pipeline holds (nested
    dataclasses, optional ones, tuples)."""
    import dataclasses

    from fairdeploy.pipeline.launch import from_dict
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.fairprune import FairPruneConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.pruning.selection import Guard, StopRule
    from fairdeploy.pruning.snnl_prune import SnnlConfig
    from fairdeploy.training.loop import FitConfig

    configs = [
        PruneConfig(method="snnl", snnl=SnnlConfig(layers="layer4.1.conv2", channels_per_round=16, max_channels=32),
                    stop=StopRule(steps=3, target_value=0.05), guard=Guard(max_f1_drop=0.1), privileged="light",
                    finetune=FitConfig(epochs=2, lr=1e-4, balance="group"), seed=7),
        PruneConfig(fairprune=FairPruneConfig(granularity="channel", curvature="hutchinson", probes=3)),
        BudgetConfig(criterion="fairprune", target=0.25, finetune=FitConfig(epochs=1, distill=0.3), seed=2),
        FitConfig(epochs=3, optimizer="sgd", group_weight="balanced"),
    ]
    for cfg in configs:
        back = from_dict(type(cfg), json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert back == cfg


@pytest.mark.parametrize(("value", "message"), [
    ("0", "nproc must be >= 1 (processes per stage under torchrun), got 0"),
    ('"2"', "nproc"),
])
def test_pipeline_nproc_is_checked(tmp_path: Path, value: str, message: str) -> None:
    from fairdeploy.errors import FairdeployError
    from fairdeploy.pipeline.config import load_pipeline_config

    p = tmp_path / "p.toml"
    p.write_text(f'nproc = {value}\n[data]\nmanifest = "m.csv"\n[model]\narch = "resnet18"\n')
    with pytest.raises(FairdeployError, match="nproc") as err:
        load_pipeline_config(p)
    assert message in str(err.value)


@pytest.mark.parametrize("balance", ["none", "class", "group-class"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_shares_put_back_together_are_the_one_process_sequence(balance: str, drop_last: bool) -> None:
    """ShardSampler against torch's own samplers (RandomSampler / WeightedRandomSampler with the same generator
    seed): 3 ranks' shares interleaved are the one-process sequence, cut to whole global batches (drop_last) or
    padded by wrapping to equal shares."""
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    from fairdeploy.distributed import ShardSampler, interleave

    n, size, local_batch = 23, 3, 2
    weights = None if balance == "none" else torch.rand(n, dtype=torch.double) + 0.1
    one_gen = torch.Generator().manual_seed(5)
    one = list(WeightedRandomSampler(weights, n, True, generator=one_gen) if weights is not None
               else RandomSampler(range(n), generator=one_gen))
    total = n // (local_batch * size) * (local_batch * size) if drop_last else None
    shares = [list(ShardSampler(n, r, size, True, weights, torch.Generator().manual_seed(5), total))
              for r in range(size)]
    assert [len(s) for s in shares] == [len(ShardSampler(n, r, size, True, weights, None, total)) for r in range(size)]
    assert len({len(s) for s in shares}) == 1  # equal shares: the ranks take the same number of steps
    whole = interleave([torch.tensor(s).numpy() for s in shares]).tolist()
    if drop_last:
        assert whole == one[:18]
    else:
        assert whole == one + one[:1]  # 23 -> 24: the first index again


def test_device_choice_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from fairdeploy.distributed import rank_device
    from fairdeploy.errors import FairdeployError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == "cpu"
    with pytest.raises(FairdeployError, match="every torchrun process on the same GPU"):
        rank_device("cuda:0")
