"""FP16 ONNX: float16 weights and compute, float32 `input` and `logits` (Cast at the graph's edges)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from pathlib import Path

from fairdeploy.artifact.metadata import metadata_of_model, set_onnx_metadata
from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_path


def to_fp16_model(model):
    """An onnx.ModelProto converted to float16 (keep_io_types: the graph's I/O stays float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


def topological_sort(model) -> None:
    """Reorder graph nodes so every input is produced before use (the converter appends its Casts last)."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise FairdeployError("FP16 graph has a cycle or an input no node produces")
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def float_initializer_types(model) -> dict[int, int]:
    """Count of initializers per ONNX TensorProto data type (1 = float32, 10 = float16)."""
    counts: dict[int, int] = {}
    for init in model.graph.initializer:
        counts[init.data_type] = counts.get(init.data_type, 0) + 1
    return counts


def convert_fp16(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the FP16 variant of an exported FP32 ONNX atomically; its metadata says precision fp16."""
    import onnx

    src, out = Path(fp32_path), Path(out_path)
    model = onnx.load(str(src))
    meta = metadata_of_model(model, str(src))
    if meta.precision != "fp32":
        raise FairdeployError(f"{src}: FP16 conversion needs the fp32 export, this one is {meta.precision}")
    half = to_fp16_model(model)
    topological_sort(half)
    set_onnx_metadata(half, dataclasses.replace(meta, precision="fp16"))
    try:
        onnx.checker.check_model(half)
    except onnx.checker.ValidationError as exc:
        raise FairdeployError(f"{out.name}: FP16 graph is not valid ONNX ({str(exc).splitlines()[0]})") from exc
    with atomic_path(out) as tmp:
        onnx.save(half, str(tmp))
    return out
