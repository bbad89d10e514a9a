"""A training or pruning command's run: torchrun's process group, --out claimed and progress shown on the process
that writes (rank 0)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fairdeploy.cli.option_blocks import Job
from fairdeploy.cli.outputs import OUT_POLICIES, claim_on_main
from fairdeploy.cli.progress_display import progress_on_main


@contextlib.contextmanager
def rank_job(command: str, out: Path, job: Job, inputs: dict[str, Any],
             resume: bool | None = None) -> Iterator[tuple[Any, Any, bool]]:
    """One training/pruning command's run: the process group under torchrun (nothing otherwise), `out` claimed
    under `command`'s output policy (`inputs`, the command's input paths by flag, and --images-root may not be
    `out`) and the progress shown on the process that writes (rank 0). Yields this process's device, the
    progress callback and whether this process reports."""
    from fairdeploy.distributed import distributed_run, world

    claim = {"overwrite": job.overwrite, "resume": resume,
             "inputs": {**inputs, "--images-root": job.images.images_root}}
    with distributed_run(job.device) as rank_device, claim_on_main(out, OUT_POLICIES[command], **claim), \
            progress_on_main() as progress:
        yield rank_device, progress, world().is_main


def checkpoint_job(command: str, run: Callable[..., Any], model: Path, data: Path, out: Path, cfg: Any,
                   job: Job) -> Any:
    """The body of prune and finetune: `cfg` (built and checked by `configure`, before the manifest is read), then
    `run(model, manifest, out, cfg, device, progress)` as a `rank_job`. Returns its result on the process that
    reports, None on the others (under torchrun)."""
    manifest = job.images.read(data)
    with rank_job(command, out, job, {"--model": model, "--data": data}) as (device, progress, reports):
        result = run(model, manifest, out, cfg, device, progress)
    return result if reports else None
