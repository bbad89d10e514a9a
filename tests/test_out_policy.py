"""The output policy (fairdeploy.files.outputs.claim_output / fairdeploy.files.atomic.atomic_dir): a command writes only what it owns.

Foreign --out refused (files byte-identical), --overwrite replaces, a command's own earlier output is replaced,
an output equal to an input is refused, a second writer of the same --out fails at once (a real process
holds the lock), stale temporaries of killed runs are removed. No test here trains a model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_dir
from fairdeploy.files.lock import lock_path, output_lock
from fairdeploy.files.outputs import OutputPolicy, claim_output
from fairdeploy.files.temporaries import remove_stale_temporaries

SYNTH = ["data", "synth", "--n-images", "30", "--image-size", "16"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _foreign(folder: Path) -> dict[str, str]:
    """A folder the user keeps: a 'model', notes, a hidden file."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "model" / "model.json").write_text('{"arch": "resnet18"}\n')
    (folder / "notes.txt").write_text("keep me\n")
    (folder / ".hidden").write_text("x\n")
    return _tree(folder)


@pytest.fixture()
def tiny_manifest(tmp_path: Path) -> Path:
    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    return generate_synthetic(tmp_path / "tinydata", SynthConfig(n_images=30, image_size=16, seed=1))


# ---- 1. foreign --out refused, files kept byte-identical; --overwrite; own output replaced ----


@pytest.mark.parametrize("command", ["synth", "prune", "finetune", "train", "export", "validate", "pipeline"])
def test_foreign_out_refused_and_kept(command: str, run_main, tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    before = _foreign(out)
    m, d = str(tiny_manifest.parent), str(tiny_manifest)
    args = {
        "synth": [*SYNTH, "--out", str(out)],
        "prune": ["prune", "--model", m, "--data", d, "--out", str(out)],
        "finetune": ["finetune", "--model", m, "--data", d, "--out", str(out)],
        "train": ["train", "--data", d, "--out", str(out), "--epochs", "1"],
        "export": ["export", "--model", m, "--out", str(out)],
        "validate": ["validate", "--reference", m, "--candidate", m, "--data", d, "--out", str(out)],
        "pipeline": ["pipeline", str(Path(__file__).parents[1] / "fairdeploy" / "pipeline" / "demo.toml"),
                     "--out", str(out)],
    }[command]
    code, _, err = run_main(*args)
    assert code == 2, err
    assert "is not a previous" in err and "--overwrite" in err and "notes.txt" in err
    assert len(err.strip().splitlines()) == 1
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "tinydata"]  # no lock, no temporaries left


