"""The ONNX graph contract shared with the runtime: I/O names, `fairdeploy.*` metadata_props, file names."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError

# Graph I/O: one normalised image batch in, one logits batch out; the batch axis is dynamic.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"

PRECISIONS = ("fp32", "fp16", "int8")
PREFIX = "fairdeploy."
REQUIRED_KEYS = ("arch", "classes", "groups", "image_size", "mean", "std", "checkpoint_sha256", "precision")

# File names inside an export directory.
CALIBRATION_FILE = "calibration.json"
EXPORT_FILE = "export.json"


def onnx_filename(precision: str) -> str:
    """model.<precision>.onnx"""
    check_precision(precision)
    return f"model.{precision}.onnx"


def engine_filename(precision: str) -> str:
    """model.<precision>.engine (its JSON sidecar is the same name + .json)."""
    check_precision(precision)
    return f"model.{precision}.engine"


def sidecar_filename(precision: str) -> str:
    return engine_filename(precision) + ".json"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise FairdeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class OnnxMetadata:
    """What the runtime needs to preprocess inputs and name outputs, read back from an exported ONNX."""

    arch: str
    classes: tuple[str, ...]
    groups: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint_sha256: str
    precision: str
    calibration_sha256: str | None = None
    quantization_target: str | None = None  # int8: the runtime its Q/DQ types are for (export/quant_target.py)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_props(self) -> dict[str, str]:
        """metadata_props as strings (JSON for lists); calibration_sha256 and quantization_target only when set."""
        props = {
            "arch": self.arch,
            "classes": json.dumps(list(self.classes)),
            "groups": json.dumps(list(self.groups)),
            "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "checkpoint_sha256": self.checkpoint_sha256,
            "precision": self.precision,
        }
        if self.calibration_sha256 is not None:
            props["calibration_sha256"] = self.calibration_sha256
        if self.quantization_target is not None:
            props["quantization_target"] = self.quantization_target
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "<onnx>") -> OnnxMetadata:
        """Parse `fairdeploy.*` props; a missing or malformed key is a FairdeployError naming it."""
        missing = [PREFIX + k for k in REQUIRED_KEYS if PREFIX + k not in props]
        if missing:
            raise FairdeployError(
                f"{source}: not a fairdeploy export (metadata key(s) {', '.join(missing)} missing); "
                "export it with `fairdeploy export`"
            )

        def get(key: str) -> str:
            return props[PREFIX + key]

        def json_list(key: str, kind: type) -> tuple[Any, ...]:
            try:
                value = json.loads(get(key))
                if not isinstance(value, list):
                    raise TypeError("not a list")
                return tuple(kind(v) for v in value)
            except (ValueError, TypeError) as exc:
                raise FairdeployError(
                    f"{source}: metadata {PREFIX}{key} is not a JSON list ({get(key)[:60]!r})"
                ) from exc

        try:
            image_size = int(get("image_size"))
        except ValueError as exc:
            raise FairdeployError(f"{source}: metadata {PREFIX}image_size {get('image_size')!r} is not an integer") from exc
        precision = get("precision")
        if precision not in PRECISIONS:
            raise FairdeployError(
                f"{source}: metadata {PREFIX}precision {precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        calib = props.get(PREFIX + "calibration_sha256")
        if precision == "int8" and not calib:
            raise FairdeployError(f"{source}: int8 model without {PREFIX}calibration_sha256 metadata")
        target = props.get(PREFIX + "quantization_target") or None  # absent: an int8 export from before targets
        if target is not None:
            from fairdeploy.export.quant_target import TARGETS

            if target not in TARGETS:
                raise FairdeployError(f"{source}: metadata {PREFIX}quantization_target {target!r} is not one of "
                                      f"{', '.join(TARGETS)}")
        return cls(
            arch=get("arch"),
            classes=json_list("classes", str),
            groups=json_list("groups", str),
            image_size=image_size,
            mean=json_list("mean", float),
            std=json_list("std", float),
            checkpoint_sha256=get("checkpoint_sha256"),
            precision=precision,
            calibration_sha256=calib or None,
            quantization_target=target,
        )


def set_onnx_metadata(model: Any, meta: OnnxMetadata) -> None:
    """Replace the `fairdeploy.*` entries of an onnx.ModelProto's metadata_props (others are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *meta.to_props().items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def metadata_of_model(model: Any, source: str = "<onnx>") -> OnnxMetadata:
    return OnnxMetadata.from_props({p.key: p.value for p in model.metadata_props}, source)


def read_onnx_metadata(path: str | os.PathLike[str]) -> OnnxMetadata:
    """Read the fairdeploy metadata of an ONNX file (weights are not loaded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"ONNX file {p} not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FairdeployError(f"{p}: not a readable ONNX file ({first})") from exc
    return metadata_of_model(model, str(p))
