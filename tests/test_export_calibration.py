"""Calibration sets: the recipe file, a group x class balanced draw (counted), determinism, the hash, and
the batches the quantizer sees (compared with eval_transform applied by hand)."""

from __future__ import annotations

import csv
import random
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fairdeploy.data.loading import eval_transform
from fairdeploy.data.manifest import read_manifest
from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import (
    CalibrationRecipe,
    calibration_batches,
    cell_quotas,
    draw_calibration_set,
    even_batch_size,
    load_recipe,
    reader_class,
)
from fairdeploy.models import ModelSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(arch="resnet18", classes=("cross", "disc", "ring"), groups=("dark", "light"), image_size=32)


def recipe(**kw) -> CalibrationRecipe:
    return replace(CalibrationRecipe(size=48, batch_size=8, source="test"), **kw).validate()


def test_default_recipe_file_is_the_documented_one() -> None:
    r = load_recipe(dirs=[REPO / "calibration"])
    assert (r.split, r.size, r.method, r.seed, r.batch_size) == ("train", 512, "minmax", 0, 16)
    assert r.source.endswith("calibration/default.toml")
    r2 = load_recipe("default", dirs=[REPO / "calibration"], size=30, method="entropy", split=None)
    assert (r2.size, r2.method, r2.split) == (30, "entropy", "train")  # None = not given: the file's value stays


def test_recipe_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "odd.toml").write_text('[calibration]\nsize = 10\nshuffle = true\n')
    with pytest.raises(FairdeployError, match=r"odd\.toml: unknown key 'shuffle' in \[calibration\]; valid keys: recipe, split, size"):
        load_recipe(tmp_path / "odd.toml")
    with pytest.raises(FairdeployError, match=r"unknown calibration recipe 'nope'; choose one of default"):
        load_recipe("nope", dirs=[REPO / "calibration"])
    with pytest.raises(FairdeployError, match="split 'test' must stay unseen"):
        load_recipe(dirs=[REPO / "calibration"], split="test")
    with pytest.raises(FairdeployError, match="method 'kl' is not one of minmax, entropy, percentile"):
        load_recipe(dirs=[REPO / "calibration"], method="kl")


def test_quotas_and_even_batches() -> None:
    cells = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert cell_quotas(10, cells) == {("a", "x"): 3, ("a", "y"): 3, ("b", "x"): 2, ("b", "y"): 2}
    assert [even_batch_size(n, 16) for n in (48, 60, 7, 5)] == [16, 15, 7, 5]
    assert even_batch_size(13, 8) == 1  # a prime count: one image per batch rather than a short last batch


def test_draw_is_balanced_over_group_and_class(synth_manifest: Path) -> None:
    manifest = read_manifest(synth_manifest)
    cal = draw_calibration_set(manifest, SPEC, recipe(size=48))
    counted = Counter((i.group, i.label) for i in cal.items)
    assert counted == {(g, c): 8 for g in SPEC.groups for c in SPEC.classes}
    train = {r.image for r in manifest.records if r.split == "train"}
    assert all(i.image in train for i in cal.items) and len({i.image for i in cal.items}) == 48
    # Each record keeps its own label and group.
    by_image = {r.image: r for r in manifest.records}
    assert all((by_image[i.image].label, by_image[i.image].group) == (i.label, i.group) for i in cal.items)
    # 50 over 6 cells: two cells get 9, four get 8.
    uneven = Counter((i.group, i.label) for i in draw_calibration_set(manifest, SPEC, recipe(size=50)).items)
    assert sorted(uneven.values()) == [8, 8, 8, 8, 9, 9]


def test_draw_is_deterministic_and_independent_of_row_order(synth_manifest: Path, tmp_path: Path) -> None:
    manifest = read_manifest(synth_manifest)
    a = draw_calibration_set(manifest, SPEC, recipe(seed=3))
    b = draw_calibration_set(manifest, SPEC, recipe(seed=3))
    c = draw_calibration_set(manifest, SPEC, recipe(seed=4))
    assert a.items == b.items and a.sha256 == b.sha256
    assert {i.image for i in a.items} != {i.image for i in c.items} and a.sha256 != c.sha256
    # The same rows in another order (same image root) draw the same set.
    rows = list(csv.reader(synth_manifest.open()))
    body = rows[1:]
    random.Random(0).shuffle(body)
    shuffled = synth_manifest.parent / "shuffled_manifest.csv"
    with shuffled.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *body])
    d = draw_calibration_set(read_manifest(shuffled), SPEC, recipe(seed=3))
    assert d.items == a.items and d.sha256 == a.sha256
    shuffled.unlink()


