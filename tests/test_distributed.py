"""torchrun / DDP (fairdeploy.distributed): 2 CPU processes on gloo against one process on the same data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FAIRDEPLOY_DIST_TIMEOUT": "60"}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def ok(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    res = run(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 synthetic 32x32 images: 96 train, 34 val (an even number of val images is not assumed)."""
    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("dist") / "data", SynthConfig(n_images=160, image_size=32))


def last_epoch(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer.json").read_text())["history"][-1]


def test_training_loop_two_ranks_reproduces_one_process(synth: Path, tmp_path: Path) -> None:
    """No BatchNorm, no augmentation, SGD, group x class balanced sampling: DDP over 2 ranks with the global batch
    split in two must take the same steps as one process (same sample order, same averaged gradients)."""
    from safetensors.torch import load_file

    ok([sys.executable, str(WORKER), "fit", str(synth), str(tmp_path / "one")])
    ok(torchrun(str(WORKER), "fit", str(synth), str(tmp_path / "two")))
    one, two = last_epoch(tmp_path / "one"), last_epoch(tmp_path / "two")
    assert one["data_order"] == two["data_order"]  # the balanced draw, sharded and put back together
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)  # the loss summed over both ranks
    for key in ("val_accuracy", "val_f1_macro", "val_group_accuracy", "val_eodd"):
        assert two[key] == one[key], key
    w1 = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    torch.manual_seed(0)  # the worker's initial weights: training moved them far more than the tolerance
    start = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False).weight.detach()
    assert (w1["conv1.weight"] - start).abs().max() > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)


