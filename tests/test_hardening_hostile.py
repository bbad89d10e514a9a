"""Issue 20 §5: the hostile inputs that still ended in exit 4, a hang, a replaced file or a silent wrong result.
Each is now exit 2 with one line naming the thing (or, an interrupt, what was kept and the command to continue),
with nothing replaced or left behind. Signals and FIFOs are tried on real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fairdeploy.errors import EXIT_TERMINATED, FairdeployError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# Only a hang may trip this (a command here takes seconds); a FIFO opened for writing would block forever.
HANG_S = 600
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _copy_data(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def _rows(manifest: Path) -> list[list[str]]:
    return [line.split(",") for line in manifest.read_text().splitlines()[1:]]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _fairdeploy(*args: str, env: dict[str, str] | None = None, timeout: float = HANG_S
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fairdeploy", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _test_image(manifest: Path) -> Path:
    """The first test-split image of the manifest (evaluate reads the test split)."""
    row = next(r for r in _rows(manifest) if r[3] == "test")
    return manifest.parent / row[0]


# ---- a symlink loop in the manifest's image paths ----

def test_a_symlink_loop_in_the_manifest_is_one_line_naming_the_row(tiny, tmp_path: Path, run_main) -> None:
    manifest, ckpt = tiny
    data = _copy_data(manifest, tmp_path / "data")
    victim = _test_image(data)
    victim.unlink()
    os.symlink(victim.name + ".loop", victim)  # image -> image.loop -> image
    os.symlink(victim.name, victim.with_name(victim.name + ".loop"))
    row = 2 + next(i for i, r in enumerate(_rows(data)) if data.parent / r[0] == victim)
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(data), "--bootstrap", "0")
    line = _one_error_line(err)
    assert code == 2 and f"row {row}: image '{victim.relative_to(data.parent)}' is a symlink loop" in line
    # read where links may leave the root: the loader names it too
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(data), "--bootstrap", "0",
                            "--allow-outside-root")
    assert code == 2 and _one_error_line(err).endswith(f"image {victim} is a symlink loop")


def test_an_out_that_is_a_symlink_loop_is_one_line(tiny, tmp_path: Path, run_main) -> None:
    manifest, _ = tiny
    out = tmp_path / "report.json"
    os.symlink(out.name, out)  # a link to itself
    code, _, err = run_main("data", "inspect", "--data", str(manifest), "--no-check-images", "--out", str(out))
    assert code == 2 and f"--out {out} is a symlink loop" in _one_error_line(err)
    assert out.is_symlink() and os.readlink(out) == out.name


# ---- torchrun's environment: a bad MASTER_PORT ----

@pytest.mark.parametrize(("var", "value", "message"), [
    ("MASTER_PORT", "abc", "MASTER_PORT='abc' is not an integer 1..65535"),
    ("MASTER_PORT", "70000", "MASTER_PORT='70000' is not an integer 1..65535"),
    ("RANK", "2", "RANK='2' is not an integer 0..1"),
    ("WORLD_SIZE", "two", "WORLD_SIZE='two' is not an integer >= 1"),
])
def test_bad_torchrun_environment_is_one_line_naming_the_variable(tiny, tmp_path: Path, run_main, monkeypatch,
                                                                  var: str, value: str, message: str) -> None:
    manifest, _ = tiny
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for k, v in {**env, var: value}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code, _, err = run_main("train", "--data", str(manifest), "--out", str(out), "--epochs", "1",
                            "--image-size", "16", "--device", "cpu")
    assert code == 2 and message in _one_error_line(err)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- 16-bit and tiny images ----

def _png16(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)  # PIL writes a 16-bit greyscale PNG (mode I;16)


def test_a_16_bit_png_is_scaled_to_8_bits_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    from fairdeploy.data import images
    from fairdeploy.data.loading import open_rgb

    monkeypatch.setattr(images, "_warned_sixteen_bit", False)
    values = np.array([[0, 128, 257, 32767, 32768, 40000, 65534, 65535]] * 8)
    _png16(tmp_path / "a.png", values)
    _png16(tmp_path / "b.png", values[::-1])
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))[0, :, 0].tolist()
    assert clipped == [0, 128, 255, 255, 255, 255, 255, 255]  # the control: PIL's convert clips (almost white)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = open_rgb(tmp_path / "a.png"), open_rgb(tmp_path / "b.png")
    # value x 255 / 65535, rounded half up: 128 -> 0.498 -> 0; 257 -> 1; 32767 -> 127.498 -> 127; 32768 -> 127.5
    # -> 128; 40000 -> 155.65 -> 156; 65534 -> 254.996 -> 255
    expected = [0, 0, 1, 127, 128, 156, 255, 255]
    assert a.mode == "RGB" and np.asarray(a)[0, :, :].tolist() == [[v] * 3 for v in expected]
    assert np.asarray(b)[0, :, 0].tolist() == expected
    assert [w.category.__name__ for w in caught] == ["SixteenBitImageWarning"]  # one warning, not one per image
    assert str(tmp_path / "a.png") in str(caught[0].message) and "scaled to 8 bits" in str(caught[0].message)


def test_images_beyond_16_bits_or_of_floats_are_refused(tmp_path: Path) -> None:
    from fairdeploy.data.images import ImageRefused
    from fairdeploy.data.loading import open_rgb

    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageRefused, match=r"values 70000\.\.70000, beyond 16 bits"):
        open_rgb(tmp_path / "i32.tif")
    with pytest.raises(ImageRefused, match="floating-point image"):
        open_rgb(tmp_path / "f.tif")


def test_cli_warns_once_for_16_bit_images_and_refuses_a_1x1_image(tiny, tmp_path: Path, run_main,
                                                                   monkeypatch) -> None:
    from fairdeploy.data import images

    manifest, ckpt = tiny
    data = _copy_data(manifest, tmp_path / "data")
    tests = [data.parent / r[0] for r in _rows(data) if r[3] == "test"]
    for p in tests[:2]:
        _png16(p, np.full((16, 16), 30000))
    monkeypatch.setattr(images, "_warned_sixteen_bit", False)
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(data), "--bootstrap", "0")
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "16-bit greyscale image" in warned[0], err
    Image.new("RGB", (1, 1), "red").save(tests[2])
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(data), "--bootstrap", "0")
    assert code == 2
    assert _one_error_line(err) == (f"error: image {tests[2]} is refused: 1x1 pixels, smaller than the minimum of "
                                    "8x8 (a placeholder or a failed download?); remove the row or replace the file")
    code, out, _ = run_main("data", "inspect", "--data", str(data))
    assert code == 2 and "refused: 1x1 pixels" in " ".join(out.split())


# ---- data prepare --out: only a manifest with its own record is its own ----

def _metadata(path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "dx", "sex"])
        w.writerows([f"img{i}.jpg", "ab"[i % 2], "mf"[(i // 2) % 2]] for i in range(40))
    return path


def test_prepare_replaces_only_a_manifest_it_recorded(tmp_path: Path, run_main) -> None:
    from fairdeploy.files.hashing import sha256_file

    meta = _metadata(tmp_path / "meta.csv")
    prepare = ["data", "prepare", "--format", "csv", "--metadata", str(meta), "--image-column", "file",
               "--label-column", "dx", "--group-column", "sex"]
    code, _, err = run_main("data", "synth", "--n-images", "30", "--image-size", "16", "--out", str(tmp_path / "s"))
    assert code == 0, err
    synth_manifest = tmp_path / "s" / "manifest.csv"
    before = synth_manifest.read_bytes()
    code, _, err = run_main(*prepare, "--out", str(synth_manifest))  # another command's manifest: refused
    line = _one_error_line(err)
    assert code == 2 and "is not a manifest written by `fairdeploy data prepare`" in line
    assert "manifest.csv.prepare.json" not in os.listdir(tmp_path / "s")
    assert "MANIFEST.prepare.json record" in line and synth_manifest.read_bytes() == before

    out = tmp_path / "m.csv"
    code, _, err = run_main(*prepare, "--out", str(out))
    assert code == 0, err
    record = json.loads((tmp_path / "m.csv.prepare.json").read_text())
    assert record["command"] == "data prepare" and record["manifest_sha256"] == sha256_file(out)
    assert record["seed"] == 0 and record["fractions"] == [0.7, 0.15, 0.15]
    code, _, err = run_main(*prepare, "--seed", "5", "--out", str(out))  # its own: replaced
    assert code == 0, err
    assert json.loads((tmp_path / "m.csv.prepare.json").read_text())["manifest_sha256"] == sha256_file(out)
    with open(out, "a") as f:  # edited by hand since: no longer the one it recorded
        f.write("extra.jpg,a,m,train\n")
    edited = out.read_bytes()
    code, _, err = run_main(*prepare, "--out", str(out))
    assert code == 2 and "--overwrite" in _one_error_line(err) and out.read_bytes() == edited
    code, _, err = run_main(*prepare, "--out", str(out), "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "m.csv.prepare.json").read_text())["manifest_sha256"] == sha256_file(out)


def test_prepare_refuses_a_foreign_file_where_its_record_goes(tmp_path: Path, run_main) -> None:
    meta = _metadata(tmp_path / "meta.csv")
    (tmp_path / "m.csv.prepare.json").write_text("my notes\n")
    code, _, err = run_main("data", "prepare", "--format", "csv", "--metadata", str(meta), "--image-column", "file",
                            "--label-column", "dx", "--group-column", "sex", "--out", str(tmp_path / "m.csv"))
    assert code == 2 and "is not such a record" in _one_error_line(err)
    assert not (tmp_path / "m.csv").exists() and (tmp_path / "m.csv.prepare.json").read_text() == "my notes\n"


# ---- --out a device or a FIFO: refused, never opened, with --overwrite too ----

def test_out_a_fifo_is_refused_without_opening_it(tiny, tmp_path: Path) -> None:
    manifest, _ = tiny
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # a command that writes a file, and one that writes a folder with --overwrite (each is a process: ~2.5 s)
    for args, extra in ((("data", "inspect", "--data", str(manifest), "--no-check-images"), ()),
                        (("data", "synth", "--n-images", "30", "--image-size", "16"), ("--overwrite",))):
        proc = _fairdeploy(*args, "--out", str(fifo), *extra)  # a hang here fails at the timeout
        line = _one_error_line(proc.stderr)
        assert proc.returncode == 2 and f"--out {fifo} is a named pipe (FIFO), not a regular file or folder" in line
        assert "--overwrite" not in line and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no lock, no temporary left


def test_out_a_character_device_is_refused(tiny, tmp_path: Path) -> None:
    from fairdeploy.cli.outputs import OUT_POLICIES
    from fairdeploy.files.entries import special_file
    from fairdeploy.files.outputs import claim_output

    manifest, _ = tiny
    assert special_file(Path("/dev/null")) == "a character device"
    proc = _fairdeploy("data", "inspect", "--data", str(manifest), "--no-check-images", "--out", "/dev/null")
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and "--out /dev/null is a character device" in line and "--overwrite" not in line
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # --overwrite too; claim_output itself writes nothing, so the refusal is tried here without risking the node
    link = tmp_path / "null"
    os.symlink("/dev/null", link)
    for out in (Path("/dev/null"), link):
        with pytest.raises(FairdeployError, match=r"is a character device"), \
                claim_output(out, OUT_POLICIES["evaluate"], overwrite=True):
            pass
    assert os.readlink(link) == "/dev/null"


# ---- SIGTERM: handled as Ctrl-C (what was kept, the command that continues), exit 143 ----

def test_sigterm_keeps_finished_epochs_and_says_how_to_continue(tiny, tmp_path: Path) -> None:
    manifest, _ = tiny
    out = tmp_path / "run"
    args = ["train", "--data", str(manifest), "--out", str(out), "--epochs", "200", "--image-size", "16",
            "--batch-size", "8", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "fairdeploy", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_S
        while not (out / "trainer.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED == 143, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: terminated (SIGTERM); kept ") and " of 200 epochs: " in lines[0], err
    assert lines[1] == f"to continue: fairdeploy {' '.join(args)} --resume"
    assert len(lines) == 2 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "trainer.json"]
    assert not list(tmp_path.rglob(".*"))  # no temporary, no lock file


# ---- a torchrun peer that dies: exit 2, what was kept and the command that continues ----

RANK_1_DIES = """
import os, sys
import fairdeploy.training.loop as loop
calls = []
def dying(t, _real=loop.all_reduce_sum):
    calls.append(1)
    if len(calls) == 2:  # rank 1 leaves in its second epoch, after the first epoch's checkpoint
        os._exit(9)
    return _real(t)
