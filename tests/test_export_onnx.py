"""FP32 ONNX export: PyTorch equivalence (dense and channel-pruned, two families, batch 1 and 8), I/O
contract, metadata, baked sparsity, and refusals that leave no file behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fairdeploy.artifact.metadata import OnnxMetadata, read_onnx_metadata
from fairdeploy.errors import FairdeployError
from fairdeploy.export.onnx_export import SelfCheck, export_model_onnx, export_onnx, weight_sparsity
from fairdeploy.models import (
    ModelSpec,
    checkpoint_hash,
    classifier_head_name,
    create_model,
    read_spec,
    save_checkpoint,
)
from fairdeploy.runtime.ort_runner import session_options

CLASSES = ("cross", "disc", "ring")
GROUPS = ("dark", "light")
SIZE = 32


def randomized(arch: str, seed: int = 0) -> nn.Module:
    """An untrained model whose BN statistics come from a forward pass on random data, so activations
    stay input-dependent through every layer and logits are O(1..10): a 1e-4 tolerance then means something."""
    torch.manual_seed(seed)  # create_model's own init draws from the global generator
    g = torch.Generator().manual_seed(seed)
    model = create_model(arch, len(CLASSES))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.momentum = None  # running stats = the cumulative batch statistics
            if isinstance(m, nn.Linear):  # torchvision's N(0, 0.01) makes MobileNet's logits input-independent
                nn.init.normal_(m.weight, 0.0, 1.0 / m.in_features**0.5, generator=g)
        model.train()
        model(torch.randn(32, 3, SIZE, SIZE, generator=g))
        head = model.get_submodule(classifier_head_name(arch))
        nn.init.normal_(head.weight, 0.0, 3.0 / head.in_features**0.5, generator=g)
    return model.eval()


def channel_pruned(model: nn.Module, arch: str) -> nn.Module:
    """Remove 25% of the channels with torch-pruning's DepGraph (residuals, BN, SE blocks coupled)."""
    import torch_pruning as tp

    head = model.get_submodule(classifier_head_name(arch))
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, SIZE, SIZE), importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.25, ignored_layers=[head])
    pruner.step()
    return model.eval()


def conv_out_channels_torch(model: nn.Module) -> list[int]:
    return sorted(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def conv_out_channels_onnx(model: onnx.ModelProto) -> list[int]:
    inits = {i.name: i for i in model.graph.initializer}
    return sorted(int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv")


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "channel-pruned"])
def test_fp32_onnx_matches_pytorch(arch: str, pruned: bool, tmp_path: Path) -> None:
    model = randomized(arch)
    if pruned:
        model = channel_pruned(model, arch)
    spec = ModelSpec(arch=arch, classes=CLASSES, groups=GROUPS, image_size=SIZE, mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.25, 0.3))
    ckpt = save_checkpoint(model, spec, tmp_path / "ckpt")
    assert bool(read_spec(ckpt).module_shapes) is pruned  # the checkpoint really holds pruned shapes

    # Independent oracle: fresh inputs, ONNX Runtime at batch 1 and 8 against the in-memory PyTorch model.
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ref).max() > 0.2 and ref.std(0).max() > 0.05  # logits are not trivially small or constant
    # float32 rounding (BN folded into the convs, other kernels) grows with the logits' size: 1e-4, or 2e-5 of the
    # largest logit when that is bigger (MobileNet's logits reach ~10 here; Intel and AMD kernels differ by 1.8e-4)
    tol = max(1e-4, 2e-5 * float(np.abs(ref).max()))

    result = export_onnx(ckpt, tmp_path / "out" / "model.fp32.onnx", check=SelfCheck(batch_sizes=(1, 8)))
    assert result.max_abs_logit_diff < tol and result.top1_agreement == 1.0
    sess = ort.InferenceSession(str(result.path), session_options(), providers=["CPUExecutionProvider"])
    one = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1].numpy()})[0] for i in range(8)])
    eight = sess.run(["logits"], {"input": x.numpy()})[0]
    assert np.abs(one - ref).max() < tol
    assert np.abs(eight - ref).max() < tol

    graph = onnx.load(str(result.path))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, SIZE, SIZE]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", len(CLASSES)]
    assert graph.opset_import[0].version == 17
    # The pruned channel counts are what the graph computes with (BN is folded into the convs).
    assert conv_out_channels_onnx(graph) == conv_out_channels_torch(model)

    # Metadata: the strings in the file, and what the runtime reads back.
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["fairdeploy.classes"]) == list(CLASSES)
    assert json.loads(props["fairdeploy.groups"]) == list(GROUPS)
    assert props["fairdeploy.precision"] == "fp32" and props["fairdeploy.image_size"] == "32"
    assert "fairdeploy.calibration_sha256" not in props
    assert read_onnx_metadata(result.path) == OnnxMetadata(
        arch=arch, classes=CLASSES, groups=GROUPS, image_size=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
        checkpoint_sha256=checkpoint_hash(ckpt), precision="fp32")