def test_cli_train_and_finetune_under_torchrun(synth: Path, tmp_path: Path) -> None:
    """`torchrun -m fairdeploy train|finetune`: one process reports and writes; the recorded validation metrics
    are those of the whole split (the saved model evaluated here in one process gives exactly them); the sample
    order is the one-process order."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.training.train import evaluate_checkpoint

    common = ["--data", str(synth), "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    res = ok(torchrun("-m", "fairdeploy", "train", *common, "--out", str(tmp_path / "two"), "--image-size", "32"))
    assert res.stdout.count("checkpoint:") == 1  # rank 1 prints nothing
    ok([sys.executable, "-m", "fairdeploy", "train", *common, "--out", str(tmp_path / "one"), "--image-size", "32"])
    assert last_epoch(tmp_path / "two")["data_order"] == last_epoch(tmp_path / "one")["data_order"]
    assert json.loads((tmp_path / "two" / "trainer.json").read_text())["processes"] == 2

    res = ok(torchrun("-m", "fairdeploy", "finetune", *common, "--model", str(tmp_path / "two"), "--lr", "1e-4",
                      "--out", str(tmp_path / "ft")))
    assert res.stdout.count("checkpoint:") == 1
    rec = last_epoch(tmp_path / "ft")
    report = evaluate_checkpoint(tmp_path / "ft" / "last", read_manifest(synth), "val", "cpu", bootstrap=0)
    assert report.overall_accuracy == rec["val_accuracy"]
    assert report.overall_f1_macro == rec["val_f1_macro"]
    assert {g: m.accuracy for g, m in report.groups} == rec["val_group_accuracy"]
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporaries, no scratch left by any rank


def test_fairprune_and_snnl_scores_and_selection_equal_one_process(synth: Path, tmp_path: Path) -> None:
    """Curvature (Fisher with MC targets, Hutchinson), FairPrune's first-order gradients and SNNL scored over 2 ranks
    (3 batches per set: the ranks hold 2 and 1) equal one process's bit for bit, and so do the pruned weights and
    the removed channels."""
    from safetensors.torch import load_file

    ok([sys.executable, str(WORKER), "scores", str(synth), str(tmp_path / "one")])
    ok(torchrun(str(WORKER), "scores", str(synth), str(tmp_path / "two")))
    s1 = load_file(str(tmp_path / "one" / "scores.safetensors"))
    s2 = load_file(str(tmp_path / "two" / "scores.safetensors"))
    assert s1.keys() == s2.keys() and any(k.startswith("mask/") for k in s1)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    p1 = json.loads((tmp_path / "one" / "picks.json").read_text())
    p2 = json.loads((tmp_path / "two" / "picks.json").read_text())
    assert (p1["world"], p2["world"]) == (1, 2)
    assert p1["fairprune"]["weights_pruned"] > 0 and p1["snnl"]["channels_removed"] == 16
    assert p2["fairprune"] == p1["fairprune"]
    assert p2["snnl"] == p1["snnl"]  # the channels removed and every channel's score


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


EPOCHS = 4


def test_killed_rank_fails_clearly_leaves_complete_checkpoints_and_resumes(synth: Path, tmp_path: Path) -> None:
    """SIGKILL of rank 1 right after the first epoch's checkpoint: a non-zero exit, one error line, the earlier
    complete checkpoint and no temporary; `--resume` under torchrun then finishes the run."""
    out = tmp_path / "run"
    args = ["-m", "fairdeploy", "train", "--data", str(synth), "--out", str(out), "--epochs", str(EPOCHS),
            "--batch-size", "16", "--image-size", "32", "--device", "cpu"]
    launcher = subprocess.Popen(torchrun(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 90
        victim = _rank_pid(launcher, 1, deadline)
        while not (out / "trainer.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)  # rank 1 dies during the second epoch
        stdout, stderr = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stdout[-2000:] + stderr[-3000:]
    # rank 0 saw the broken connection, or torchrun stopped it first: either way one line naming the cause
    assert lines[0].startswith("error: rank 0 of 2: ") and "another process of" in lines[0], lines[0]
    state = json.loads((out / "trainer.json").read_text())
    assert state["epoch"] < EPOCHS  # it did not finish (epochs count from 1)
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "trainer.json"]
    assert not list(tmp_path.rglob(".*.tmp"))  # no half-written file
    from fairdeploy.models.checkpoint import load_checkpoint

    load_checkpoint(out / "last", "cpu")  # complete: loads

    # resume under torchrun: finishes the remaining epochs, keeps the finished ones as they were
    done = state["history"]
    res = ok(torchrun(*args, "--resume"))
    assert res.stdout.count("checkpoint:") == 1
    final = json.loads((out / "trainer.json").read_text())
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert final["history"][: len(done)] == done
    assert len({h["data_order"] for h in final["history"]}) == EPOCHS


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


def test_pipeline_stage_under_torchrun_trains_with_two_processes(synth: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's train stage with nproc = 2: torchrun runs train_model on 2 ranks from the JSON spec (removed
    afterwards), in the one-process sample order."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.pipeline.launch import SPEC_FILE, run_under_torchrun
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    manifest = read_manifest(synth)
    fit = FitConfig(epochs=1, batch_size=16, seed=3, balance="class")
    stage = tmp_path / "train"
    stage.mkdir()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(k, "1")
    run_under_torchrun("train", 2, stage, manifest=manifest.source, images_root=str(manifest.root),
                       allow_outside_root=False, out=stage, config=fit, device="cpu", arch="resnet18", image_size=32)
    state = json.loads((stage / "trainer.json").read_text())
    assert state["processes"] == 2 and (stage / "best" / "model.safetensors").is_file()
    assert not (stage / SPEC_FILE).exists()
    one = train_model(manifest, "resnet18", tmp_path / "one", fit, 32, device="cpu")
    assert state["history"][0]["data_order"] == one.history[0]["data_order"]


def test_cli_prune_under_torchrun_writes_what_one_process_writes(synth: Path, tmp_path: Path) -> None:
    """`torchrun -m fairdeploy prune` without fine-tuning between steps: every step's removal and validation
    metrics, the selection and the pruned weights equal one process's (SNNL and FairPrune channel steps)."""
    from safetensors.torch import load_file

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread; so is the checkpoint trained here
    try:
        ckpt = train_model(read_manifest(synth), "resnet18", tmp_path / "base", FitConfig(epochs=1, batch_size=16),
                           32, device="cpu").best_dir
    finally:
        torch.set_num_threads(before)
    common = ["-m", "fairdeploy", "prune", "--model", str(ckpt), "--data", str(synth), "--device", "cpu",
              "--steps", "2", "--batch-size", "16"]
    for method in (["--method", "snnl", "--snnl-batches", "3", "--channels-per-round", "16"],
                   ["--method", "fairprune", "--granularity", "channel", "--ratio", "0.1", "--score-samples", "10"]):
        one, two = tmp_path / f"{method[1]}-1", tmp_path / f"{method[1]}-2"
        ok([sys.executable, *common, *method, "--out", str(one)])
        res = ok(torchrun(*common, *method, "--out", str(two)))
        assert res.stdout.count("checkpoint:") == 1
        r1, r2 = (json.loads((d / "prune.json").read_text()) for d in (one, two))
        assert len(r1["steps"]) == 3 and r1["steps"][1]["removed"]["channels_removed"] > 0
        for s1, s2 in zip(r1["steps"], r2["steps"], strict=True):
            assert s2["removed"] == s1["removed"]
            assert s2["val"] == s1["val"]
        assert r2["selected_step"] == r1["selected_step"]
        w1, w2 = (load_file(str(d / "model.safetensors")) for d in (one, two))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


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
