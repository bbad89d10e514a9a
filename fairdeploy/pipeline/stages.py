"""Stages and their caching: a stage reruns only when the hash of its inputs changed: its resolved configuration,
the content of the upstream files it reads, and the fairdeploy version (a changed library default reruns what it
affects)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.files.hashing import sha256_file
from fairdeploy.files.json_files import read_json, write_json

STAGE_FILE = "stage.json"


def hash_inputs(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class HashOf:
    """An input that is the content hash of an upstream file or folder, taken when the stage is reached (after
    the stages before it have written it)."""

    path: Path

    def resolve(self) -> str:
        return hash_path(self.path)


def resolve_inputs(inputs: Any) -> Any:
    """`inputs` with every HashOf replaced by the hash it stands for (nested dicts and lists included)."""
    if isinstance(inputs, HashOf):
        return inputs.resolve()
    if isinstance(inputs, dict):
        return {k: resolve_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [resolve_inputs(v) for v in inputs]
    return inputs


def hash_path(path: Path) -> str:
    """Content hash of a file, or of every file under a directory (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str  # "ran" | "up to date"
    seconds: float
    outputs: dict[str, str]  # output name -> content hash
    notes: tuple[str, ...] = ()  # what the stage said when it ran (kept in its record: a cached rerun says it too)


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline, as data: its folder, its inputs (resolved configuration, HashOf upstream files),
    the outputs it must leave, and the function that makes them (it may return notes)."""

    name: str
    folder: Path
    inputs: dict[str, Any]
    outputs: tuple[str, ...]
    run: Callable[[], Sequence[str] | None]
    record: str = STAGE_FILE

    def execute(self) -> StageOutcome:
        return run_stage(self.folder, self.name, resolve_inputs(self.inputs), self.outputs, self.run, self.record)


def run_stage(
    stage_dir: Path,
    name: str,
    inputs: dict[str, Any],
    outputs: Sequence[str],
    run: Callable[[], Any],
    record: str = STAGE_FILE,
) -> StageOutcome:
    """Run `run()` unless stage_dir/`record` records the same input hash and all outputs exist.

    `outputs` are paths relative to stage_dir. The record is written last, so an interrupted stage
    has none and runs again. A stage that shares its folder with others (the report, in the run
    folder) names its own record.
    """
    import fairdeploy

    inputs = {**inputs, "fairdeploy": fairdeploy.__version__}
    key = hash_inputs(inputs)
    record_path = stage_dir / record
    if record_path.is_file():
        record = read_json(record_path)
        if record.get("inputs_hash") == key and all((stage_dir / o).exists() for o in outputs):
            return StageOutcome(name, "up to date", 0.0, dict(record.get("outputs", {})),
                                tuple(record.get("notes", ())))
        record_path.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    said = run()
    notes = tuple(said) if isinstance(said, (list, tuple)) and all(isinstance(n, str) for n in said) else ()
    seconds = time.perf_counter() - t0
    hashes = {o: hash_path(stage_dir / o) for o in outputs}
    write_json(record_path, {"stage": name, "inputs_hash": key, "inputs": inputs, "outputs": hashes,
                             "notes": list(notes), "seconds": seconds,
                             "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return StageOutcome(name, "ran", seconds, hashes, notes)
