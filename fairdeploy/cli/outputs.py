"""What each command writes at --out and the proof that an existing --out is its own (OUT_POLICIES, for
fairdeploy.files.outputs.claim_output), and the claim made on the process that writes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdeploy.files.outputs import OutputPolicy


def _json_has(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


PREPARE_RECORD_SUFFIX = ".prepare.json"  # `data prepare --out M.csv` records what it wrote in M.csv.prepare.json


def prepare_record(manifest: Path) -> Path:
    """The record `data prepare` writes beside its manifest (the proof that the manifest is its own)."""
    return manifest.with_name(manifest.name + PREPARE_RECORD_SUFFIX)


def read_prepare_record(record: Path) -> dict[str, Any] | None:
    """The record's content when it is one `data prepare` wrote (a regular file: never opened otherwise)."""
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("command") == "data prepare" and "manifest_sha256" in data
    return data if ok else None


def _prepared_here(path: Path) -> bool:
    """A manifest `data prepare` wrote and nobody changed since: its record names the command and holds the
    manifest's SHA-256 (a CSV with the manifest header is not proof: `data synth` and people write them too)."""
    from fairdeploy.files.hashing import sha256_if_file

    record = read_prepare_record(prepare_record(path))
    return record is not None and record["manifest_sha256"] == sha256_if_file(path)


def _last_stage(run: Path) -> Any:
    """The stage that produced a training folder's best checkpoint (model.json history), or None."""
    try:
        history = json.loads((run / "best" / "model.json").read_text()).get("history") or []
    except (OSError, ValueError, AttributeError):
        return None
    return history[-1].get("stage") if history and isinstance(history[-1], dict) else None


def _is_pipeline_run(run: Path) -> bool:
    return (run / "stages.json").is_file() or any((d / "stage.json").is_file() for d in run.iterdir() if d.is_dir())


def _report_owns(out: Path) -> bool:
    from fairdeploy.report.render import report_owns

    return report_owns(out)


OUT_POLICIES: dict[str, OutputPolicy] = {
    "data synth": OutputPolicy("data synth", record="synth.json", names=("images", "manifest.csv", "synth.json")),
    "data prepare": OutputPolicy("data prepare", kind="file", owned=_prepared_here, what="a manifest",
                                 proof=f"MANIFEST{PREPARE_RECORD_SUFFIX} record holding its SHA-256"),
    "data inspect": OutputPolicy("data inspect", kind="file", what="an inspection report",
                                 owned=lambda p: _json_has(p, ("source", "records", "support", "images_checked"))),
    "train": OutputPolicy("train", resume_option="--resume", proof="trainer.json of a train run",
                          owned=lambda p: (p / "trainer.json").is_file() and _last_stage(p) != "finetune"),
    "evaluate": OutputPolicy("evaluate", kind="file", what="a metrics JSON",
                             owned=lambda p: _json_has(p, ("overall", "groups", "fairness", "class_names"))),
    "prune": OutputPolicy("prune", record="prune.json", names=("model.safetensors", "model.json", "prune.json",
                                                                    "control", "rounds")),
    "finetune": OutputPolicy("finetune", names=("best", "last", "trainer.json"),
                             proof="trainer.json of a finetune run",
                             owned=lambda p: (p / "trainer.json").is_file() and _last_stage(p) == "finetune"),
    "export": OutputPolicy("export", record="export.json"),
    "validate": OutputPolicy("validate", record="validation.json"),
    "report": OutputPolicy("report", owned=_report_owns, proof="report.html of an earlier report"),
    "pipeline": OutputPolicy("pipeline", owned=_is_pipeline_run, proof="stages.json or a stage's stage.json"),
    "rank": OutputPolicy("rank", kind="file", what="a ranking JSON",
                         owned=lambda p: _json_has(p, ("order", "recommendation", "models"))),
}


@contextlib.contextmanager
def claim_on_main(out: Path, policy: OutputPolicy, **kw: Any) -> Iterator[Path]:
    """`claim_output` on the process that writes: the only one, or rank 0 of a torchrun job (the other ranks
    write nothing and claim nothing)."""
    from fairdeploy.distributed import world
    from fairdeploy.files.outputs import claim_output

    if world().is_main:
        with claim_output(out, policy, **kw) as claimed:
            yield claimed
    else:
        yield out
