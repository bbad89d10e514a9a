"""Issue 9, section 2 ("passing what should not pass"): a candidate of another model, degenerate fairness figures,
image paths that leave the images root, unescaped names in report.md, duplicate and leaking manifest rows."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fairdeploy.cli.app import app
from fairdeploy.data.inspect import inspect_manifest
from fairdeploy.data.manifest import ManifestWarning, Record, find_duplicates, read_manifest, write_manifest
from fairdeploy.errors import EXIT_GATE_FAILED, FairdeployError
from fairdeploy.metrics import compute_metrics
from fairdeploy.report import StageRecord, build_report, write_stages
from fairdeploy.report.stages import RunStages
from fairdeploy.runtime.base import ArtifactInfo, InputSpec
from fairdeploy.validation import ValidationConfig, validate

CLASSES = ("a", "b", "c")
SIZE = 8


# ---- small, fast data: a few real PNGs and a manifest beside them ----

def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE, 3), value, dtype=np.uint8)).save(path)


def _dataset(root: Path, groups: tuple[str, ...] = ("dark", "light"), n: int = 12) -> Path:
    rows = []
    for i in range(n):
        image = f"images/{i}.png"
        _png(root / image, 20 * i)
        rows.append(Record(image, CLASSES[i % 3], groups[i % len(groups)], "test"))
    write_manifest(rows, root / "manifest.csv")
    return root / "manifest.csv"


class FakeRunner:
    """A Runner whose top-1 class is a fixed function of the image (or always `constant`)."""

    def __init__(self, name: str, source: str, constant: int | None = None) -> None:
        self.name, self.constant = name, constant
        self.info = ArtifactInfo(path=name, kind="checkpoint", arch="fake", classes=CLASSES, groups=("dark", "light"),
                                 image_size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), precision="fp32",
                                 source_sha256=source, size_bytes=1)

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def __enter__(self) -> FakeRunner:
        return self

    def __exit__(self, *exc: object) -> None: ...

    def input_spec(self) -> InputSpec:
        return InputSpec("x", (-1, 3, SIZE, SIZE), "float32")

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake", "device": "cpu"}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        cls = (np.full(len(batch), self.constant) if self.constant is not None
               else np.round((batch.mean(axis=(1, 2, 3)) + 1) * 10).astype(int) % 3)
        return np.eye(3, dtype=np.float32)[cls]


CFG = ValidationConfig(bootstrap=0, latency=None, batch_size=4)


# ---- (a) a candidate exported from another model fails the gate unless allowed ----

def test_candidate_of_another_model_fails_unless_allowed(tmp_path: Path) -> None:
    manifest = read_manifest(_dataset(tmp_path))
    ref = FakeRunner("ref", "a" * 64)
    same, other = FakeRunner("same", "a" * 64), FakeRunner("other", "b" * 64)
    res = validate(ref, [same, other], manifest, CFG, device="cpu")
    assert res.candidate("same").passed
    assert res.candidate("other").source_matches_reference is False
    assert all(c.passed for c in res.candidate("other").checks)  # every tolerance holds: only the source differs
    assert not res.passed and not res.candidate("other").passed
    expected = ("other: exported from a different model than the reference (source weights sha256 "
                "bbbbbbbbbbbb, reference aaaaaaaaaaaa); pass --allow-other-source if this is on purpose")
    assert res.failures() == [expected]
    allowed = validate(ref, [same, other], manifest, ValidationConfig(bootstrap=0, latency=None,
                                                                      allow_other_source=True), device="cpu")
    assert allowed.passed and allowed.failures() == []
    assert allowed.to_dict()["config"]["allow_other_source"] is True


def test_cli_candidate_of_another_model_exits_1_naming_it(tmp_path: Path) -> None:
    from fairdeploy.models import ModelSpec, create_model, save_checkpoint

    data = _dataset(tmp_path / "data")
    spec = ModelSpec("resnet18", CLASSES, ("dark", "light"), image_size=SIZE)
    import torch

    torch.manual_seed(0)
    ref = save_checkpoint(create_model("resnet18", 3), spec, tmp_path / "ref")
    cand = save_checkpoint(create_model("resnet18", 3), spec, tmp_path / "cand")
    args = ["validate", "-r", str(ref), "-c", str(cand), "--data", str(data), "--device", "cpu", "--bootstrap", "0",
            "--no-latency", "--max-accuracy-drop", "1", "--max-group-accuracy-drop", "1", "--max-eodd-drift", "1"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "v1")])
    assert refused.exit_code == EXIT_GATE_FAILED, refused.output
    flat = " ".join(refused.output.split())
    assert f"FAIL {cand}: exported from a different model than the reference" in flat
    d = json.loads((tmp_path / "v1" / "validation.json").read_text())
    assert d["candidates"][0]["source_matches_reference"] is False and d["passed"] is False
    allowed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "v2"), "--allow-other-source"])
    d2 = json.loads((tmp_path / "v2" / "validation.json").read_text())
    assert not any("different model" in f for f in d2["failures"])
    assert d2["config"]["allow_other_source"] is True
    assert allowed.exit_code == (0 if d2["passed"] else EXIT_GATE_FAILED)


# ---- (b) degenerate fairness figures: one predicted class, one group ----

def test_single_class_model_is_degenerate_and_refused(tmp_path: Path) -> None:
    manifest = read_manifest(_dataset(tmp_path))
    ref, cand = FakeRunner("ref", "a" * 64), FakeRunner("const", "a" * 64, constant=1)
    res = validate(ref, [cand], manifest, CFG.__class__(bootstrap=0, latency=None, tolerances=_loose()),
                   device="cpu")
    c = res.candidate("const")
    assert all(ch.passed for ch in c.checks)  # the tolerances alone would pass it
    assert c.degenerate == ("predicts a single class (b)",)
    assert not c.passed and not res.passed
    assert res.degenerate == ("const: predicts a single class (b)",)
    assert "const: fairness figures are degenerate (predicts a single class (b))" in res.failures()[0]
    d = res.to_dict()
    assert d["degenerate"] == ["const: predicts a single class (b)"] and d["passed"] is False
    # the reference predicting one class makes every candidate's comparison degenerate too
    res2 = validate(FakeRunner("ref", "a" * 64, constant=0), [FakeRunner("c", "a" * 64)], manifest,
                    CFG.__class__(bootstrap=0, latency=None, tolerances=_loose()), device="cpu")
    assert res2.candidate("c").degenerate == ("the reference predicts a single class (a)",)
    assert not res2.passed


def test_single_group_split_is_degenerate_and_cli_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _dataset(tmp_path / "data", groups=("dark",))
    ref, cand = FakeRunner("ref", "a" * 64), FakeRunner("cand", "a" * 64)
    for r in (ref, cand):
        r.info = ArtifactInfo(**{**r.info.__dict__, "groups": ("dark",)})
    res = validate(ref, [cand], read_manifest(data), CFG, device="cpu")
    assert res.candidate("cand").degenerate == ("only one group in the split (dark)",)
    assert res.degenerate == ("split 'test': only one group in the split (dark)",) and not res.passed

    import fairdeploy.validation as validation_pkg

    real = validation_pkg.validate
    monkeypatch.setattr(validation_pkg, "validate", lambda _r, _c, *a, **k: real(ref, [cand], *a, **k))
    dummy = tmp_path / "dummy"  # the patched validate runs the fake runners instead
    dummy.mkdir()
    result = CliRunner().invoke(app, ["validate", "-r", str(dummy), "-c", str(dummy), "--data", str(data),
                                      "--out", str(tmp_path / "v"), "--bootstrap", "0", "--no-latency",
                                      "--device", "cpu"])
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    flat = " ".join(result.output.split())
    assert "gate failed" in flat and "only one group in the split (dark)" in flat
    # the report says so too
    from fairdeploy.report.stages import load_stages

    notes = load_stages(tmp_path / "v").notes
    assert any("degenerate" in n and "only one group" in n for n in notes)


def _loose():
    from fairdeploy.validation import Tolerances

    return Tolerances(max_eodd_drift=1.0, max_accuracy_drop=1.0, max_group_accuracy_drop=1.0)


# ---- (c) image paths that leave the images root ----

@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_outside_the_images_root_are_refused_unless_allowed(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data"
    data = _dataset(root)
    outside = tmp_path / "secret.png"
    _png(outside, 7)
    image = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "images/link.png"}[kind]
    if kind == "symlink":
        (root / "images" / "link.png").symlink_to(outside)
    with open(data, "a", encoding="utf-8") as f:
        f.write(f"{image},a,dark,test\n")
    with pytest.raises(FairdeployError) as err:
        read_manifest(data)
    msg = str(err.value)
    assert "\n" not in msg and "row 14" in msg and repr(image) in msg and "--allow-outside-root" in msg
    assert len(read_manifest(data, allow_outside_root=True).records) == 13
    # inside the root, '..' that comes back and an absolute path are fine
    ok = root / "ok.csv"
    write_manifest([Record("images/../images/1.png", "a", "dark", "test"),
                    Record(str(root / "images" / "2.png"), "b", "light", "test")], ok)
    assert len(read_manifest(ok).records) == 2
    # the CLI: one line, exit 2; the option lets it through
    result = CliRunner().invoke(app, ["data", "inspect", "--data", str(data), "--no-check-images"])
    assert isinstance(result.exception, FairdeployError) and result.exception.exit_code == 2
    allowed = CliRunner().invoke(app, ["data", "inspect", "--data", str(data), "--no-check-images",
                                       "--allow-outside-root"])
    assert allowed.exit_code == 0, allowed.output


# ---- (d) report.md escapes names ----

def test_report_markdown_escapes_group_names_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    evil_group = "<img src=x onerror=alert(1)>|g"
    g = rng.choice(["plain", evil_group], 60)
    m = compute_metrics(y, y, g, 3, CLASSES).to_dict()
    label = "<script>x</script>|*model*.onnx"
    stages = (StageRecord(name="reference", kind="pytorch", metrics=m),
              StageRecord(name=label, kind="onnx", metrics=m, reference="reference", gate_passed=False,
                          gate_failures=(f"{label}: accuracy (group '{evil_group}') dropped",)))
    write_stages(tmp_path / "stages.json", RunStages(stages, notes=(f"note about {label}",)))
    md = build_report(tmp_path).markdown.read_text()
    assert "<img" not in md and "<script>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;\\|g" in md and "\\*model\\*" in md
    tables = re.findall(r"(?:^\|.*\n)+", md, flags=re.MULTILINE)  # each run of table lines
    assert tables
    for table in tables:
        cells = [len(re.split(r"(?<!\\)\|", ln)) for ln in table.splitlines()]
        assert len(set(cells)) == 1, table  # no name adds a column


# ---- (e) duplicate rows, an image in two splits or with two labels ----

def test_duplicates_and_leakage_warn_and_are_inspected(tmp_path: Path, run_main) -> None:
    root = tmp_path / "data"
    data = _dataset(root)
    with open(data, "a", encoding="utf-8") as f:
        f.write("images/0.png,a,dark,test\n")  # a duplicate row
        f.write("images/1.png,b,light,train\n")  # leaks: test and train
        f.write("images/./2.png,a,dark,test\n")  # the same file, another label
    with pytest.warns(ManifestWarning) as record:
        manifest = read_manifest(data)
    msg = str(record[0].message)
    assert "1 duplicate row(s), e.g. images/0.png" in msg
    assert "1 image(s) in more than one split, e.g. images/1.png (splits test, train)" in msg
    assert "1 image(s) with more than one label, e.g. images/2.png (labels a, c)" in msg
    dups = inspect_manifest(manifest, check_images=False).duplicates
    assert [i for i, _ in dups.rows] == ["images/0.png"] and [i for i, _ in dups.cross_split] == ["images/1.png"]
    code, out, _ = run_main("data", "inspect", "--data", str(data), "--no-check-images", "--out",
                            str(tmp_path / "inspect.json"))
    assert code == 0
    flat = " ".join(out.split())
    assert "duplicate rows (1)" in flat and "images in more than one split (leakage) (1)" in flat
    assert "images with more than one label (1)" in flat
    saved = json.loads((tmp_path / "inspect.json").read_text())["duplicates"]
    assert saved["labels"] == [{"image": "images/2.png", "detail": "labels a, c"}]
    # a clean manifest reads without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManifestWarning)
        read_manifest(_dataset(tmp_path / "clean"))
    assert not find_duplicates(read_manifest(_dataset(tmp_path / "clean2")).records)
