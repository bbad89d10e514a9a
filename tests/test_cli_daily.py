"""Day-to-day CLI behaviour: an unexpected error is not a gate failure, --threads, plain progress in logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fairdeploy.cli.option_blocks import Images, Job, option_blocks


def test_unexpected_error_has_its_own_exit_code_and_one_line(run_main, monkeypatch, tmp_path) -> None:
    import tempfile

    import fairdeploy.cli.option_blocks as option_blocks_cli

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback file goes

    monkeypatch.setattr(option_blocks_cli, "read_manifest", boom)
    code, _out, err = run_main("compress", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                               str(tmp_path / "o"), "--criterion", "magnitude", "--target-macs", "0.5")
    assert code == 4  # not 1: that code means "a validation gate failed" to CI
    assert "internal error (RuntimeError: boom)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    (written,) = tmp_path.glob("fairdeploy-error-*.txt")
    assert f"traceback in {written} " in err and 'raise RuntimeError("boom")' in written.read_text()
    monkeypatch.setenv("FAIRDEPLOY_DEBUG", "1")
    code, _out, err = run_main("compress", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                               str(tmp_path / "o"), "--criterion", "magnitude", "--target-macs", "0.5")
    assert code == 4 and "Traceback (most recent call last)" in err and 'raise RuntimeError("boom")' in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError: boom)")


def test_option_blocks_are_options_to_typer_and_one_value_to_the_command() -> None:
    seen: list[tuple[str, Job]] = []

    @option_blocks
    def command(name: str = typer.Option("x", "--name"), job: Job = Job()) -> None:
        seen.append((name, job))

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)  # two commands: `command` is a subcommand, as in the CLI
    args = ["command", "--device", "cpu", "--workers", "2", "--images-root", "/r", "--allow-outside-root",
            "--name", "y", "--overwrite"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, ["command"]).exit_code == 0
    # --workers and --seed left unset are None: the command's configuration keeps its own defaults
    assert seen == [("y", Job(device="cpu", workers=2, seed=None, images=Images(Path("/r"), True), overwrite=True)),
                    ("x", Job(device="auto", workers=None, seed=None, images=Images(None, False), overwrite=False))]
    result = CliRunner().invoke(app, ["command", "--help"], terminal_width=200)
    flags = [f for f in ("--name", "--device", "--workers", "--seed", "--images-root", "--allow-outside-root",
                         "--overwrite") if f in result.output]
    assert sorted(flags, key=result.output.index) == flags and len(flags) == 7  # in the signature's order


def test_threads_option_sets_torch_threads(run_main, tmp_path) -> None:
    import torch

    before = torch.get_num_threads()
    target = 3 if before != 3 else 2
    try:
        code, _out, err = run_main("--threads", str(target), "compress", "--model", str(tmp_path), "--data",
                                   str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--criterion", "bogus",
                                   "--target-macs", "0.5")
        assert code == 2 and "unknown criterion" in err
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


def test_progress_prints_one_plain_line_per_finished_task_off_a_terminal(capsys) -> None:
    from fairdeploy.cli.progress_display import RichProgress

    with RichProgress() as progress:
        for i in range(1, 4):
            progress("train epoch 1/2", i, 3)
        progress("train epoch 2/2", 1, 3)  # unfinished: no line
        progress("train epoch 1/2 done: val f1_macro 0.5", 1, 1)  # a one-shot task: no 1/1 count
    cap = capsys.readouterr()
    assert cap.err == ""  # stderr stays for errors
    lines = [ln for ln in cap.out.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].endswith("train epoch 1/2: 3/3") and " s] " in lines[0]
    assert lines[1].endswith("s] train epoch 1/2 done: val f1_macro 0.5")


# ---- --quiet / --verbose ----

SYNTH = ("data", "synth", "--n-images", "30", "--image-size", "16")


def test_quiet_prints_only_the_final_result_line_and_errors(run_main, tmp_path) -> None:
    code, out, err = run_main(*SYNTH, "--out", str(tmp_path / "a"))
    assert code == 0 and len(out.strip().splitlines()) > 1  # without --quiet: the counts, then the result
    code, out, err = run_main("--quiet", *SYNTH, "--out", str(tmp_path / "b"))
    assert code == 0 and err == ""
    assert out.splitlines() == [f"manifest: {tmp_path / 'b' / 'manifest.csv'}"]
    code, out, err = run_main("-q", *SYNTH, "--out", str(tmp_path / "b" / "manifest.csv"))  # a file: refused
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_verbose_prints_debug_lines_and_the_traceback_of_an_error(run_main, tmp_path) -> None:
    code, _out, err = run_main("--verbose", *SYNTH, "--out", str(tmp_path / "a"))
    assert code == 0 and err.startswith("debug: fairdeploy ") and "threads torch default" in err
    assert err.strip().splitlines()[-1].startswith("debug: exit 0 after ")
    (tmp_path / "b").write_text("x")
    code, _out, err = run_main("-v", *SYNTH, "--out", str(tmp_path / "b"))
    assert code == 2 and "Traceback (most recent call last)" in err and "FairdeployError" in err
    assert err.strip().splitlines()[-1].startswith("error: --out ")
    code, _out, err = run_main("-q", "-v", *SYNTH, "--out", str(tmp_path / "c"))
    assert code == 2 and "--quiet and --verbose exclude each other" in err


def test_warnings_are_one_line_and_silenced_by_quiet(run_main, tmp_path) -> None:
    classes = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
    images = [f"ISIC_{i:07d}" for i in range(12)]
    (tmp_path / "meta.csv").write_text("image,age_approx,lesion_id,sex\n" + "".join(
        f"{im},50,,{'female' if i % 2 else 'male'}\n" for i, im in enumerate(images)))
    (tmp_path / "gt.csv").write_text("image," + ",".join(classes) + "\n" + "".join(
        f"{im}," + ",".join("1.0" if c == ("NV" if i % 2 else "MEL") else "0.0" for c in classes) + "\n"
        for i, im in enumerate(images[:10])))
    args = ("data", "prepare", "--format", "isic2019", "--metadata", str(tmp_path / "meta.csv"), "--ground-truth",
            str(tmp_path / "gt.csv"), "--train", "0.5", "--val", "0.25", "--test", "0.25")
    code, out, err = run_main(*args, "--out", str(tmp_path / "m1.csv"))
    assert code == 0, err
    expected = (f"warning: {tmp_path / 'gt.csv'}: the ground truth covers 10 of the 12 rows of "
                f"{tmp_path / 'meta.csv'}; 2 metadata rows have no ground-truth row and are left out "
                "(e.g. 'ISIC_0000010')")
    assert err.splitlines() == [expected]
    assert "not in the ground truth: 2 of 12 metadata rows (left out)" in out
    code, out, err = run_main("--quiet", *args, "--out", str(tmp_path / "m2.csv"))
    assert code == 0 and err == "" and len(out.splitlines()) == 1


# ---- help text is not cut at 80 columns off a terminal ----

def test_help_is_not_cut_when_stdout_is_not_a_terminal() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "fairdeploy", "prune", "--help"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 0
    # every option the command registers is listed in full (a cut table drops or ellipsises the long ones)
    import re

    import typer

    from fairdeploy.cli.app import app

    command = typer.main.get_command(app).commands["prune"]
    options = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", proc.stdout)]
    assert len(options) >= 15 and missing == []
    assert "…" not in proc.stdout


# ---- every option checked before any data or model is loaded ----

@pytest.mark.parametrize(("args", "message"), [
    (("train", "--arch", "resnet19"), "unknown architecture 'resnet19'; choose one of resnet18"),
    (("train", "--optimizer", "adam"), "unknown optimizer 'adam'"),
    (("train", "--balance", "groups"), "unknown balance 'groups'"),
    (("train", "--image-size", "8"), "--image-size must be at least 16"),
    (("prune", "--model", "m", "--ratio", "1.5"), "ratio"),
    (("compress", "--model", "m", "--criterion", "magnitude", "--target-macs", "1.5"), "--target-macs must keep a fraction in (0, 1) of the model, got 1.5"),
    (("finetune", "--model", "m", "--optimizer", "adam"), "unknown optimizer 'adam'"),
    (("evaluate", "--model", "m", "--split", "tset"), "unknown --split 'tset'; choose one of train, val, test"),
    (("validate", "--reference", "m", "--candidate", "m", "--split", "tset"), "unknown --split 'tset'"),
    (("validate", "--reference", "m", "--candidate", "m", "--max-eodd-drift", "-1"), "eodd"),
])
def test_bad_options_are_refused_before_loading_anything(run_main, monkeypatch, tmp_path, args, message) -> None:
    import importlib
    import time

    import fairdeploy.cli.option_blocks as option_blocks_cli

    loaded: list[str] = []

    def recording(path, *a, **k):
        loaded.append(str(path))
        raise AssertionError("the manifest was read before the options were checked")

    import fairdeploy.cli.validate as validate_cli

    for module in ("fairdeploy.models.registry", "fairdeploy.pruning", "fairdeploy.training.loop",
                   "fairdeploy.validation"):
        importlib.import_module(module)  # imported first: torch and torchvision are not what is timed

    monkeypatch.setattr(option_blocks_cli, "read_manifest", recording)  # train, evaluate, prune, finetune (Images.read)
    monkeypatch.setattr(validate_cli, "read_manifest", recording)
    t0 = time.perf_counter()
    code, out, err = run_main(*args, "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"))
    elapsed = time.perf_counter() - t0
    assert code == 2 and message in err and loaded == [] and out == ""
    assert elapsed < 1.0, elapsed  # the libraries are imported above; no data read, no model built
    assert not (tmp_path / "o").exists()


def test_int8_calibration_budget_is_checked_before_the_model_is_loaded(run_main, monkeypatch, tmp_path) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.data.synth import SynthConfig, generate_synthetic
    from fairdeploy.export import exporter
    from fairdeploy.models.checkpoint import ModelSpec, save_checkpoint
    from fairdeploy.models.registry import create_model

    manifest = generate_synthetic(tmp_path / "d", SynthConfig(n_images=120, image_size=16, seed=1))
    m = read_manifest(manifest)
    spec = ModelSpec("resnet18", tuple(m.classes), tuple(m.groups), image_size=16)
    save_checkpoint(create_model("resnet18", spec.num_classes), spec, tmp_path / "ckpt")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the calibration budget was checked")

    monkeypatch.setattr(exporter, "load_checkpoint", no_load)
    code, _out, err = run_main("export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e"),
                               "--precision", "int8", "--data", str(manifest), "--calib-size", "5000",
                               "--calib-split", "train")
    assert code == 2 and "too few train images" in err and "--calib-size" in err
    assert not (tmp_path / "e").exists()


# ---- one epoch numbering; optimizer state only while the run can resume; file modes ----

TRAIN = ("train", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--device", "cpu")


def test_epochs_are_numbered_from_1_everywhere_and_optimizer_state_goes_at_the_end(run_main, tmp_path) -> None:
    import json
    import re

    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    manifest = generate_synthetic(tmp_path / "d", SynthConfig(n_images=30, image_size=16, seed=1))
    code, out, err = run_main(*TRAIN, "--epochs", "3", "--data", str(manifest), "--out", str(tmp_path / "r"))
    assert code == 0, err
    printed = int(re.search(r"best epoch (\d+):", out).group(1))
    state = json.loads((tmp_path / "r" / "trainer.json").read_text())
    spec = json.loads((tmp_path / "r" / "best" / "model.json").read_text())
    scores = [h["score"] for h in state["history"]]
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3] and state["epoch"] == 3
    assert printed == state["best_epoch"] == spec["history"][-1]["best_epoch"] == scores.index(max(scores)) + 1
    # off a terminal, one plain line per epoch with the time and the key metrics, the numbers of trainer.json
    done = re.findall(r"train epoch (\d)/3 done: train loss ([\d.]+), val f1_macro ([\d.]+), "
                      r"worst-group accuracy ([\d.]+)", out)
    assert [int(d[0]) for d in done] == [1, 2, 3]
    for (_, loss, score, worst), h in zip(done, state["history"], strict=True):
        assert float(loss) == round(h["train_loss"], 4) and float(score) == round(h["score"], 4)
        assert float(worst) == round(min(h["val_group_accuracy"].values()), 4)
    assert not (tmp_path / "r" / "last" / "optimizer.safetensors").exists()  # finished: nothing resumes it
    code, _out, err = run_main(*TRAIN, "--epochs", "1", "--data", str(manifest), "--out", str(tmp_path / "k"),
                               "--keep-optimizer-state")
    assert code == 0, err
    assert (tmp_path / "k" / "last" / "optimizer.safetensors").is_file()
    code, _out, err = run_main(*TRAIN, "--epochs", "1", "--data", str(manifest), "--out", str(tmp_path / "k"),
                               "--resume")
    assert code == 2 and "already finished its 1 epochs" in err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_has_the_ordinary_mode(tmp_path, umask) -> None:
    import os

    from fairdeploy.files.json_files import write_json
    from fairdeploy.models.checkpoint import ModelSpec, save_checkpoint
    from fairdeploy.models.registry import create_model

    before = os.umask(umask)
    try:
        save_checkpoint(create_model("resnet18", 2), ModelSpec("resnet18", ("a", "b")), tmp_path / "ck")
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(before)
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "ck" / "model.safetensors") == 0o666 & ~umask  # safetensors itself writes 0600
    assert mode(tmp_path / "ck" / "model.json") == 0o666 & ~umask
    assert mode(tmp_path / "x.json") == 0o666 & ~umask
    assert mode(tmp_path / "ck") == 0o777 & ~umask


# ---- Ctrl-C: what was kept and the exact command that continues (a real process and a real SIGINT) ----

def test_ctrl_c_during_training_says_what_was_kept_and_how_to_resume(tmp_path) -> None:
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    manifest = generate_synthetic(tmp_path / "d", SynthConfig(n_images=30, image_size=16, seed=1))
    out = tmp_path / "run"
    args = [*TRAIN, "--epochs", "500", "--data", str(manifest), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as in a terminal: a suite started in the background of a non-interactive shell (`pytest &`) inherits
    # SIGINT ignored, and a Python started with it ignored never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "fairdeploy", "--threads", "1", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "trainer.json").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "trainer.json").is_file(), proc.stderr.read() if proc.poll() is not None else "no epoch"
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: interrupted; kept ") and " of 500 epochs: " in lines[0]
    assert str(out / "last") in lines[0] and str(out / "best") in lines[0]
    assert lines[1] == "to continue: " + shlex.join(["fairdeploy", "--threads", "1", *args, "--resume"])
    assert (out / "last" / "optimizer.safetensors").is_file()  # kept: the run can resume


def test_an_interrupted_pipeline_names_the_stages_it_keeps(tmp_path) -> None:
    from fairdeploy.cli.pipeline import _kept_stages

    run = tmp_path / "run"
    assert _kept_stages(run) == f"no stage had finished; nothing was kept in {run}"
    for name, done in (("data", True), ("train", True), ("prune-x", False)):
        (run / name).mkdir(parents=True)
        if done:
            (run / name / "stage.json").write_text("{}")
    assert _kept_stages(run) == (f"kept the finished stages data, train in {run}; running the same command again "
                                 "skips them and continues")


def test_pipeline_threads_set_torch_threads_unless_the_global_option_is_given(run_main, monkeypatch, tmp_path):
    import torch

    import fairdeploy.training.train as train_mod
    from fairdeploy.errors import FairdeployError

    def stop(*_a, **_k):
        raise FairdeployError(f"stopped with {torch.get_num_threads()} threads")

    monkeypatch.setattr(train_mod, "train_model", stop)
    config = tmp_path / "p.toml"
    config.write_text('threads = 1\n[data]\nsynth = { n_images = 30, image_size = 16 }\n[model]\narch = "resnet18"\n'
                      'image_size = 16\n')
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _out, err = run_main("pipeline", str(config), "--out", str(tmp_path / "a"))
        assert code == 2 and "stopped with 1 threads" in err
        code, _out, err = run_main("--threads", "2", "pipeline", str(config), "--out", str(tmp_path / "b"))
        assert code == 2 and "stopped with 2 threads" in err
    finally:
        torch.set_num_threads(before)
