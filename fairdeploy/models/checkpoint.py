"""Checkpoint directories: model.safetensors + model.json (architecture, classes, groups, shapes). No pickle."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_dir, atomic_path
from fairdeploy.files.hashing import sha256_file
from fairdeploy.models.registry import ARCHITECTURES, create_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and preprocess its input, stored as model.json."""

    arch: str
    classes: tuple[str, ...]
    groups: tuple[str, ...] = ()
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Modules whose shape differs from the stock architecture (channel pruning): name -> attributes.
    module_shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Weight-level sparsity: {"kind": "weight"|"2:4", "layers": [names]}; masks are the zeros of those layers.
    sparsity: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = ()  # what produced this model (train, prune, finetune steps)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_history(self, entry: dict[str, Any]) -> ModelSpec:
        return replace(self, history=(*self.history, entry))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["num_classes"] = self.num_classes
        for k in ("classes", "groups", "mean", "std", "history"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model.json") -> ModelSpec:
        for key in ("arch", "classes"):
            if key not in d:
                raise FairdeployError(f"{source}: missing key {key!r}")
        if d["arch"] not in ARCHITECTURES:
            raise FairdeployError(
                f"{source}: unknown architecture {d['arch']!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        try:
            return cls(
                arch=str(d["arch"]),
                classes=tuple(str(c) for c in d["classes"]),
                groups=tuple(str(g) for g in d.get("groups", ())),
                image_size=int(d.get("image_size", cls.image_size)),
                mean=tuple(float(x) for x in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
                std=tuple(float(x) for x in d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
                module_shapes=_checked_shapes(d.get("module_shapes", {}), source),
                sparsity=d.get("sparsity"),
                history=tuple(d.get("history", ())),
            )
        except (TypeError, ValueError) as exc:
            raise FairdeployError(f"{source}: malformed value ({exc})") from exc


_SHAPE_ATTRS = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}
_SHAPE_TYPES = {typ.__name__: attrs for typ, attrs in _SHAPE_ATTRS.items()}


def _checked_shapes(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """module_shapes as written by describe_shapes: {module name: {"type": Conv2d|BatchNorm2d|Linear, sizes}},
    every size a positive integer; anything else is named (it would otherwise fail deep inside torch)."""
    if not isinstance(raw, dict):
        raise FairdeployError(f"{source}: module_shapes must be a table {{module name: {{type, sizes}}}}, got "
                              f"{type(raw).__name__} {str(raw)[:60]}")
    out: dict[str, dict[str, Any]] = {}
    for name, shape in raw.items():
        where = f"{source}: module_shapes[{name!r}]"
        if not isinstance(shape, dict) or shape.get("type") not in _SHAPE_TYPES:
            raise FairdeployError(f"{where} must be a table with type one of {', '.join(_SHAPE_TYPES)}, got "
                                  f"{str(shape)[:60]}")
        for attr in _SHAPE_TYPES[shape["type"]]:
            value = shape.get(attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FairdeployError(f"{where}: {attr} must be a positive integer, got {value!r}")
        out[str(name)] = dict(shape)
    return out


def _shape_of(module: nn.Module) -> dict[str, Any] | None:
    for typ, attrs in _SHAPE_ATTRS.items():
        if type(module) is typ:
            return {"type": typ.__name__, **{a: int(getattr(module, a)) for a in attrs}}
    return None


def describe_shapes(model: nn.Module, arch: str, num_classes: int) -> dict[str, dict[str, Any]]:
    """Modules of `model` whose shape differs from a fresh `arch` (what channel pruning changed)."""
    base = dict(create_model(arch, num_classes).named_modules())
    out = {}
    for name, module in model.named_modules():
        shape = _shape_of(module)
        if shape is None:
            continue
        if name not in base:
            raise FairdeployError(f"module {name} does not exist in a stock {arch}")
        if _shape_of(base[name]) != shape:
            out[name] = shape
    return out


def _resized(module: nn.Module, shape: dict[str, Any]) -> nn.Module:
    if isinstance(module, nn.Conv2d) and shape["type"] == "Conv2d":
        return nn.Conv2d(
            shape["in_channels"], shape["out_channels"], module.kernel_size, module.stride, module.padding,
            module.dilation, shape["groups"], module.bias is not None, module.padding_mode,
        )
    if isinstance(module, nn.BatchNorm2d) and shape["type"] == "BatchNorm2d":
        return nn.BatchNorm2d(
            shape["num_features"], module.eps, module.momentum, module.affine, module.track_running_stats
        )
    if isinstance(module, nn.Linear) and shape["type"] == "Linear":
        return nn.Linear(shape["in_features"], shape["out_features"], module.bias is not None)
    raise FairdeployError(f"module is a {type(module).__name__}, model.json describes a {shape['type']}")


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Replace the named modules of a stock model by modules of the recorded (pruned) shapes."""
    for name, shape in shapes.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as exc:
            raise FairdeployError(f"model.json: module {name} does not exist in this architecture") from exc
        setattr(parent, child, _resized(old, shape))


def build_model(spec: ModelSpec) -> nn.Module:
    """An untrained model of the spec's architecture and (possibly pruned) shapes."""
    model = create_model(spec.arch, spec.num_classes)
    apply_shapes(model, spec.module_shapes)
    return model


def sort_safetensors_metadata(path: str | os.PathLike[str]) -> None:
    """Rewrite the header of a safetensors file in place with its `__metadata__` keys sorted.

    safetensors' writer serialises the metadata from a Rust HashMap, whose order is drawn anew in every process,
    so two identical saves gave files with the same tensors and different bytes (and sha256) about half the time.
    The tensors' entries keep the writer's order (it sorts them itself); the header keeps its length (the same
    JSON reordered, padded with spaces as the writer pads it), so no data offset moves."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = {**({"__metadata__": dict(sorted(meta.items()))} if meta else {}), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen: the same keys and values in another order
            raise FairdeployError(f"{path}: the sorted safetensors header is longer than the written one")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def save_checkpoint(model: nn.Module, spec: ModelSpec, out_dir: str | os.PathLike[str]) -> Path:
    """Write model.safetensors + model.json atomically; pruned shapes are derived from the model itself. The same
    weights and spec give the same bytes (sorted metadata: sort_safetensors_metadata)."""
    from safetensors.torch import save_file

    spec = replace(spec, module_shapes=describe_shapes(model, spec.arch, spec.num_classes))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    out = Path(out_dir)
    with atomic_dir(out, owner=SPEC_FILE) as tmp:  # replaces only an earlier checkpoint
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "arch": spec.arch})
        sort_safetensors_metadata(tmp / WEIGHTS_FILE)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return out


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a training run directory whose best/ holds one."""
    d = Path(path)
    if not d.is_dir():
        raise FairdeployError(f"checkpoint {d} is not a directory (expected {SPEC_FILE} + {WEIGHTS_FILE})")
    if (d / SPEC_FILE).is_file():
        return d
    if (d / "best" / SPEC_FILE).is_file():
        return d / "best"
    raise FairdeployError(f"checkpoint {d}: {SPEC_FILE} not found")


def read_spec(path: str | os.PathLike[str]) -> ModelSpec:
    d = resolve_checkpoint(path)
    spec_path = d / SPEC_FILE
    try:
        raw = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise FairdeployError(f"{spec_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    return ModelSpec.from_dict(raw, source=str(spec_path))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from a checkpoint directory; every mismatch between JSON and weights is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_checkpoint(path)
    spec = read_spec(d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise FairdeployError(f"checkpoint {d}: {WEIGHTS_FILE} not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise FairdeployError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = build_model(spec)
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise FairdeployError(f"{d}: {SPEC_FILE} does not match {WEIGHTS_FILE}: tensor {k} is missing")
        if tuple(state[k].shape) != tuple(v.shape):
            raise FairdeployError(
                f"{d}: {SPEC_FILE} does not match {WEIGHTS_FILE}: tensor {k} has shape "
                f"{tuple(state[k].shape)} in the weights, {tuple(v.shape)} in the described model"
            )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise FairdeployError(
            f"{d}: {SPEC_FILE} does not match {WEIGHTS_FILE}: unexpected tensor {unexpected[0]}"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    return model, spec


def write_spec(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Rewrite model.json of an existing checkpoint (e.g. to append a history entry); shapes are kept."""
    d = resolve_checkpoint(path)
    old = read_spec(d)
    spec = replace(spec, module_shapes=old.module_shapes)
    with atomic_path(d / SPEC_FILE) as tmp:
        tmp.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def check_resumable(last_dir: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Raise unless the earlier run's checkpoint in `last_dir` is the same model as `spec` describes (classes,
    groups, architecture, input size): resuming it with another manifest's classes cannot load its weights."""
    earlier = read_spec(last_dir)
    for what, old, new in (("classes", earlier.classes, spec.classes), ("groups", earlier.groups, spec.groups),
                           ("architecture", earlier.arch, spec.arch), ("image size", earlier.image_size,
                                                                       spec.image_size)):
        if old != new:
            show = (lambda v: ", ".join(v) if isinstance(v, tuple) else str(v))
            raise FairdeployError(f"cannot resume {Path(last_dir).parent}: {what} differ, the earlier run has "
                                  f"{show(old)}, this run {show(new)} (another manifest?); use a new --out, "
                                  "or pass --overwrite to start again there")


def checkpoint_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the checkpoint's weights file (identifies the source of an export)."""
    return sha256_file(resolve_checkpoint(path) / WEIGHTS_FILE)