def _tiny_onnx(path: Path, props: dict[str, str]) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph)
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def test_metadata_missing_or_malformed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FairdeployError, match=r"not a fairdeploy export .*fairdeploy\.arch"):
        read_onnx_metadata(_tiny_onnx(tmp_path / "plain.onnx", {}))
    good = OnnxMetadata("resnet18", CLASSES, GROUPS, 32, (0.5,) * 3, (0.2,) * 3, "x", "fp32").to_props()
    with pytest.raises(FairdeployError, match=r"fairdeploy\.classes is not a JSON list"):
        read_onnx_metadata(_tiny_onnx(tmp_path / "bad.onnx", {**good, "fairdeploy.classes": "cross,disc"}))
    with pytest.raises(FairdeployError, match=r"int8 model without fairdeploy\.calibration_sha256"):
        read_onnx_metadata(_tiny_onnx(tmp_path / "q.onnx", {**good, "fairdeploy.precision": "int8"}))
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(FairdeployError, match="not a readable ONNX file"):
        read_onnx_metadata(tmp_path / "junk.onnx")


def test_sparse_weights_are_baked_as_plain_zeros(tmp_path: Path) -> None:
    """torch.nn.utils.prune masks become plain zero weights: no mask tensor or Mul in the graph, and the
    graph's Conv/Gemm weights hold exactly the model's zeros (BN folding scales channels, keeps zeros)."""
    from torch.nn.utils import prune

    model = randomized("mobilenet_v3_small", seed=1)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.5)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in layers)
    spec = ModelSpec(arch="mobilenet_v3_small", classes=CLASSES, groups=GROUPS, image_size=SIZE)
    result = export_model_onnx(model, spec, tmp_path / "sparse.onnx", checkpoint_sha256="0" * 64,
                               check=SelfCheck(batch_sizes=(8,)))
    assert result.max_abs_logit_diff < 1e-4
    graph = onnx.load(str(result.path))
    assert not [i.name for i in graph.graph.initializer if "mask" in i.name or "orig" in i.name]
    assert weight_sparsity(graph)[0] == zeros == result.zero_weights
    assert hasattr(model.get_submodule(classifier_head_name("mobilenet_v3_small")), "weight_orig")  # caller's model untouched


def test_unsupported_opset_and_failed_self_check_write_nothing(tmp_path: Path) -> None:
    model = randomized("mobilenet_v3_small")
    spec = ModelSpec(arch="mobilenet_v3_small", classes=CLASSES, groups=GROUPS, image_size=SIZE)
    out = tmp_path / "out" / "model.fp32.onnx"
    with pytest.raises(FairdeployError, match=r"unsupported opset 12; choose 17\.\.20"):
        export_model_onnx(model, spec, out, "0" * 64, opset=12)
    # A self-check that cannot pass (negative tolerance) must leave no file, not even a temporary one.
    with pytest.raises(FairdeployError, match="self-check failed"):
        export_model_onnx(model, spec, out, "0" * 64, check=SelfCheck(batch_sizes=(4,), atol=-1.0), simplify=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