if os.environ["RANK"] == "1":
    loop.all_reduce_sum = dying
sys.argv = ["fairdeploy", *sys.argv[1:]]
from fairdeploy.cli import main
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_peer_ends_with_exit_2_what_was_kept_and_the_resume_command(tiny, tmp_path: Path) -> None:
    """Two CPU processes with torchrun's environment (no launcher: rank 0 must notice the dead peer itself)."""
    pytest.importorskip("torch.distributed")
    manifest, _ = tiny
    out = tmp_path / "run"
    args = ["train", "--data", str(manifest), "--out", str(out), "--epochs", "3", "--image-size", "16",
            "--batch-size", "8", "--device", "cpu"]
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "FAIRDEPLOY_DIST_TIMEOUT": "300"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_1_DIES, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err0 = procs[0].communicate(timeout=HANG_S)
        procs[1].communicate(timeout=HANG_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 9  # the peer died
    assert procs[0].returncode == 2, err0
    lines = err0.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in err0, err0
    assert lines[0].startswith("error: rank 0 of 2: another process of this torchrun job died")
    assert lines[1] == f"kept 1 of 3 epochs: {out / 'last'} and the best so far, epoch 1, in {out / 'best'}"
    assert lines[2] == f"to continue: torchrun --nproc-per-node=2 -m fairdeploy {' '.join(args)} --resume"
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "trainer.json"]


