"""Packaging (issue 11 item 11): profiles, calibration recipes and the demo config ship inside the wheel and are
found outside the checkout; the lookup order of fairdeploy.resources; the top-level copies do not drift."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import load_recipe
from fairdeploy.export.profiles import list_profiles, profile_layer, resolve_options
from fairdeploy.resources import CALIBRATION, PROFILES, WORKDIR_FOLDERS, packaged

REPO = Path(__file__).resolve().parents[1]
# Top-level files that are deliberately NOT the packaged copy (none today): name -> why.
DELIBERATELY_DIFFERENT: dict[str, str] = {}


@pytest.mark.parametrize("kind", [PROFILES, CALIBRATION])
def test_top_level_copies_match_the_packaged_files(kind: str) -> None:
    top = REPO / WORKDIR_FOLDERS[kind]
    inside = Path(str(packaged(kind)))
    top_files = {p.name: p.read_bytes() for p in top.glob("*.toml")}
    packaged_files = {p.name: p.read_bytes() for p in inside.glob("*.toml")}
    assert top_files and packaged_files
    assert sorted(top_files) == sorted(packaged_files), (
        f"{top} and {inside} list different files: copy new ones both ways (or add to DELIBERATELY_DIFFERENT)")
    drifted = [n for n in top_files if top_files[n] != packaged_files[n] and n not in DELIBERATELY_DIFFERENT]
    assert not drifted, f"edit both copies: {', '.join(f'{top / n} != {inside / n}' for n in drifted)}"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lookup_order_explicit_then_workdir_then_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    inside = Path(str(packaged(PROFILES)))
    # nothing in the working directory: the packaged profile and recipe
    layer = profile_layer("workstation-int8")
    assert Path(layer.source) == inside / "workstation-int8.toml" and layer.values["tensorrt"]["max_batch"] == 64
    assert Path(load_recipe().source) == Path(str(packaged(CALIBRATION))) / "default.toml"
    assert load_recipe().size == 512
    # ./export and ./calibration override by name; other names still come from the package
    _write(work / "export" / "workstation-int8.toml", "[tensorrt]\nmax_batch = 12\n")
    _write(work / "export" / "my-board.toml", "[onnx]\nprecision = ['fp16']\n")
    _write(work / "calibration" / "default.toml", "[calibration]\nsize = 33\n")
    assert resolve_options("workstation-int8", {}).tensorrt.max_batch == 12
    assert Path(profile_layer("jetson-orin-nano-fp16").source) == inside / "jetson-orin-nano-fp16.toml"
    assert load_recipe().size == 33 and Path(load_recipe().source) == work / "calibration" / "default.toml"
    assert set(list_profiles()) == {"my-board", "workstation-int8", "jetson-orin-nano-fp16", "jetson-agx-orin-int8-dla",
                                    "cpu-workstation-int8"}
    # an explicit folder (--profiles-dir / FAIRDEPLOY_PROFILES) beats ./export; a .toml path is used as given
    mine = tmp_path / "mine"
    _write(mine / "workstation-int8.toml", "[tensorrt]\nmax_batch = 10\n")
    from fairdeploy.export.profiles import default_profile_dirs

    assert resolve_options("workstation-int8", {}, default_profile_dirs(mine)).tensorrt.max_batch == 10
    assert resolve_options(str(work / "export" / "workstation-int8.toml"), {}, [mine]).tensorrt.max_batch == 12
    with pytest.raises(FairdeployError) as exc:
        resolve_options("jetson-xavier", {}, default_profile_dirs(mine))
    msg = str(exc.value)
    assert "unknown profile 'jetson-xavier'" in msg and "my-board" in msg and "jetson-agx-orin-int8-dla" in msg
    assert str(mine) in msg and str(work / "export") in msg and str(inside) in msg


# ---- the wheel, installed into a fresh venv, run from a folder outside the checkout ----


def _site_packages(venv: Path) -> Path:
    found = list((venv / "lib").glob("python*/site-packages"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of what the image copies (pyproject.toml, README.md, fairdeploy/), install it
    with no dependencies into a new venv, and let that venv see this one's site-packages (torch, onnx, ...) through
    a .pth file, which puts them AFTER the venv's own site-packages: `fairdeploy` resolves to the wheel. (A .pth
    path is not scanned for further .pth files, so this venv's editable-install hook does not run there.)"""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "fairdeploy", src / "fairdeploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*cmd: str | Path) -> None:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=base, env=env,
                              timeout=240, check=False)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", base / "dist", src)
    (wheel,) = (base / "dist").glob("fairdeploy-*.whl")
    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
        "--no-index", wheel)
    (_site_packages(venv) / "_fairdeploy_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _in_venv(venv: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FAIRDEPLOY_PROFILES",
                                                            "FAIRDEPLOY_CALIBRATION")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_wheel_exports_with_packaged_profile_and_recipe_outside_the_checkout(
        wheel_venv: Path, synth_manifest: Path, tmp_path: Path) -> None:
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    ckpt = save_checkpoint(create_model("mobilenet_v3_small", 3),
                           ModelSpec(arch="mobilenet_v3_small", classes=("cross", "disc", "ring"),
                                     groups=("dark", "light"), image_size=32), tmp_path / "ckpt")
    cwd = tmp_path / "elsewhere"  # no export/ or calibration/ here, and not the checkout
    cwd.mkdir()
    site = _site_packages(wheel_venv)

    proc = _in_venv(wheel_venv, cwd, str(wheel_venv / "bin" / "python"), "-c",
                    "import json, fairdeploy; from fairdeploy.pipeline.config import DEMO_CONFIG, load_pipeline_config;"
                    "cfg = load_pipeline_config(DEMO_CONFIG);"
                    "print(json.dumps([fairdeploy.__file__, str(DEMO_CONFIG), cfg.title, cfg.export['onnx']['precision']]))")
    assert proc.returncode == 0, proc.stderr
    module, demo, title, precisions = json.loads(proc.stdout)
    assert _inside(module, site) and not _inside(module, REPO)
    assert _inside(demo, site) and title.startswith("fairdeploy demo") and precisions == ["fp32", "fp16", "int8"]

    # the wheel's console script; profile and recipe by name, found only in the installed package
    out = cwd / "export-out"
    proc = _in_venv(wheel_venv, cwd, str(wheel_venv / "bin" / "fairdeploy"), "--threads", "1", "export",
                    "--model", str(ckpt), "--out", str(out), "--profile", "workstation-int8", "--no-trt",
                    "--calib-recipe", "default", "--calib-method", "minmax", "--data", str(synth_manifest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "export.json", "model.fp16.onnx",
                                                     "model.fp32.onnx", "model.int8.onnx"]
    summary = json.loads((out / "export.json").read_text())
    profile = Path(summary["options"]["profile"])
    assert profile.name == "workstation-int8.toml" and _inside(profile, site / "fairdeploy" / "resources")
    recipe = summary["calibration"]["recipe"]
    assert Path(recipe["source"]).name == "default.toml" and _inside(recipe["source"], site / "fairdeploy")
    assert recipe["method"] == "minmax"  # the flag over the profile's entropy
    assert recipe["requested_size"] == 512 and recipe["size"] == summary["calibration"]["n"] < 512  # fitted
