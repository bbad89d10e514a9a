"""Shared fixtures: where the real metadata and sample images live (outside the repository)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data relative to the repository root; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see the project README)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """torch runs ONE intra-op thread in this process for the whole session (set here once, before any other
    fixture: pytest instantiates autouse fixtures of a scope first). On a shared 2-core machine tiny models are
    much faster so (threads contend with other processes'), and every number a test measures here (trained
    weights, logits, INT8 agreement) comes from one setting. scripts/test.sh also exports OMP_NUM_THREADS=1 for
    the subprocesses the tests start. A test that measures another thread count sets it and restores 1."""
    import torch

    torch.set_num_threads(1)


# ---- synthetic data and a small trained model, shared by the model, pruning, export and runtime tests ----

TINY_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic biased dataset (32x32 PNGs, 3 classes, groups dark/light)."""
    from fairdeploy.data.synth import SynthConfig, generate_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    return generate_synthetic(out, SynthConfig(n_images=480, image_size=TINY_IMAGE_SIZE, seed=0))


SMALL_SPLITS = {"train": 96, "val": 48}  # small_synth_manifest: images per split, half from each group


@pytest.fixture(scope="session")
def small_synth_manifest(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth_manifest cut to SMALL_SPLITS (the first rows of each split and group in file order; the test split
    whole), for runs whose cost grows with the images while what the test checks does not (fine-tuning epochs,
    per-layer INT8 sensitivity on val). Its image paths are synth_manifest's: read it with
    images_root=synth_manifest.parent (CLI: --images-root). Named manifest.csv, as records name the full set."""
    import csv

    with open(synth_manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["split"] not in SMALL_SPLITS]
    for split, n in SMALL_SPLITS.items():
        for group in ("dark", "light"):
            keep += [r for r in rows if r["split"] == split and r["group"] == group][: n // 2]
    out = tmp_path_factory.mktemp("synth_small") / "manifest.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 trained 3 epochs on synth_manifest on the CPU with ONE thread (one_torch_thread), so its weights
    (and every number the tests measure on it) do not depend on how many threads torch would get; returns the
    best/ checkpoint dir. Light ~0.97, dark near chance on val: a large, measurable gap."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = FitConfig(epochs=3, batch_size=32, lr=2e-3, seed=0)
    result = train_model(read_manifest(synth_manifest), "resnet18", out, cfg, image_size=TINY_IMAGE_SIZE,
                         device="cpu")
    return result.best_dir


# ---- runtime / validation (fairdeploy.runtime, fairdeploy.validation) ----


@pytest.fixture(scope="session")
def runtime_fp32_onnx(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained_checkpoint exported as model.fp32.onnx (fairdeploy.export.onnx_export) for the runner tests."""
    from fairdeploy.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("runtime_export") / "model.fp32.onnx"
    export_onnx(trained_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def cpu_int8_export(trained_checkpoint: Path, synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained_checkpoint through `run_export` with the cpu-workstation-int8 profile (INT8 for ONNX Runtime's CPU
    kernels) and 24 calibration images from synth_manifest: the folder holding model.fp32.onnx, model.int8.onnx,
    export.json and calibration.json. Shared by the session, so read it, never write into it."""
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import resolve_options

    out = tmp_path_factory.mktemp("cpu_int8") / "export"
    run_export(trained_checkpoint, out, resolve_options("cpu-workstation-int8", {"calibration": {"size": 24}}),
               data=synth_manifest)
    return out


# ---- pruning tests ----

@pytest.fixture()
def one_thread(one_torch_thread: None) -> None:
    """The older per-test name for one_torch_thread (the whole session already runs one thread); kept because
    test files outside issue 18's edits still request it, it does nothing of its own."""


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Call fairdeploy.cli.main in this process (its error handling included, unlike CliRunner).

    Returns (exit code, stdout, stderr); much cheaper than a subprocess that imports torch again.
    """
    import sys

    from fairdeploy.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fairdeploy", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def biased_checkpoint(trained_checkpoint: Path) -> Path:
    """The pruning tests' name for the shared one-thread-trained, biased resnet18."""
    return trained_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 30-image synthetic manifest (16 px) and an untrained resnet18 checkpoint of its classes and groups (for the
    CLI's input and output checks, which need real files but no trained weights)."""
    import torch

    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.data.synth import SynthConfig, generate_synthetic
    from fairdeploy.models.checkpoint import ModelSpec, save_checkpoint
    from fairdeploy.models.registry import create_model

    root = tmp_path_factory.mktemp("tiny")
    manifest_path = generate_synthetic(root / "data", SynthConfig(n_images=30, image_size=16, seed=1))
    manifest = read_manifest(manifest_path)
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", tuple(manifest.classes), tuple(manifest.groups), image_size=16)
    save_checkpoint(create_model("resnet18", spec.num_classes), spec, root / "ckpt")
    return manifest_path, root / "ckpt"