# ---- a killed export's leftovers are cleaned by the rerun ----

SLOW_EXPORT = """
import sys, time
import fairdeploy.export.exporter as exporter
real = exporter.convert_fp16
def slow(*a, **k):
    real(*a, **k)
    print("staged", flush=True)
    time.sleep(600)  # killed here: the staging folder holds the FP32 and FP16 graphs
exporter.convert_fp16 = slow
sys.argv = ["fairdeploy", *sys.argv[1:]]
from fairdeploy.cli import main
main()
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_sigkilled_export_is_cleaned_by_the_rerun(tiny, tmp_path: Path, overwrite: bool) -> None:
    _, ckpt = tiny
    out = tmp_path / "exp"
    args = ["export", "--model", str(ckpt), "--out", str(out), "--precision", "fp16"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) not in ("staged\n", ""):  # its progress lines come first
            pass
        assert line == "staged\n", proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    (left,) = out.iterdir()  # what the killed run left: its hidden staging folder, with both graphs
    assert left.name.startswith(".export.") and left.name.endswith(".tmp")
    assert sorted(p.name for p in left.iterdir()) == ["model.fp16.onnx", "model.fp32.onnx"]
    rerun = _fairdeploy(*args, *(("--overwrite",) if overwrite else ()))
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.fp16.onnx", "model.fp32.onnx"]
    assert not list(tmp_path.glob(".*"))  # no lock file beside it either


def test_a_foreign_folder_with_a_temporary_stays_refused(tmp_path: Path) -> None:
    """Only a folder of nothing but fairdeploy's temporaries counts as a killed run's leftovers."""
    from fairdeploy.cli.outputs import OUT_POLICIES
    from fairdeploy.files.outputs import claim_output

    out = tmp_path / "exp"
    (out / ".export.abcd1234.tmp").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(FairdeployError, match="not a previous `fairdeploy export` output"), \
            claim_output(out, OUT_POLICIES["export"]):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".export.abcd1234.tmp", "notes.txt"]


# ---- degenerate models are never called fairer ----

def test_a_one_class_control_is_never_called_fairer(tmp_path: Path) -> None:
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.report import StageRecord, build_report, write_stages
    from fairdeploy.report.stages import RunStages
    from fairdeploy.report.summary import fairness_changes, fairness_table

    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    y = rng.integers(0, 3, 120)
    g = np.array(["dark", "light"] * 60)
    pred = np.where((g == "dark") & (rng.random(120) < 0.5), (y + 1) % 3, y)  # dark: half wrong, light: right
    ref = compute_metrics(y, pred, g, 3, classes, bootstrap=200, seed=0).to_dict()
    flat = compute_metrics(y, np.zeros(120, dtype=int), g, 3, classes, bootstrap=200, seed=0).to_dict()
    assert all(v == 0 for v in flat["fairness"].values())  # every gap 0 by construction
    # the control: the same gaps from a model that predicts two classes are read as fairer
    two = compute_metrics(y, np.where(y == 2, 1, 0), g, 3, classes, bootstrap=200, seed=0).to_dict()
    stages = (StageRecord("vanilla", "pytorch", ref), StageRecord("b-control", "pytorch", flat),
              StageRecord("two-class", "pytorch", two))
    run = RunStages(stages)
    control = {c.key: c.reading for c in fairness_changes(run, stages[1])}
    expected = "not comparable: the candidate predicts a single class (a one-class model's gaps are 0 by construction)"
    assert set(control.values()) == {expected}
    assert "lower (fairer)" in {c.reading for c in fairness_changes(run, stages[2])}
    _, rows = fairness_table(run)
    assert rows[0][0] == "b-control" and "not comparable" in rows[0][-1] and "fairer" not in rows[0][-1]
    write_stages(tmp_path / "stages.json", run)
    md = build_report(tmp_path).markdown.read_text()
    control_rows = [ln for ln in md.splitlines() if ln.startswith("| b-control |") and "difference" not in ln]
    assert control_rows and not any("fairer" in ln for ln in control_rows)


def test_a_one_class_reference_makes_the_candidate_not_comparable() -> None:
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.report import StageRecord
    from fairdeploy.report.stages import RunStages
    from fairdeploy.report.summary import fairness_changes

    y = np.arange(60) % 3
    g = np.array(["dark", "light"] * 30)
    flat = compute_metrics(y, np.ones(60, dtype=int), g, 3, ("a", "b", "c")).to_dict()
    real = compute_metrics(y, y, g, 3, ("a", "b", "c")).to_dict()
    run = RunStages((StageRecord("vanilla", "pytorch", flat), StageRecord("pruned", "pytorch", real)))
    assert {c.reading for c in fairness_changes(run, run.stages[1])} == {
        "not comparable: the reference predicts a single class (a one-class model's gaps are 0 by construction)"}


# ---- the same weights give the same checkpoint bytes ----

SAVE_TWICE = """
import sys, torch
from pathlib import Path
from fairdeploy.models.checkpoint import ModelSpec, save_checkpoint
from fairdeploy.models.registry import create_model
torch.manual_seed(0)
model = create_model("mobilenet_v3_small", 3)
spec = ModelSpec("mobilenet_v3_small", ("a", "b", "c"), ("dark", "light"), image_size=32)
for i in range(4):  # safetensors draws a new metadata order per HashMap, so each save is another draw
    save_checkpoint(model, spec, Path(sys.argv[1]) / str(i))
"""


def test_identical_saves_give_identical_checkpoint_bytes(tmp_path: Path) -> None:
    """8 saves of the same weights in 2 processes of different PYTHONHASHSEED: one sha256. Before sorting, the
    metadata's two keys came out in either order (2^-7 that 8 saves agree by chance)."""
    import hashlib

    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path / seed)], cwd=ROOT, check=True,
                       env={**ENV, "PYTHONHASHSEED": seed}, timeout=HANG_S)
    files = sorted(tmp_path.glob("*/*/model.safetensors"))
    assert len(files) == 8
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 1
    header = files[0].read_bytes()
    n = int.from_bytes(header[:8], "little")
    assert header[8:8 + n].startswith(b'{"__metadata__":{"arch":"mobilenet_v3_small","format":"pt"}')
    from fairdeploy.models.checkpoint import load_checkpoint

    load_checkpoint(files[0].parent)  # still a valid checkpoint
