"""Issue 9 §3: inputs that ended in a traceback are one line, exit 2, nothing half-written; an unexpected
exception exits 4 (not the gate's 1) with one line and the traceback in a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _copy_data(manifest: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


# ---- a decompression bomb in `evaluate` ----

@pytest.mark.parametrize("side", [64, 40])  # 4096 px: PIL's error (> 2x the limit); 1600 px: its warning
def test_decompression_bomb_in_evaluate_names_the_file(tiny, tmp_path: Path, run_main, monkeypatch,
                                                       side: int) -> None:
    from PIL import Image

    from fairdeploy.data.manifest import read_manifest

    manifest_path, ckpt = tiny
    data = _copy_data(manifest_path, tmp_path / "data")
    victim = read_manifest(data).split("test")[0]
    Image.new("RGB", (side, side)).save(data.parent / victim.image, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = tmp_path / "metrics.json"
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                            "--bootstrap", "0", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 2 and str(data.parent / victim.image) in line and "decompression bomb" in line
    assert f"Image size ({side * side} pixels) exceeds limit" in line
    assert not out.exists()


# ---- module_shapes given as a list or with negative sizes ----

@pytest.mark.parametrize(("shapes", "message"), [
    ([["fc", {"type": "Linear", "in_features": 512, "out_features": 3}]], "module_shapes must be a table"),
    ({"fc": {"type": "Linear", "in_features": 512, "out_features": -2}},
     "module_shapes['fc']: out_features must be a positive integer, got -2"),
    ({"layer1.0.conv1": {"type": "Conv2d", "in_channels": 64, "out_channels": 0, "groups": 1}},
     "module_shapes['layer1.0.conv1']: out_channels must be a positive integer, got 0"),
    ({"fc": {"type": "Dense", "in_features": 512}}, "type one of Conv2d, BatchNorm2d, Linear"),
])
def test_bad_module_shapes_are_one_line(tiny, tmp_path: Path, run_main, shapes, message: str) -> None:
    import shutil

    manifest_path, ckpt = tiny
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    spec = json.loads((bad / "model.json").read_text())
    spec["module_shapes"] = shapes
    (bad / "model.json").write_text(json.dumps(spec))
    code, _, err = run_main("evaluate", "--model", str(bad), "--data", str(manifest_path), "--bootstrap", "0",
                            "--device", "cpu")
    assert code == 2 and message in _one_error_line(err) and str(bad / "model.json") in err


# ---- train --resume with a manifest of other classes ----

def test_resume_with_other_classes_is_refused_before_anything_is_written(tiny, tmp_path: Path, run_main) -> None:
    manifest_path, _ = tiny
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--arch", "resnet18", "--epochs", "2", "--image-size", "16",
            "--batch-size", "8", "--device", "cpu"]
    code, _, err = run_main(*args, "--data", str(manifest_path))
    assert code == 0, err
    state = json.loads((out / "trainer.json").read_text())
    state.update(epoch=1, history=state["history"][:1])  # as if stopped after epoch 1 of 2
    (out / "trainer.json").write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    other = _copy_data(manifest_path, tmp_path / "other")
    text = other.read_text().splitlines()
    header, rows = text[0], [r.split(",") for r in text[1:]]
    label = header.split(",").index("label")
    for r in rows:
        r[label] = "other-" + r[label]
    other.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    code, _, err = run_main(*args, "--data", str(other), "--resume")
    line = _one_error_line(err)
    assert code == 2 and f"cannot resume {out}: classes differ" in line and "other-" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---- ONNX metadata that lies about the input size ----

def test_onnx_metadata_lying_about_the_input_size_names_file_and_real_shape(tiny, tmp_path: Path) -> None:
    from dataclasses import replace

    import onnx

    from fairdeploy.artifact.metadata import metadata_of_model, set_onnx_metadata
    from fairdeploy.export.onnx_export import export_onnx
    from fairdeploy.runtime.ort_runner import OrtRunner

    _, ckpt = tiny
    path = tmp_path / "model.fp32.onnx"
    export_onnx(ckpt, path)
    model = onnx.load(str(path))
    set_onnx_metadata(model, replace(metadata_of_model(model), image_size=24))
    onnx.save(model, str(path))
    with pytest.raises(FairdeployError) as info, OrtRunner(path):
        pass
    assert str(info.value) == (
        f"{path}: the metadata says the input is 3x24x24 but the graph's input 'input' has shape N x 3 x 16 x 16; "
        "the file's metadata does not describe this model (re-export it)")


def test_validate_a_lying_onnx_is_one_line_and_writes_nothing(tiny, tmp_path: Path, run_main) -> None:
    from dataclasses import replace

    import onnx

    from fairdeploy.artifact.metadata import metadata_of_model, set_onnx_metadata
    from fairdeploy.export.onnx_export import export_onnx

    manifest_path, ckpt = tiny
    path = tmp_path / "model.fp32.onnx"
    export_onnx(ckpt, path)
    model = onnx.load(str(path))
    set_onnx_metadata(model, replace(metadata_of_model(model), image_size=24))
    onnx.save(model, str(path))
    out = tmp_path / "v"
    code, _, err = run_main("validate", "--reference", str(ckpt), "--candidate", str(path), "--data",
                            str(manifest_path), "--out", str(out), "--no-latency", "--bootstrap", "0",
                            "--device", "cpu", "--allow-other-source")
    line = _one_error_line(err)
    # validate compares the metadata with the reference first; OrtRunner checks it against the graph (above)
    assert code == 2 and line == f"error: candidate {path}: input size 24 does not match the reference's 16"
    assert not out.exists()


def test_inspect_reports_a_decompression_bomb_as_unreadable(tiny, tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from fairdeploy.data.inspect import image_problem

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "warn.png")  # 1600 px: PIL only warns (up to 2x the limit)
    Image.new("RGB", (20, 20)).save(tmp_path / "fine.png")
    assert image_problem(str(tmp_path / "fine.png")) is None
    assert image_problem(str(tmp_path / "warn.png")).startswith("DecompressionBombWarning: Image size (1600 pixels)")


# ---- evaluate --out an existing directory; prune --out whose hidden .old sibling is a file ----

def test_evaluate_out_an_existing_folder_is_one_line(tiny, tmp_path: Path, run_main) -> None:
    manifest_path, ckpt = tiny
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_main("evaluate", "--model", str(ckpt), "--data", str(manifest_path), "--out", str(folder),
                            "--bootstrap", "0", "--device", "cpu")
    assert code == 2 and f"--out {folder} is a folder" in _one_error_line(err)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def _small_prune_settings(folder: Path) -> list[str]:
    """--config with 4 score images per group and evaluation batches of 8 (a quick prune run)."""
    path = folder / "small-prune.toml"
    path.write_text("batch_size = 8\n[fairprune]\nscore_samples = 4\n")
    return ["--config", str(path)]


def test_prune_out_with_a_stale_old_file_beside_it(tiny, tmp_path: Path, run_main) -> None:
    manifest_path, ckpt = tiny
    out = tmp_path / "pruned"
    (tmp_path / ".pruned.old").write_text("left by a killed run")
    settings = _small_prune_settings(tmp_path)
    code, _, err = run_main("prune", "--model", str(ckpt), "--data", str(manifest_path), "--out", str(out),
                            "--method", "fairprune", "--steps", "1", *settings, "--device", "cpu")
    assert code == 0, err
    assert (out / "prune.json").is_file() and not (tmp_path / ".pruned.old").exists()
    code, _, err = run_main("prune", "--model", str(ckpt), "--data", str(manifest_path), "--out", str(out),
                            "--method", "fairprune", "--steps", "1", *settings,
                            "--device", "cpu")  # replacing its own output goes through .pruned.old again
    assert code == 0, err
    assert (out / "prune.json").is_file() and not (tmp_path / ".pruned.old").exists()


# ---- an unreadable image in a pruning score set (a Subset of the dataset) ----

def test_unreadable_image_in_a_subset_names_that_image(tiny, tmp_path: Path) -> None:
    import torch
    from torch.utils.data import Subset

    from fairdeploy.data.batches import iter_batches
    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest

    manifest_path, _ = tiny
    data = _copy_data(manifest_path, tmp_path / "data")
    manifest = read_manifest(data)
    ds = split_dataset(manifest, "train", Encoding(tuple(manifest.classes), tuple(manifest.groups)),
                       eval_transform(16, (0.5,) * 3, (0.5,) * 3))
    assert len(ds) > 7
    (data.parent / ds.records[7].image).write_bytes(b"not a png")
    # Subset position 1 is base index 7; the old code mapped 7 through the indices again (IndexError: 2 items)
    nested = Subset(Subset(ds, [3, 7, 5]), [0, 1])
    with pytest.raises(FairdeployError) as info:
        list(iter_batches(nested, 2, torch.device("cpu")))
    assert str(info.value) == f"image {data.parent / ds.records[7].image} could not be read (not a valid image file)"


# ---- an unexpected exception: exit 4, one line, the traceback in a file (a real process) ----

BOOM = ("import sys\n"
        "import fairdeploy.cli.data as d\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('boom\\nsecond line')\n"
        "d.prepare = boom\n"
        "from fairdeploy.cli import main\n"
        "sys.argv = ['fairdeploy', *sys.argv[1:]]\n"
        "main()\n")


def test_internal_error_exits_4_with_one_line_and_the_traceback_in_a_file(tmp_path: Path) -> None:
    args = [sys.executable, "-c", BOOM, "data", "prepare", "--format", "csv", "--metadata", str(tmp_path / "t.csv"),
            "--out", str(tmp_path / "m.csv")]
    env = {k: v for k, v in os.environ.items() if k not in ("FAIRDEPLOY_DEBUG", "FAIRDEPLOY_TRACEBACK")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 4, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: internal error (RuntimeError: boom); traceback in ")
    where = Path(line.split("traceback in ")[1].split(" (")[0])
    text = where.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom\nsecond line" in text
    assert "data prepare --format csv" in text  # the command, for the bug report
    where.unlink()
    assert not (tmp_path / "m.csv").exists()

    proc = subprocess.run(args[:3] + ["--verbose"] + args[3:], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 4
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: internal error (RuntimeError: boom)")
    Path(proc.stderr.split("traceback in ")[1].split(" (")[0]).unlink()


# ---- prune, finetune and pipeline take --allow-outside-root like the other commands ----

def _with_an_outside_image(manifest_path: Path, dest: Path) -> Path:
    """A copy of the manifest whose first test row reads ../outside.png (a real image beside the data folder)."""
    import shutil

    data = _copy_data(manifest_path, dest / "data")
    lines = data.read_text().splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.split(",")[3] == "test")
    image = lines[row].split(",")[0]
    shutil.copy(data.parent / image, dest / "outside.png")
    lines[row] = lines[row].replace(image, "../outside.png", 1)
    data.write_text("\n".join(lines) + "\n")
    return data


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_prune_and_finetune_refuse_paths_outside_the_root_unless_allowed(tiny, tmp_path: Path, run_main,
                                                                         command: str) -> None:
    manifest_path, ckpt = tiny
    data = _with_an_outside_image(manifest_path, tmp_path)
    extra = (["--method", "fairprune", "--steps", "1", *_small_prune_settings(tmp_path)] if command == "prune"
             else ["--epochs", "1", "--batch-size", "8"])
    args = [command, "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
            *extra]
    code, _, err = run_main(*args)
    line = _one_error_line(err)
    assert code == 2 and "'../outside.png'" in line and "--allow-outside-root" in line
    assert not (tmp_path / "out").exists()
    code, _, err = run_main(*args, "--allow-outside-root")
    assert code == 0, err


def test_pipeline_refuses_paths_outside_the_root_unless_allowed(tiny, tmp_path: Path, run_main,
                                                                monkeypatch) -> None:
    import fairdeploy.training.train as train_mod

    manifest_path, _ = tiny
    data = _with_an_outside_image(manifest_path, tmp_path)
    config = tmp_path / "p.toml"
    config.write_text(f'[data]\nmanifest = "{data}"\n[model]\narch = "resnet18"\nimage_size = 16\nepochs = 1\n')

    def stop(*_a, **_k):
        raise FairdeployError("stopped where training would start")

    monkeypatch.setattr(train_mod, "train_model", stop)
    code, _, err = run_main("pipeline", str(config), "--out", str(tmp_path / "run"))
    assert code == 2 and "'../outside.png'" in _one_error_line(err)
    code, _, err = run_main("pipeline", str(config), "--out", str(tmp_path / "run2"), "--allow-outside-root")
    assert code == 2 and "stopped where training would start" in _one_error_line(err)  # past every data check
    config.write_text(config.read_text().replace("[data]\n", "[data]\nallow_outside_root = true\n"))
    code, _, err = run_main("pipeline", str(config), "--out", str(tmp_path / "run3"))
    assert code == 2 and "stopped where training would start" in _one_error_line(err)