def test_synth_overwrite_replaces_foreign_folder(run_main, tmp_path: Path) -> None:
    out = tmp_path / "data"
    _foreign(out)
    code, _, err = run_main(*SYNTH, "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.csv", "synth.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old folder is gone, nothing hidden left


def test_synth_replaces_its_own_output_but_not_added_files(run_main, tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert run_main(*SYNTH, "--out", str(out), "--seed", "1")[0] == 0
    first = (out / "manifest.csv").read_bytes()
    code, _, err = run_main(*SYNTH, "--out", str(out), "--seed", "2")  # own output: replaced, no --overwrite
    assert code == 0, err
    assert (out / "manifest.csv").read_bytes() != first
    (out / "my-notes.txt").write_text("mine\n")
    before = _tree(out)
    code, _, err = run_main(*SYNTH, "--out", str(out), "--seed", "3")
    assert code == 2 and "my-notes.txt" in err and "--overwrite" in err
    assert _tree(out) == before


def test_train_refuses_earlier_run_without_resume(run_main, tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "model.json").write_text(json.dumps({"history": [{"stage": "train"}]}))
    (out / "trainer.json").write_text('{"epoch": 0}\n')
    before = _tree(out)
    code, _, err = run_main("train", "--data", str(tiny_manifest), "--out", str(out), "--epochs", "1")
    assert code == 2
    assert "earlier `fairdeploy train` run" in err and "--resume" in err and "--overwrite" in err
    assert _tree(out) == before
    # finetune does not take a train run for its own output either
    code, _, err = run_main("finetune", "--model", str(tiny_manifest.parent), "--data", str(tiny_manifest),
                            "--out", str(out))
    assert code == 2 and "not a previous `fairdeploy finetune` output" in err
    assert _tree(out) == before


@pytest.mark.parametrize("kind", ["prepare", "inspect", "evaluate"])
def test_file_out_foreign_refused_own_replaced(kind: str, run_main, tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("my,own,table\n1,2,3\n")
    before = out.read_bytes()
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "dx", "sex"])
        w.writerows([f"img{i}.jpg", "ab"[i % 2], "mf"[(i // 2) % 2]] for i in range(40))
    args = {
        "prepare": ["data", "prepare", "--format", "csv", "--metadata", str(meta), "--image-column", "file",
                    "--label-column", "dx", "--group-column", "sex"],
        "inspect": ["data", "inspect", "--data", str(tiny_manifest), "--no-check-images"],
        "evaluate": ["evaluate", "--model", str(tmp_path / "nomodel"), "--data", str(tiny_manifest)],
    }[kind]
    code, _, err = run_main(*args, "--out", str(out))
    assert code == 2 and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == before
    if kind == "evaluate":  # needs a model: the rest is covered by prepare / inspect
        code, _, err = run_main(*args, "--out", str(tmp_path))
        assert code == 2 and "is a folder" in err
        return
    code, _, err = run_main(*args, "--out", str(out), "--overwrite")
    assert code == 0, err
    written = out.read_bytes()
    assert written != before
    code, _, err = run_main(*args, "--out", str(out))  # its own earlier output: replaced without --overwrite
    assert code == 0, err


# ---- 2. an output equal to an input ----


def test_out_equal_to_input_refused(run_main, tiny_manifest: Path, tmp_path: Path) -> None:
    before = tiny_manifest.read_bytes()
    # inspect --data m.csv --out m.csv, also through a path that resolves to the same file
    for out in (tiny_manifest, tiny_manifest.parent / ".." / tiny_manifest.parent.name / tiny_manifest.name):
        code, _, err = run_main("data", "inspect", "--data", str(tiny_manifest), "--out", str(out), "--overwrite")
        assert code == 2 and "same path as the input --data" in err
    code, _, err = run_main("data", "prepare", "--format", "csv", "--metadata", str(tiny_manifest),
                            "--out", str(tiny_manifest), "--overwrite")
    assert code == 2 and "same path as the input --metadata" in err
    assert tiny_manifest.read_bytes() == before
    # prune / finetune: an --out that is, or holds, the input model
    ckpt = tiny_manifest.parent
    for cmd in ("prune", "finetune"):
        code, _, err = run_main(cmd, "--model", str(ckpt / "images"), "--data", str(tiny_manifest),
                                "--out", str(ckpt), "--overwrite")
        assert code == 2 and "contains the input --model" in err
    code, _, err = run_main("export", "--model", str(ckpt), "--out", str(ckpt), "--overwrite")
    assert code == 2 and "same path as the input --model" in err
    assert tiny_manifest.read_bytes() == before


# ---- 3. the lock: a second writer fails at once (a real process holds it) ----


HOLD_LOCK = """
import sys, time
from fairdeploy.files.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_writer_fails_while_a_process_holds_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "fairdeploy", *SYNTH, "--out", str(out)],
                                capture_output=True, text=True, env=env, timeout=60, check=False)
        assert second.returncode == 2, second.stderr
        assert "being written by another fairdeploy command" in second.stderr
        assert f"process {holder.pid}" in second.stderr and "choose another --out" in second.stderr
        assert time.monotonic() - t0 < 30  # fails at once, does not wait for the holder
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: the next run goes through (and leaves no lock file)
    third = subprocess.run([sys.executable, "-m", "fairdeploy", *SYNTH, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=120, check=False)
    assert third.returncode == 0, third.stderr
    assert not lock_path(out).exists()


def test_lock_in_process_and_released(tmp_path: Path) -> None:
    out = tmp_path / "x"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with pytest.raises(FairdeployError, match="being written by another fairdeploy command"), output_lock(out):
            pass
    assert not lock_path(out).exists()
    with output_lock(out):  # free again
        pass


# ---- 4. stale temporaries of killed runs ----


def test_next_run_removes_its_own_stale_temporaries(run_main, tmp_path: Path) -> None:
    out = tmp_path / "data"
    (tmp_path / ".data.ab12cd34.tmp" / "images").mkdir(parents=True)      # a killed atomic_dir
    (tmp_path / ".data.ab12cd34.tmp" / "images" / "0.png").write_bytes(b"x" * 1000)
    (tmp_path / ".data.scratch.zz99yy88").mkdir()                           # a killed prune's scratch
    (tmp_path / ".data.old").write_text("a file, not a folder\n")           # a stale .old that is a file
    (tmp_path / ".other.ab12cd34.tmp").write_text("another output's\n")     # not ours: kept
    (tmp_path / "data.ab12cd34.tmp").write_text("not hidden: the user's\n")  # kept
    code, _, err = run_main(*SYNTH, "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ab12cd34.tmp", "data", "data.ab12cd34.tmp"]


def test_stale_temporaries_inside_an_owned_output(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    (out / "export.json").write_text("{}\n")
    (out / ".export.k3j4h5g6.tmp").mkdir()                    # a killed export's stage
    (out / ".export.k3j4h5g6.tmp" / "model.fp32.onnx").write_bytes(b"0" * 100)
    (out / ".model.fp16.engine.a1b2c3d4.tmp").write_bytes(b"1")  # a killed engine write
    (out / "last").mkdir()
    (out / "last" / ".optimizer.safetensors.q1w2e3r4.tmp").write_bytes(b"2")
    (out / ".keep.tmp").write_text("no random part: the user's\n")
    with claim_output(out, OutputPolicy("export", record="export.json")):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".keep.tmp", "export.json", "last"]
    assert list((out / "last").iterdir()) == []
    # a folder the command does not own is never cleaned inside
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ".a.k3j4h5g6.tmp").write_text("x")
    remove_stale_temporaries(foreign, inside=False)
    assert (foreign / ".a.k3j4h5g6.tmp").exists()


# ---- atomic_dir itself ----


def test_atomic_dir_replaces_only_what_it_owns(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    before = _foreign(out)
    with pytest.raises(FairdeployError, match="--overwrite"), atomic_dir(out, owner="prune.json") as tmp:
        (tmp / "prune.json").write_text("{}")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_dir(out, owner="prune.json", overwrite=True) as tmp:
        (tmp / "prune.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["prune.json"]
    with atomic_dir(out, owner="prune.json") as tmp:  # owned now
        (tmp / "prune.json").write_text('{"second": 1}')
    assert (out / "prune.json").read_text() == '{"second": 1}'


def test_atomic_dir_that_fails_keeps_the_old_output_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "prune.json").write_text('{"first": 1}')
    (out / "model.safetensors").write_bytes(b"old weights")
    before = _tree(out)
    seen = []
    with pytest.raises(RuntimeError, match="killed"), atomic_dir(out, owner="prune.json") as tmp:
        seen.append(tmp)
        (tmp / "prune.json").write_text('{"second": 1}')
        (tmp / "part").mkdir()
        (tmp / "part" / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert _tree(out) == before  # the earlier output, untouched
    assert seen[0].parent == tmp_path and not seen[0].exists()  # its temporary folder was beside it, now gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # a new output that fails: nothing is left at all
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # and one that succeeds replaces every entry: nothing of the old folder is merged in
    with atomic_dir(out, owner="prune.json") as tmp:
        (tmp / "prune.json").write_text('{"third": 1}')
    assert _tree(out) == {"prune.json": hashlib.sha256(b'{"third": 1}').hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .ckpt.old left behind


def test_atomic_dir_with_a_stale_old_file(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "prune.json").write_text("{}")
    (tmp_path / ".ckpt.old").write_text("left by a killed run, a file\n")
    with atomic_dir(out, owner="prune.json") as tmp:
        (tmp / "prune.json").write_text("[]")
    assert (out / "prune.json").read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_report_writes_only_over_an_earlier_report(run_main, tmp_path: Path) -> None:
    from fairdeploy.report.render import GENERATOR, report_owns

    run = tmp_path / "run"
    run.mkdir()
    (run / "validation.json").write_text("{}\n")
    assert report_owns(run)  # a run folder without report files: the report adds its own
    (run / "report.md").write_text("# my own notes\n")
    assert not report_owns(run)
    before = _tree(run)
    code, _, err = run_main("report", str(run))
    assert code == 2 and "report.md" in err and "--overwrite" in err
    assert _tree(run) == before
    (run / "report.html").write_text(f"<!doctype html><html><head>{GENERATOR}</head></html>\n")
    (run / "report_files").mkdir()
    (run / "report_files" / "a.png").write_bytes(b"png")
    assert report_owns(run)
