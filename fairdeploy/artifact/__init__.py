"""The artifact contract export writes and the runtime reads: ONNX I/O names and `fairdeploy.*` metadata,
file names inside an export directory, and TensorRT engine sidecars."""

from fairdeploy.artifact.metadata import (
    INPUT_NAME,
    OUTPUT_NAME,
    PRECISIONS,
    OnnxMetadata,
    engine_filename,
    onnx_filename,
    read_onnx_metadata,
    sidecar_filename,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PRECISIONS",
    "OnnxMetadata",
    "engine_filename",
    "onnx_filename",
    "read_onnx_metadata",
    "sidecar_filename",
]
