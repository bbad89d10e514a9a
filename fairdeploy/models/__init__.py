"""torchvision architectures and the checkpoint format (safetensors weights + a JSON description)."""

from fairdeploy.models.checkpoint import (
    ModelSpec,
    build_model,
    checkpoint_hash,
    load_checkpoint,
    read_spec,
    resolve_checkpoint,
    save_checkpoint,
    write_spec,
)
from fairdeploy.models.registry import ARCHITECTURES, classifier_head_name, create_model

__all__ = [
    "ARCHITECTURES",
    "ModelSpec",
    "build_model",
    "checkpoint_hash",
    "classifier_head_name",
    "create_model",
    "load_checkpoint",
    "read_spec",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_spec",
]
