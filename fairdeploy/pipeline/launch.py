"""Run one pipeline stage (train, prune, budget prune, finetune) under torchrun when the TOML asks for `nproc = N`.

The pipeline writes the stage's inputs and configuration as JSON (dataclasses as plain dicts, no pickle) and starts
`python -m torch.distributed.run --standalone --nproc-per-node N -m fairdeploy.pipeline.launch SPEC.json`; every
rank rebuilds the configuration, joins the process group and calls the same library function the one-process
pipeline calls (rank 0 writes).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError

SPEC_FILE = ".launch.json"  # in the stage folder, beside the stage's own outputs
KINDS = ("train", "prune", "budget", "finetune")


def _config_classes() -> dict[str, type]:
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.pruning.run import PruneConfig
    from fairdeploy.training.loop import FitConfig

    return {"train": FitConfig, "prune": PruneConfig, "budget": BudgetConfig, "finetune": FitConfig}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass `cls` from `dataclasses.asdict` output read back from JSON (nested dataclasses, optional
    ones, tuples)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name])
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def run_under_torchrun(kind: str, nproc: int, stage_dir: Path, *, manifest: str, images_root: str | None,
                       allow_outside_root: bool, out: Path, config: Any, device: str, model: Path | None = None,
                       arch: str | None = None, image_size: int | None = None) -> None:
    """Run one stage with `nproc` processes on this node; its messages go to this process's stdout / stderr."""
    if kind not in KINDS:
        raise FairdeployError(f"unknown stage kind {kind!r}; choose one of {', '.join(KINDS)}")
    from fairdeploy.files.json_files import write_json

    spec = {"kind": kind, "manifest": manifest, "images_root": images_root, "allow_outside_root": allow_outside_root,
            "out": str(out), "config": dataclasses.asdict(config), "device": device,
            "model": str(model) if model is not None else None, "arch": arch, "image_size": image_size}
    path = stage_dir / SPEC_FILE
    write_json(path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fairdeploy.pipeline.launch", str(path)]
    try:
        rc = subprocess.run(cmd, check=False).returncode
    finally:
        path.unlink(missing_ok=True)
    if rc != 0:
        raise FairdeployError(f"{kind} stage in {stage_dir} failed under torchrun with {nproc} processes (exit {rc}; "
                              "the failing rank's message is above)")


def run_spec(spec: dict[str, Any]) -> None:
    """What every rank runs: rebuild the configuration, join the process group, call the library function."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run

    kind = spec["kind"]
    cfg = from_dict(_config_classes()[kind], spec["config"])
    manifest = read_manifest(spec["manifest"], spec["images_root"], allow_outside_root=spec["allow_outside_root"])
    out = Path(spec["out"])
    with distributed_run(spec["device"]) as device:
        if kind == "train":
            from fairdeploy.training.train import train_model

            train_model(manifest, spec["arch"], out, cfg, spec["image_size"], None, device, False)
        elif kind == "prune":
            from fairdeploy.pruning.run import prune_checkpoint

            prune_checkpoint(spec["model"], manifest, out, cfg, device)
        elif kind == "budget":
            from fairdeploy.pruning.budget import compress_checkpoint

            compress_checkpoint(spec["model"], manifest, out, cfg, device)
        else:
            from fairdeploy.training.finetune import finetune_checkpoint

            finetune_checkpoint(spec["model"], manifest, out, cfg, device)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise FairdeployError("usage: python -m fairdeploy.pipeline.launch SPEC.json (written by the pipeline)")
        run_spec(json.loads(Path(args[0]).read_text()))
    except FairdeployError as exc:  # one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