def test_hash_changes_with_image_content(synth_manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(synth_manifest.parent, copy)
    manifest = read_manifest(copy / "manifest.csv")
    before = draw_calibration_set(manifest, SPEC, recipe())
    victim = copy / before.items[5].image
    pixels = np.array(Image.open(victim).convert("RGB"))
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel of one image
    Image.fromarray(pixels).save(victim)
    after = draw_calibration_set(manifest, SPEC, recipe())
    assert [i.image for i in after.items] == [i.image for i in before.items]  # same list ...
    assert after.sha256 != before.sha256  # ... different content, different hash
    assert draw_calibration_set(manifest, replace(SPEC, image_size=28), recipe()).sha256 != after.sha256


def test_too_few_images_of_a_group_is_one_clear_error(synth_manifest: Path) -> None:
    manifest = read_manifest(synth_manifest)
    train = [r for r in manifest.records if r.split == "train"]
    smallest = min(Counter((r.group, r.label) for r in train).values())
    with pytest.raises(FairdeployError) as e:
        draw_calibration_set(manifest, SPEC, recipe(size=6 * (smallest + 1)))
    msg = str(e.value)
    assert "\n" not in msg
    assert "too few train images of group 'dark'" in msg  # dark is the 35% minority of the synthetic data
    assert f"use --calib-size {6 * smallest} or less" in msg
    draw_calibration_set(manifest, SPEC, recipe(size=6 * smallest))  # the suggested size works
    no_groups = replace(SPEC, groups=())
    with pytest.raises(FairdeployError, match="has no groups"):
        draw_calibration_set(manifest, no_groups, recipe())


@pytest.mark.parametrize("limit", [600, 400])  # 32x32 = 1024 px: PIL's warning (<= 2x the limit), then its error
def test_a_decompression_bomb_in_the_calibration_set_is_refused(synth_manifest: Path, limit: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    cal = draw_calibration_set(read_manifest(synth_manifest), SPEC, recipe(size=6, batch_size=2))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    first = cal.root / cal.items[0].image
    with pytest.raises(FairdeployError, match=rf"calibration image {re.escape(str(first))} could not be read "
                                              r"\(a decompression bomb: "):
        next(calibration_batches(cal, 2))


def test_batches_are_eval_transformed_images_in_recorded_order(synth_manifest: Path) -> None:
    manifest = read_manifest(synth_manifest)
    cal = draw_calibration_set(manifest, SPEC, recipe(size=18, batch_size=4))
    batches = list(calibration_batches(cal, 4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]
    t = eval_transform(SPEC.image_size, SPEC.mean, SPEC.std)
    for k in (0, 7, 17):
        expected = t(Image.open(manifest.root / cal.items[k].image).convert("RGB")).numpy()
        np.testing.assert_array_equal(np.concatenate(batches)[k], expected)
    # The onnxruntime reader uses equal batches (18 = 3 x 6) and rewinds to the start.
    reader = reader_class()(cal, 8)
    sizes = []
    while (b := reader.get_next()) is not None:
        sizes.append(len(b["input"]))
    assert sizes == [6, 6, 6]
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], np.concatenate(batches)[:6])


# ---------------------------------------------------------------- item 10: the default size fits the data


def _smallest_train_cell(manifest) -> int:
    return min(Counter((r.group, r.label) for r in manifest.records if r.split == "train").values())


def test_default_size_is_lowered_to_the_largest_balanced_set_with_a_warning(synth_manifest: Path) -> None:
    manifest = read_manifest(synth_manifest)
    smallest = _smallest_train_cell(manifest)
    default = load_recipe(dirs=[REPO / "calibration"])  # size 512 from the file: more than the split has
    assert default.size == 512 and default.fit_size and default.size > 6 * smallest
    with pytest.warns(UserWarning, match=r"too few train images of group 'dark'.*calibrating on \d+ images instead"):
        cal = draw_calibration_set(manifest, SPEC, default)
    counted = Counter((i.group, i.label) for i in cal.items)
    assert max(counted.values()) - min(counted.values()) <= 1 and min(counted.values()) == smallest
    assert len(cal) >= 6 * smallest and cal.recipe.size == len(cal) and cal.recipe.requested_size == 512
    assert cal.to_dict()["recipe"]["requested_size"] == 512
    # An explicit size (--calib-size or a profile's) is never changed: too many is one clear error.
    with pytest.raises(FairdeployError, match=f"use --calib-size {6 * smallest} or less"):
        draw_calibration_set(manifest, SPEC, load_recipe(dirs=[REPO / "calibration"], size=512))
    assert not load_recipe(dirs=[REPO / "calibration"], size=512).fit_size


def test_largest_balanced_size() -> None:
    from fairdeploy.export.calibration import largest_balanced_size

    assert largest_balanced_size([5, 5, 5], 100) == 15
    assert largest_balanced_size([6, 6, 5], 100) == 17  # the first cells take the extra images
    assert largest_balanced_size([5, 6, 6], 100) == 15
    assert largest_balanced_size([9, 9], 7) == 7 and largest_balanced_size([0, 4], 8) == 0
    assert largest_balanced_size([3, 3, 3], 2) == 0  # fewer images than cells: no balanced set


def test_a_cell_without_images_is_an_error_even_for_the_default_size(synth_manifest: Path, tmp_path: Path) -> None:
    rows = list(csv.reader(synth_manifest.open()))
    header, body = rows[0], rows[1:]
    g, lab, sp = header.index("group"), header.index("label"), header.index("split")
    kept = [r for r in body if not (r[g] == "dark" and r[lab] == "ring" and r[sp] == "train")]
    path = synth_manifest.parent / "no_dark_ring.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *kept])
    try:
        with pytest.raises(FairdeployError, match="no train images of group 'dark', class 'ring'"):
            draw_calibration_set(read_manifest(path), SPEC, load_recipe(dirs=[REPO / "calibration"]))
    finally:
        path.unlink()


def test_export_checks_the_calibration_size_before_loading_the_model(synth_manifest: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 10: run_export decides the calibration set (fit with a warning, or a clear error) from the
    manifest and model.json before it loads any model weights."""
    from fairdeploy.export import exporter
    from fairdeploy.export.profiles import resolve_options
    from fairdeploy.models import ModelSpec as Spec
    from fairdeploy.models import create_model, save_checkpoint

    ckpt = save_checkpoint(create_model("mobilenet_v3_small", 3),
                           Spec(arch="mobilenet_v3_small", classes=SPEC.classes, groups=SPEC.groups, image_size=32),
                           tmp_path / "ckpt")
    events: list[str] = []

    class Loaded(Exception):
        pass

    def fake_load(*a, **k):
        events.append("load")
        raise Loaded

    monkeypatch.setattr(exporter, "load_checkpoint", fake_load)
    real_draw = exporter.draw_calibration_set
    monkeypatch.setattr(exporter, "draw_calibration_set",
                        lambda *a, **k: (events.append("draw"), real_draw(*a, **k))[1])
    with pytest.warns(UserWarning, match="largest balanced set"), pytest.raises(Loaded):
        exporter.run_export(ckpt, tmp_path / "out", resolve_options(None, {"onnx": {"precision": ("int8",)}}),
                            data=synth_manifest)
    assert events == ["draw", "load"]
    events.clear()
    with pytest.raises(FairdeployError, match="too few train images"):
        exporter.run_export(ckpt, tmp_path / "out", resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {"size": 5000}}),
                            data=synth_manifest)
    assert events == ["draw"] and not (tmp_path / "out").exists()


def _one_conv_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], name="conv")], "one_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_calibration_methods_set_different_ranges(tmp_path: Path) -> None:
    """The input's scale under each method, on N(0, 1) images with one outlier pixel of 60: minmax is 60/127 by
    hand; entropy (KL over 2048 bins, TensorRT's) and percentile (99.9) clip the outlier. onnxruntime's quantize_static
    alone gives entropy == minmax (its 128/128 default bins leave one candidate threshold)."""
    from onnx import numpy_helper

    from fairdeploy.export.int8 import array_reader, quantize_qdq

    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 60.0
    path = _one_conv_onnx(tmp_path / "one.onnx")
    scale = {}
    for method in ("minmax", "entropy", "percentile"):
        model = quantize_qdq(path, array_reader([x[:16], x[16:]]), method, percentile=99.9)
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        scale[method] = float(inits[q.input[1]])
    assert scale["minmax"] == pytest.approx(60.0 / 127, rel=1e-6)
    assert scale["entropy"] < scale["minmax"] / 4 and scale["percentile"] < scale["minmax"] / 4
    assert scale["entropy"] != pytest.approx(scale["percentile"], rel=1e-3)
