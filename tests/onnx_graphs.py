"""Random-initialised torchvision models exported to ONNX with the BatchNorm statistics of real activations, for
the INT8 tests (Q/DQ placement, quantization targets, the ModelOpt rules): no training, so every CPU builds the
same graph."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fairdeploy.export.onnx_export import export_model_onnx
from fairdeploy.models import ModelSpec
from fairdeploy.models.checkpoint import build_model

SIZE = 32
# The agreement control: every activation scale divided by this (ranges clipped to 1/16), a quantization that is
# wrong the way a one-group or far too small calibration set makes it wrong (its top-1 agreement is near chance).
CLIPPED_SCALE_DIVISOR = 16


def random_init_graphs(archs: Iterable[str], tmp_path_factory: pytest.TempPathFactory
                       ) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """arch -> (model.fp32.onnx, four batches of 8 standard-normal images) for 3 classes at 32 px."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    rng = np.random.default_rng(0)
    try:
        for arch in archs:
            spec = ModelSpec(arch=arch, classes=("a", "b", "c"), groups=("x", "y"), image_size=SIZE)
            torch.manual_seed(0)
            model = build_model(spec).train()
            for m in model.modules():  # BatchNorm statistics of real activations, not the init's (0, 1): the plain
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # average of the batches below (momentum
                    m.reset_running_stats()  # 0.1 would keep 43 % of the init's variance, and mobilenet's signal
                    m.momentum = None  # then fades layer by layer into input-independent logits)
            with torch.no_grad():
                for _ in range(8):
                    model(torch.randn(16, 3, SIZE, SIZE))
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):  # torchvision's heads start near 0: logits would all be equal
                    torch.nn.init.normal_(m.weight, 0.0, m.in_features ** -0.5)
            path = tmp_path_factory.mktemp(arch) / "model.fp32.onnx"
            export_model_onnx(model.eval(), spec, path, "0" * 64)
            out[arch] = (path, [rng.standard_normal((8, 3, SIZE, SIZE)).astype(np.float32) for _ in range(4)])
    finally:
        torch.set_num_threads(before)
    return out


def clipped_control(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every activation scale divided by CLIPPED_SCALE_DIVISOR: a broken calibration."""
    clipped = onnx.ModelProto()
    clipped.CopyFrom(model)
    scales = {n.input[1] for n in clipped.graph.node if n.op_type == "QuantizeLinear"}
    for init in clipped.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / CLIPPED_SCALE_DIVISOR, init.name))
    return clipped
